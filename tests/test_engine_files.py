"""What an engine was checked to be at load is what it runs: its weights live in the
process's own memory (a later change of its files reaches nothing), and config.json's
file list and checksums are checked like its other fields. CPU sessions' threads, and
static engines given more sequences than their max_batch_size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.engine_format.engine import config_digest, load_engine

TINY32 = [*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_input_len", "32", "--max_output_len", "16"]
CHUNK = 64 << 20  # the chunk size build.py writes checksums in


def run_python(code: str, *args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter on the CPU, as a program using the library would run it;
    `env` sets variables over this process's (None: unset)."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    environment = {key: value for key, value in environment.items() if value is not None}
    environment.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=environment, cwd=REPO_ROOT, timeout=300)


@pytest.fixture
def engine_copy(tiny_engine_factory, tmp_path) -> Path:
    """A tiny float32 engine of this test's own, free to edit."""
    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_engine_factory(*TINY32, "--random_seed", "1"), engine_dir)
    return engine_dir


# --- the weights loaded stay what was verified ----------------------------------------------------

SERVE_THEN_CHANGE_THE_FILE = """
import json, os, sys
from model import load_session
from glm_engine.runtime.sampling import SamplingConfig
served, other = sys.argv[1], sys.argv[2]
weights_file = os.path.join(served, "rank0.safetensors")
sampling = SamplingConfig(max_new_tokens=8, end_id=-1)
tokens = lambda session: session.generate([[5, 6, 7, 8]], sampling)[0].token_ids
session = load_session(served, "cpu")
report = {"before": tokens(session), "other": tokens(load_session(other, "cpu"))}
report["mapped"] = any(weights_file in line for line in open("/proc/self/maps"))
with open(weights_file, "r+b") as stream:  # another engine's bytes over the served file, in place
    stream.write(open(os.path.join(other, "rank0.safetensors"), "rb").read())
report["overwritten"] = tokens(session)
os.truncate(weights_file, 0)
report["truncated"] = tokens(session)
print(json.dumps(report))
"""


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc/self/maps")
def test_a_loaded_engine_keeps_its_tokens_when_its_weights_file_is_overwritten_or_truncated(
        engine_copy, tiny_engine_factory):
    """Overwriting the served rank file with another engine's changes nothing the session
    generates, truncating it does not kill the process, and no engine file stays mapped."""
    other = tiny_engine_factory(*TINY32, "--random_seed", "2")
    result = run_python(SERVE_THEN_CHANGE_THE_FILE, engine_copy, other)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["other"] != report["before"]  # the other engine's weights would show
    assert report["overwritten"] == report["truncated"] == report["before"]
    assert not report["mapped"]


# --- config.json's file list and checksums ---------------------------------------------------------


def rank0(config: dict) -> dict:
    return config["checksums"]["rank0.safetensors"]


BAD_FILE_FIELDS = [
    (lambda c: rank0(c).update(chunk_bytes=1), "checksums['rank0.safetensors'].chunk_bytes is 1"),
    (lambda c: rank0(c).update(chunk_bytes=0), "checksums['rank0.safetensors'].chunk_bytes is 0"),
    (lambda c: rank0(c).update(chunk_bytes=1.5), "chunk_bytes is 1.5"),
    (lambda c: rank0(c).update(chunk_bytes=-CHUNK, chunk_sha256=[]), f"chunk_bytes is {-CHUNK}"),
    (lambda c: rank0(c).update(chunk_bytes=None), "chunk_bytes is None"),
    (lambda c: rank0(c).update(chunk_bytes=str(CHUNK)), f"chunk_bytes is '{CHUNK}'"),
    (lambda c: rank0(c).update(chunk_bytes=float(CHUNK)), f"chunk_bytes is {float(CHUNK)}"),
    (lambda c: c["checksums"]["tokenizer.model"].update(chunk_bytes=1),
     "checksums['tokenizer.model'].chunk_bytes is 1"),
    (lambda c: rank0(c).update(chunk_sha256=None), "checksums['rank0.safetensors'].chunk_sha256"),
    (lambda c: rank0(c).update(chunk_sha256=[]), "checksums['rank0.safetensors'].chunk_sha256"),
    (lambda c: rank0(c).update(chunk_sha256=[1]), "checksums['rank0.safetensors'].chunk_sha256"),
    (lambda c: rank0(c).update(size=-1), "checksums['rank0.safetensors'].size is -1"),
    (lambda c: rank0(c).update(size="774096"), "checksums['rank0.safetensors'].size is '774096'"),
    (lambda c: rank0(c).update(sha256=None), "checksums['rank0.safetensors'].sha256"),
    (lambda c: c["checksums"].update({"rank0.safetensors": None}), "checksums['rank0.safetensors'] is None"),
    (lambda c: c.pop("checksums"), "config.json has no 'checksums'"),
    (lambda c: c.update(checksums=None), "'checksums' is None"),
    (lambda c: c.update(checksums=[]), "'checksums' is []"),
    (lambda c: c.update(tokenizer_files=None), "'tokenizer_files' is None"),
    (lambda c: c.pop("tokenizer_files"), "config.json has no 'tokenizer_files'"),
    (lambda c: c.update(tokenizer_files="tokenizer.model"), "'tokenizer_files' is 'tokenizer.model'"),
    (lambda c: c.update(tokenizer_files=[7]), "tokenizer file 7 is not a file name"),
    (lambda c: c.update(tokenizer_files=["../engine/tokenizer.model"]),
     "tokenizer file '../engine/tokenizer.model' is not a file name"),
    (lambda c: c.update(tokenizer_files=["extra.model"]), "tokenizer file 'extra.model' has no checksums"),
]


