"""The tools under pressure and as a newcomer meets them: bounded memory whatever the
input, sampling values at their limits, a full disk, a closed pipe or stdout, the wrong
Python, the README's example from anywhere, and tools that say what they are doing."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError

# float32: its logits have no exact ties at the top, so sampling at a tiny temperature is greedy exactly.
ENGINE = [*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_batch_size", "2", "--max_input_len", "32",
          "--max_output_len", "8", "--random_seed", "7"]
MEMORY_CAP = 3 * 2**29  # bytes of address space for a tool fed endless input: 1.5 GiB, several times its need


def tool_env() -> dict[str, str]:
    """The environment conftest.run_tool gives a tool."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    return env


def tool_line(script: str, *args: object) -> str:
    """A shell command line running a tool with this Python."""
    return shlex.join([sys.executable, str(REPO_ROOT / script), *map(str, args)])


def run_in_process(script: str, *args: object, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """Runs a tool in this process, as `python script args` would (torch is loaded already,
    so it takes a fraction of a subprocess' time); its exit status, stdout and stderr."""
    import runpy

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], status, captured.out, captured.err)


def run_shell(command: str, memory: int | None = None, file_size: int | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs a shell command line under optional limits: address space (`memory` bytes, so
    that unbounded reading fails fast instead of filling the machine) and file size
    (`file_size` bytes: writing past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    def limit() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=tool_env(), cwd=REPO_ROOT,
                          preexec_fn=limit, timeout=timeout)


PROMPTS = [[1001, 1003, 30, 31, 32], [1001, 1003, 40, 41]]  # 1001, 1003: [gMASK] sop


@pytest.fixture(scope="module")
def engine(tiny_engine_factory, tiny_tokenizer_dir) -> Path:
    return tiny_engine_factory(*ENGINE, "--tokenizer_dir", tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def prompts_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    path.write_text("".join(",".join(map(str, prompt)) + "\n" for prompt in PROMPTS))
    return path


@pytest.fixture(scope="module")
def greedy_tokens(engine) -> list[list[int]]:
    """The engine's greedy tokens for PROMPTS, from the Python API."""
    from glm_engine.runtime.sampling import SamplingConfig
    from model import load_session

    outputs = load_session(engine, "cpu").generate(PROMPTS, SamplingConfig(max_new_tokens=8))
    return [output.token_ids for output in outputs]


def csv_rows(path: Path) -> list[list[int]]:
    return [[int(token) for token in line.split(",") if token] for line in path.read_text().splitlines()]


def tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its inode, size and modification time: a write, a
    replacement or a removal changes it."""
    return {str(path.relative_to(root)): (path.lstat().st_ino, path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in sorted(root.rglob("*"))}


# --- sampling values at their limits --------------------------------------------------------------


def test_a_tiny_temperature_samples_what_greedy_chooses_through_run_py(engine, prompts_csv, greedy_tokens, tmp_path,
                                                                      monkeypatch, capsys):
    tiny = run_in_process("run.py", "--engine_dir", engine, "--input_tokens", prompts_csv, "--max_output_len", "8",
                          "--temperature", "1e-40", "--random_seed", "3", "--output_csv", tmp_path / "tiny.csv",
                          "--output_log_probs", tmp_path / "log_probs.json", monkeypatch=monkeypatch, capsys=capsys)
    assert tiny.returncode == 0, tiny.stderr
    assert csv_rows(tmp_path / "tiny.csv") == greedy_tokens
    log_probs = json.loads((tmp_path / "log_probs.json").read_text())
    assert all(value == 0.0 for prompt in log_probs for value in prompt["log_probs"])  # the limit: certain


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_samples_what_greedy_chooses_through_the_session(engine, greedy_tokens, temperature):
    from glm_engine.runtime.sampling import SamplingConfig
    from model import load_session

    sampled = load_session(engine, "cpu").generate(PROMPTS, SamplingConfig(
        max_new_tokens=8, temperature=temperature, top_k=0, random_seed=5, output_log_probs=True))
    assert [output.token_ids for output in sampled] == greedy_tokens
    assert all(math.isfinite(value) for output in sampled for value in output.log_probs)


@pytest.mark.parametrize("field, value", [("repetition_penalty", 1e-300), ("repetition_penalty", 1e300),
                                          ("presence_penalty", 1e300), ("presence_penalty", -1e300),
                                          ("frequency_penalty", 1e300), ("frequency_penalty", -1e300)])
def test_penalties_that_would_overflow_the_logits_are_refused(field, value):
    from glm_engine.runtime.sampling import SamplingConfig

    with pytest.raises(GlmEngineError, match=f"{field} must be"):
        SamplingConfig(max_new_tokens=4, **{field: value})


def test_run_py_refuses_an_overflowing_penalty_in_one_line(engine, prompts_csv, monkeypatch, capsys):
    result = run_in_process("run.py", "--engine_dir", engine, "--input_tokens", prompts_csv, "--presence_penalty",
                            "1e300", monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(result, "presence_penalty must be within")


def test_a_temperature_alone_samples(engine, prompts_csv, greedy_tokens, tmp_path, monkeypatch, capsys):
    hot = run_in_process("run.py", "--engine_dir", engine, "--input_tokens", prompts_csv, "--max_output_len", "8",
                         "--temperature", "5", "--random_seed", "1", "--output_csv", tmp_path / "hot.csv",
                         monkeypatch=monkeypatch, capsys=capsys)
    assert hot.returncode == 0, hot.stderr
    assert csv_rows(tmp_path / "hot.csv") != greedy_tokens


@pytest.mark.parametrize("flags, expected", [
    ([], {"temperature": 1.0, "top_k": 1, "top_p": 0.0}),  # no sampling flag: greedy, as before
    (["--temperature", "0.7"], {"temperature": 0.7, "top_k": 0, "top_p": 0.0}),
    (["--top_p", "0.9"], {"temperature": 1.0, "top_k": 0, "top_p": 0.9}),
    (["--temperature", "0.7", "--top_k", "40"], {"temperature": 0.7, "top_k": 40, "top_p": 0.0}),
    (["--top_k", "1", "--temperature", "0.7"], "--temperature shapes sampling, which --top_k 1"),
    (["--top_k", "1", "--top_p", "0.5"], "--top_p shapes sampling, which --top_k 1"),
])
def test_run_py_samples_when_a_sampling_flag_is_given(flags, expected):
    import run
    from glm_engine.tools.cli import token_choice

    args = run.parse_arguments(flags)
    if isinstance(expected, str):
        with pytest.raises(GlmEngineError, match=re.escape(expected)):
            token_choice(args)
    else:
        assert token_choice(args) == expected
