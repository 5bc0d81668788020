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


# --- bounded memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("source, message", [
    ("/dev/zero", "line 1 runs past"),  # one endless line
    ("<(yes 5)", "prompts or 16777216 tokens, more than one run takes"),  # endless prompts
])
def test_run_py_checks_its_prompt_file_while_reading_it(engine, source, message):
    start = time.perf_counter()
    result = run_shell(tool_line("run.py", "--engine_dir", engine) + f" --input_tokens {source}", memory=MEMORY_CAP)
    assert_one_line_error(result, message)
    assert time.perf_counter() - start < 60


def test_benchmark_refuses_more_requests_than_a_run_can_hold_before_making_them(engine):
    result = run_shell(tool_line("benchmark.py", "--engine_dir", engine, "--mode", "throughput", "--num_requests",
                                 "1000000000", "--input_len_range", "4", "8", "--output_len", "2"), memory=MEMORY_CAP)
    assert_one_line_error(result, "--num_requests 1000000000")


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


# --- a full disk, a closed pipe, a closed stdout --------------------------------------------------


def test_a_full_device_under_output_csv_is_one_line(engine, prompts_csv, monkeypatch, capsys):
    result = run_in_process("run.py", "--engine_dir", engine, "--input_tokens", prompts_csv, "--output_csv",
                            "/dev/full", monkeypatch=monkeypatch, capsys=capsys)
    assert_one_line_error(result, "No space left on device")


def test_a_build_stopped_by_a_full_disk_is_one_line_and_keeps_the_old_engine(engine, tmp_path):
    import shutil

    engine_dir = tmp_path / "engine"
    shutil.copytree(engine, engine_dir)  # an engine build.py wrote: a new build may replace it
    old = tree(engine_dir)
    result = run_shell(tool_line("build.py", *TINY_SHAPE_FLAGS, "--output_dir", engine_dir, "--random_seed", "9",
                                 "--log_level", "error"), file_size=100_000)
    assert_one_line_error(result, "File too large")
    assert tree(engine_dir) == old and sorted(path.name for path in tmp_path.iterdir()) == ["engine"]


def test_run_py_stops_quietly_when_the_reader_of_its_output_goes_away(engine, prompts_csv):
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "run.py"), "--engine_dir", str(engine),
                                "--input_tokens", str(prompts_csv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=tool_env(), cwd=REPO_ROOT)
    process.stdout.close()  # as `| head -c 10` does once it has its bytes
    stderr = process.stderr.read()
    assert process.wait(timeout=120) in (1, 141)
    assert stderr == ""


def test_run_py_with_stdout_closed_says_so_in_one_line(engine, prompts_csv):
    result = run_shell(tool_line("run.py", "--engine_dir", engine, "--input_tokens", prompts_csv) + " >&-")
    assert_one_line_error(result, "standard output is closed")


# --- as a newcomer meets them ---------------------------------------------------------------------


@pytest.mark.parametrize("command", ["build.py --help", "run.py --help", "summarize.py --help",
                                     "benchmark.py --engine_dir nowhere", "serve.py --engine_dir nowhere"])
def test_a_python_without_the_dependencies_is_told_to_use_the_venv(command):
    script, *args = command.split()
    # -S: no site-packages, as a bare system python3 has none of the project's packages.
    result = subprocess.run([sys.executable, "-S", str(REPO_ROOT / script), *args], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=tool_env(), timeout=120)
    assert_one_line_error(result, ".venv/bin/python")


def test_the_readme_python_example_runs_from_any_directory(tmp_path):
    """As a user of the installed package: its own directory, no PYTHONPATH, so only
    glm_engine imports (not the repository's root files), on the engine the README builds."""
    readme = (REPO_ROOT / "README.md").read_text()
    flags = re.search(r"python build\.py (.*--output_dir tiny_engine)\n", readme).group(1)
    assert run_tool("build.py", *shlex.split(flags), "--log_level", "error", cwd=tmp_path).returncode == 0
    example = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    env = {key: value for key, value in tool_env().items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_benchmark_says_what_it_is_doing_and_that_the_cpu_has_no_peak_memory(engine, tmp_path):
    result = run_tool("benchmark.py", "--engine_dir", engine, "--batch_size", "1", "2", "--input_len", "4",
                      "--output_len", "2", "--repeats", "1", "--device", "cpu", "--output_json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("benchmark.py: ")]
    assert any("loading the engine" in line for line in progress)
    assert all(any(f"batch {size}:" in line for line in progress) for size in (1, 2))
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("glm_engine")]
    assert "peak GiB" in result.stdout and [row[-1] for row in rows] == ["n/a", "n/a"]
    assert all(row["peak_gib"] is None for row in json.loads((tmp_path / "r.json").read_text())["rows"])


def test_summarize_offline_names_the_bundled_sample(engine, monkeypatch, capsys):
    result = run_in_process("summarize.py", "--engine_dir", engine, "--max_ite", "1", monkeypatch=monkeypatch,
                            capsys=capsys)
    assert_one_line_error(result, "--dataset_path data/cnn_dailymail_sample.jsonl")


def test_run_py_labels_blocks_alike_streaming_or_not_and_ends_with_a_summary(engine, tmp_path, monkeypatch, capsys):
    common = ["--engine_dir", engine, "--max_output_len", "6", "--input_text", "Hello", "北京"]
    plain = run_in_process("run.py", *common, "--output_csv", tmp_path / "out.csv", monkeypatch=monkeypatch,
                           capsys=capsys)
    streamed = run_in_process("run.py", *common, "--streaming", monkeypatch=monkeypatch, capsys=capsys)
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    blocks = lambda text: sorted(re.findall(r"Input.*?--->\n\t.*\n\nOutput.*?--->\n\t.*\n", text))  # noqa: E731
    assert len(blocks(plain.stdout)) == 2 and blocks(plain.stdout) == blocks(streamed.stdout)
    tokens = sum(len(row) for row in csv_rows(tmp_path / "out.csv"))
    summary = plain.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"run\.py: 2 prompts, {tokens} tokens generated in [0-9.]+ s \([0-9.]+ tokens/s\); "
                        rf"--output_csv {re.escape(str(tmp_path / 'out.csv'))}", summary), summary
    assert streamed.stderr.strip().splitlines()[-1].startswith("run.py: 2 prompts, ")