@pytest.mark.parametrize("edit, message", BAD_FILE_FIELDS, ids=[message for _, message in BAD_FILE_FIELDS])
def test_a_bad_file_list_or_checksum_field_is_refused_in_one_line(engine_copy, edit, message):
    """config.json re-signed with a field that steers the loader out of range or of the
    wrong type: refused before any weight is read, naming the field."""
    config = json.loads((engine_copy / "config.json").read_text())
    edit(config)
    config["config_sha256"] = config_digest(config)
    (engine_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlmEngineError) as refused:
        load_engine(engine_copy)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert "rebuild" in str(refused.value)


def test_run_py_refuses_a_one_byte_checksum_chunk_in_one_line(engine_copy):
    config = json.loads((engine_copy / "config.json").read_text())
    rank0(config)["chunk_bytes"] = 1
    config["config_sha256"] = config_digest(config)
    (engine_copy / "config.json").write_text(json.dumps(config))
    result = run_tool("run.py", "--engine_dir", engine_copy, "--max_output_len", "2", "--device", "cpu")
    assert_one_line_error(result, "checksums['rank0.safetensors'].chunk_bytes is 1")


# --- CPU threads ----------------------------------------------------------------------------------

REPORT_THREADS = """
import sys, torch
from model import load_session
load_session(sys.argv[1], "cpu")
print(torch.get_num_threads())
"""


def test_a_cpu_session_computes_on_half_the_cores_it_may_use(engine_copy):
    """Without OMP_NUM_THREADS, a CPU session leaves half the cores to the other processes
    (beside a busy process, two threads decoded many times slower than one on two cores);
    with it, the launcher's count stands."""
    chosen = run_python(REPORT_THREADS, engine_copy, env={"OMP_NUM_THREADS": None})
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    assert int(chosen.stdout.split()[-1]) == max(1, len(os.sched_getaffinity(0)) // 2)
    given = run_python(REPORT_THREADS, engine_copy, env={"OMP_NUM_THREADS": "1"})  # as torchrun sets it
    assert given.returncode == 0, given.stderr[-2000:]
    assert int(given.stdout.split()[-1]) == 1


# --- static engines: more sequences than max_batch_size --------------------------------------------


def test_run_py_beam_searches_more_prompts_than_a_static_batch_holds_as_each_alone(engine_copy, tmp_path):
    """3 prompts x 4 beams on a static engine of max_batch_size 8 run in successive batches,
    each prompt's beams those it gets alone."""
    from glm_engine.runtime.sampling import SamplingConfig
    from model import load_session

    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    (tmp_path / "prompts.csv").write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    result = run_tool("run.py", "--engine_dir", engine_copy, "--input_tokens", tmp_path / "prompts.csv",
                      "--max_output_len", "8", "--num_beams", "4", "--num_return_sequences", "2",
                      "--device", "cpu", "--output_csv", tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    rows = [[int(token) for token in line.split(",") if token]
            for line in (tmp_path / "out.csv").read_text().splitlines()]
    session = load_session(engine_copy, "cpu")
    sampling = SamplingConfig(max_new_tokens=8, end_id=session.model_config.eos_token_id, num_beams=4,
                              num_return_sequences=2)
    alone = [ids for prompt in prompts for ids in session.generate([prompt], sampling)[0].returned]
    assert rows == alone
    batched = session.generate(prompts, sampling)
    assert [ids for output in batched for ids in output.returned] == alone
