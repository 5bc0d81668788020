"""cnn_dailymail articles for summarize.py: from a local file or directory
(`--dataset_path`), or ccdv/cnn_dailymail 3.0.0 through `datasets`."""

from __future__ import annotations

import csv
import json
import os
import socket
import urllib.parse
from pathlib import Path

from glm_engine import GlmEngineError

HUB_DATASET = ("ccdv/cnn_dailymail", "3.0.0")
HUB_PROBE_SECONDS = 5
# The cnn_dailymail articles that come with the repository, for a run without the hub.
BUNDLED_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "cnn_dailymail_sample.jsonl"


def _read_records(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(records, dict):
            records = records.get("test", records.get("data"))
        if not isinstance(records, list):
            raise GlmEngineError(f"--dataset_path {path}: expected a JSON list of records (or an object with "
                                 "a 'test' or 'data' list)")
        return records
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise GlmEngineError(f"--dataset_path {path}: reading parquet needs pyarrow (pip install "
                                 "pyarrow), or give json/jsonl/csv") from None
        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except pyarrow.ArrowException as error:
            raise GlmEngineError(f"--dataset_path {path} is not a parquet file ({error})") from None
    raise GlmEngineError(f"--dataset_path {path}: unknown format {suffix!r}; use .json, .jsonl, .csv, "
                         ".parquet or a datasets save_to_disk directory")


def _read_saved_dataset(path: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise GlmEngineError(f"--dataset_path {path} is a directory: reading a save_to_disk dataset needs the "
                             "datasets package (pip install datasets), or give a json/jsonl/csv file") from None
    try:
        saved = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GlmEngineError(f"--dataset_path {path} is not a datasets save_to_disk directory "
                             f"({first_line})") from None
    if isinstance(saved, datasets.DatasetDict):
        if "test" not in saved:
            raise GlmEngineError(f"--dataset_path {path} has splits {list(saved)}, no 'test' split")
        saved = saved["test"]
    return saved.to_list()


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, found with one quick attempt
    (the datasets library retries for half a minute and warns twice before failing)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
            "0", ""):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as error:
        return f"{host} is unreachable: {error.strerror or error}"
    return None


def _local_copy_hint() -> str:
    """What to pass instead of the hub: the bundled sample (as a path from the working
    directory where it lies under it), or any local copy."""
    if not BUNDLED_SAMPLE.is_file():  # an installed library without the repository's data
        return "pass --dataset_path with a local copy (json/jsonl/csv/parquet or a save_to_disk directory)"
    try:
        sample = BUNDLED_SAMPLE.relative_to(Path.cwd().resolve())
    except ValueError:
        sample = BUNDLED_SAMPLE
    return (f"pass --dataset_path {sample} (the bundled sample) or another local copy (json/jsonl/csv/parquet "
            "or a save_to_disk directory)")


def _read_hub_dataset() -> list[dict]:
    reason = _hub_unreachable()
    try:
        if reason is not None:
            raise ConnectionError(reason)
        import datasets

        return datasets.load_dataset(*HUB_DATASET, split="test").to_list()
    except Exception as error:  # noqa: BLE001 - offline, missing package or hub error alike
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GlmEngineError(f"cannot load {HUB_DATASET[0]} {HUB_DATASET[1]} from the Hugging Face hub "
                             f"({first_line}); {_local_copy_hint()}") from None


def load_articles(dataset_path: str | None) -> list[dict]:
    """Records with 'article' and 'highlights', in dataset order."""
    if dataset_path is None:
        records = _read_hub_dataset()
    else:
        path = Path(dataset_path)
        if not path.exists():
            raise GlmEngineError(f"--dataset_path {path}: no such file or directory")
        try:
            records = _read_saved_dataset(path) if path.is_dir() else _read_records(path)
        except (ValueError, RecursionError, csv.Error) as error:  # JSON, UTF-8, int digit limit, nesting
            raise GlmEngineError(f"--dataset_path {path} cannot be parsed ({str(error)[:200]})") from None
        except OSError as error:
            raise GlmEngineError(f"--dataset_path {path}: {error.strerror}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not {"article", "highlights"} <= record.keys():
            raise GlmEngineError(f"--dataset_path record {index} lacks 'article' and 'highlights'")
        if not all(isinstance(record[key], str) for key in ("article", "highlights")):
            raise GlmEngineError(f"--dataset_path record {index}: 'article' and 'highlights' must be text")
    if not records:
        raise GlmEngineError("the dataset holds no article")
    return records
