"""Prompt files and printed responses: the `--input_tokens` CSV format, the
`--output_csv` writer, the original example's Chinese punctuation clean-up, and
seeded random prompts for measurements."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from glm_engine import GlmEngineError
from glm_engine.tools.output_file import output_stream

# ASCII punctuation next to a CJK character becomes its full-width form.
_FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def read_token_csv(path: str | Path) -> list[list[int]]:
    """Prompts from a CSV file (or a pipe): one prompt per line, comma-separated token ids."""
    path = Path(path)
    if not path.exists():
        raise GlmEngineError(f"--input_tokens {path}: no such file")
    if path.is_dir():
        raise GlmEngineError(f"--input_tokens {path} is a directory; give a CSV file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise GlmEngineError(f"--input_tokens {path} is not UTF-8 text (byte {error.start}); give a CSV file "
                             "of token ids") from None
    except OSError as error:
        raise GlmEngineError(f"--input_tokens {path}: {error.strerror}") from None
    prompts = []
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:
        raise GlmEngineError(f"--input_tokens {path} is not a CSV file ({error})") from None
    for line_number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            raise GlmEngineError(f"{path} line {line_number}: empty prompt")
        bad = next((cell for cell in cells if not re.fullmatch(r"-?[0-9]{1,100}", cell)), None)
        if bad is not None:
            raise GlmEngineError(f"{path} line {line_number}: {bad[:40]!r} is not a token id; each line "
                                 "must be comma-separated integers")
        prompts.append([int(cell) for cell in cells])
    if not prompts:
        raise GlmEngineError(f"--input_tokens {path} holds no prompt")
    return prompts


def write_token_csv(path: str | Path, rows: list[list[int]]) -> None:
    """Writes one line of comma-separated ids per row (output_file.output_stream)."""
    with output_stream(path, "--output_csv") as stream:
        csv.writer(stream, lineterminator="\n").writerows(rows)


def clean_response(text: str) -> str:
    """Strips the text and turns ASCII punctuation touching a CJK character
    into its full-width form, as the original example's run.py does."""
    text = text.strip()
    for ascii_mark, full_width in _FULL_WIDTH:
        text = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % full_width, text)
        text = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % full_width, text)
    return text


def random_prompts(lengths: list[int], high: int, seed: int) -> list[list[int]]:
    """Seeded prompts of the given lengths, ids uniform in [3, high) (0-2: pad, bos, eos)."""
    import torch  # here: the prompt-file functions serve tools that must start without torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, high, (length,), generator=generator).tolist() for length in lengths]


# GLM-4-9B-chat's chat template: the system message that lists the tools.
GLM4_TOOLS_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                       "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_NOTE = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


def chat_prompt_ids(tokenizer, messages: list[tuple[str, ...]]) -> list[int]:
    """Token ids of a chat, (role, content) or (role, content, metadata) messages ending
    with a user turn (or, with role tokens, a tool's observation), in the format the
    tokenizer's model was trained on. ChatGLM2: "[Round i]\\n\\n问：...\\n\\n答：..."
    rounds (a system message opens the first question: ChatGLM2 has no system role).
    ChatGLM3 and GLM-4: [gMASK] sop, a role token, the metadata (a called function's
    name), "\\n" and the content per message, then <|assistant|> (GLM-4's chat
    template: "[gMASK]<sop><|user|>\\n...<|assistant|>")."""
    role_tokens = tokenizer.flavor in ("chatglm3", "glm4")
    if not role_tokens and any(len(message) > 2 and message[2] or message[0] not in ("system", "user", "assistant")
                               for message in messages):
        raise GlmEngineError("ChatGLM2's rounds have no function calls or tool results; send system, user and "
                             "assistant messages")
    if not messages or messages[-1][0] not in (("user", "observation") if role_tokens else ("user",)):
        raise GlmEngineError("a chat must end with a user message")
    return _role_token_prompt(tokenizer, messages) if role_tokens else _round_prompt(tokenizer, messages)


def glm4_tools_message(functions: list[dict]) -> str:
    """The system message GLM-4-9B-chat's chat template writes for `functions` (OpenAI's
    tools[].function objects): each under its name as the template's tojson writes it."""
    return GLM4_TOOLS_PREAMBLE + "".join(f"\n\n## {function['name']}\n\n{_template_json(function)}{GLM4_TOOL_NOTE}"
                                         for function in functions)


def _template_json(value: object) -> str:
    """jinja2's `tojson(indent=4)`: sorted keys, ASCII, HTML's special characters escaped."""
    text = json.dumps(value, indent=4, sort_keys=True)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escaped)
    return text


def _role_token_prompt(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    """ChatGLM3's and GLM-4's format: a role token, "\\n" and the content per message.
    ChatGLM3's tokenizer encodes the "\\n" and the content apart, each after SentencePiece's
    leading space (its build_chat_input); GLM-4's encodes them as one text."""
    roles = tokenizer.special_token_ids
    ids = tokenizer.encode("", add_prefix=True)
    for role, content, *metadata in messages:
        if f"<|{role}|>" not in roles:
            raise GlmEngineError(f"chat role {role!r} has no role token; use system, user, assistant or observation")
        head = (metadata[0] if metadata else "") + "\n"
        if getattr(tokenizer, "flavor", None) == "chatglm3":
            body = tokenizer.encode(head, add_prefix=False) + tokenizer.encode(content, add_prefix=False)
        else:
            body = tokenizer.encode(head + content, add_prefix=False)
        ids += [roles[f"<|{role}|>"], *body]
    return ids + [roles["<|assistant|>"]]


def _round_prompt(tokenizer, messages: list[tuple[str, str]]) -> list[int]:
    """ChatGLM2's "[Round i]" format (its system message opens the first question)."""
    system = "\n".join(content for role, content in messages if role == "system")
    turns = [(role, content) for role, content in messages if role != "system"]
    text, round_number, question = "", 1, None
    for role, content in turns:
        if role == "user":
            if question is not None:
                raise GlmEngineError("two user messages in a row; ChatGLM2's rounds alternate user and assistant")
            question = (system + "\n" + content) if system and round_number == 1 else content
        else:
            if question is None:
                raise GlmEngineError("an assistant message must answer a user message")
            text += f"[Round {round_number}]\n\n问：{question}\n\n答：{content}\n\n"
            round_number, question = round_number + 1, None
    return tokenizer.encode(text + f"[Round {round_number}]\n\n问：{question}\n\n答：")
