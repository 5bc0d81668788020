"""Prompt files and printed responses: the `--input_tokens` CSV format, the
`--output_csv` writer, and the original example's Chinese punctuation clean-up."""

from __future__ import annotations

import csv
import os
import re
import tempfile
from pathlib import Path

from glm_engine import GlmEngineError

# ASCII punctuation next to a CJK character becomes its full-width form.
_FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def read_token_csv(path: str | Path) -> list[list[int]]:
    """Prompts from a CSV file: one prompt per line, comma-separated token ids."""
    path = Path(path)
    if not path.is_file():
        raise GlmEngineError(f"--input_tokens {path}: no such file")
    prompts = []
    with open(path, newline="") as stream:
        for line_number, row in enumerate(csv.reader(stream), start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                raise GlmEngineError(f"{path} line {line_number}: empty prompt")
            try:
                prompts.append([int(cell) for cell in cells])
            except ValueError:
                bad = next(cell for cell in cells if not cell.lstrip("-").isdigit())
                raise GlmEngineError(f"{path} line {line_number}: {bad!r} is not a token id; each line "
                                     "must be comma-separated integers") from None
    if not prompts:
        raise GlmEngineError(f"--input_tokens {path} holds no prompt")
    return prompts


def write_token_csv(path: str | Path, rows: list[list[int]]) -> None:
    """Writes one line of comma-separated ids per row, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", newline="") as stream:
            csv.writer(stream, lineterminator="\n").writerows(rows)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def clean_response(text: str) -> str:
    """Strips the text and turns ASCII punctuation touching a CJK character
    into its full-width form, as the original example's run.py does."""
    text = text.strip()
    for ascii_mark, full_width in _FULL_WIDTH:
        text = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % full_width, text)
        text = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % full_width, text)
    return text
