"""Data safety: build.py never deletes or replaces what it did not write, survives being
killed, and takes turns with concurrent builds; engines are checked as a whole; files
are read from inside their directories only; outputs are written without replacing
devices or leaving half files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.engine_format.engine import config_digest
from glm_engine.tools.output_file import check_output_file, output_stream

SMALL = [*TINY_SHAPE_FLAGS, "--max_input_len", "8", "--max_output_len", "4"]


def tree(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its type, mode, inode, size and modification time
    (links not followed): a write, a replacement or a removal changes the tree."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        entries[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_ino,
                                                info.st_size, info.st_mtime_ns,
                                                os.readlink(path) if path.is_symlink() else None)
    return entries


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


@pytest.fixture
def checkpoint(tiny_checkpoint_factory, tmp_path) -> Path:
    """A private copy of a tiny checkpoint holding files of the user's besides the model's."""
    model_dir = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint_factory("single_safetensors", seed=41), model_dir)
    (model_dir / "README.md").write_text("my notes\n")
    (model_dir / "modeling_chatglm.py").write_text("# the checkpoint's code\n")
    return model_dir


@pytest.mark.parametrize("output", ["checkpoint", "checkpoint/engine", "."])
def test_build_never_writes_into_or_over_the_checkpoint(checkpoint, tmp_path, output):
    before = tree(tmp_path)
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", tmp_path / output)
    assert_one_line_error(result, "is, holds or lies inside --model_dir")
    assert tree(tmp_path) == before


def test_build_never_replaces_the_tokenizer_dir(tmp_path, tiny_tokenizer_dir):
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(tiny_tokenizer_dir, tokenizer_dir)
    before = tree(tmp_path)
    result = run_tool("build.py", *SMALL, "--tokenizer_dir", tokenizer_dir, "--output_dir", tokenizer_dir)
    assert_one_line_error(result, "is, holds or lies inside --tokenizer_dir")
    assert tree(tmp_path) == before


def test_a_directory_that_is_not_our_engine_is_never_replaced(checkpoint, tmp_path):
    """A copy of a checkpoint elsewhere has a config.json too: not an engine."""
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    before = tree(tmp_path)
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", other)
    assert_one_line_error(result, "is not an engine that build.py wrote")
    assert tree(tmp_path) == before


def test_an_engine_is_replaced_only_while_it_holds_nothing_else(checkpoint, tmp_path):
    engine_dir = tmp_path / "engine"
    assert run_tool("build.py", "--model_dir", checkpoint, "--output_dir", engine_dir).returncode == 0
    first = tree(engine_dir)
    (engine_dir / "results.txt").write_text("the user's file\n")
    before = tree(tmp_path)
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", engine_dir, "--dtype", "float32")
    assert_one_line_error(result, "holds 'results.txt', which build.py did not write")
    assert tree(tmp_path) == before
    (engine_dir / "results.txt").unlink()
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", engine_dir, "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert tree(engine_dir) != first and json.loads((engine_dir / "config.json").read_text())["build"]["dtype"] == \
        "float32"
    assert hidden_leftovers(tmp_path) == []


def test_an_empty_output_dir_is_used_and_a_file_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run_tool("build.py", *SMALL, "--output_dir", tmp_path / "empty").returncode == 0
    assert (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    before = tree(tmp_path)
    assert_one_line_error(run_tool("build.py", *SMALL, "--output_dir", tmp_path / "file"), "is not a directory")
    assert tree(tmp_path) == before


def write_prompts(directory: Path) -> Path:
    (directory / "prompts.csv").write_text("5,6\n")
    return directory / "prompts.csv"


def wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


BIG = ["--n_layer", "2", "--n_embd", "1024", "--n_head", "8", "--multi_query_group_num", "2", "--inter_size",
       "2048", "--vocab_size", "32768", "--max_input_len", "8", "--max_output_len", "4"]


def start_build(*flags: object) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "build.py"), *map(str, flags)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGTERM])
def test_a_build_killed_mid_write_keeps_the_old_engine_and_the_next_build_cleans_up(tmp_path, kill_signal):
    engine_dir = tmp_path / "engine"
    assert run_tool("build.py", *SMALL, "--output_dir", engine_dir).returncode == 0
    old = tree(engine_dir)
    process = start_build(*BIG, "--output_dir", engine_dir)
    def writing() -> bool:
        try:
            return any(path.stat().st_size for path in tmp_path.glob(".engine.building-*/rank0.safetensors"))
        except FileNotFoundError:
            return False

    wait_for(lambda: writing() or process.poll() is not None)
    process.send_signal(kill_signal)
    process.wait()
    assert process.returncode == -kill_signal or (kill_signal == signal.SIGTERM and process.returncode == 143), \
        process.stderr.read()
    assert tree(engine_dir) == old
    # SIGTERM cleans up at once; SIGKILL leaves the staging directory to the next load or build.
    assert bool(hidden_leftovers(tmp_path)) == (kill_signal == signal.SIGKILL)
    result = run_tool("run.py", "--engine_dir", engine_dir, "--input_tokens", write_prompts(tmp_path),
                      "--max_output_len", "2")
    assert result.returncode == 0, result.stderr
    assert hidden_leftovers(tmp_path) == []
    (tmp_path / ".engine.building-stale").mkdir()  # as a killed build leaves it: unlocked
    (tmp_path / ".engine.building-stale" / "rank0.safetensors").write_bytes(b"partial")
    result = run_tool("build.py", *SMALL, "--output_dir", engine_dir, "--random_seed", "5")
    assert result.returncode == 0, result.stderr
    assert tree(engine_dir) != old
    assert hidden_leftovers(tmp_path) == []


def test_a_swap_killed_between_its_renames_is_named_by_loading_and_restored_by_building(checkpoint, tmp_path):
    engine_dir = tmp_path / "engine"
    assert run_tool("build.py", *SMALL, "--output_dir", engine_dir).returncode == 0
    old = tree(engine_dir)
    hidden = tmp_path / ".engine.old-4242"
    engine_dir.rename(hidden)  # what a kill between the two renames leaves
    result = run_tool("run.py", "--engine_dir", engine_dir, "--max_output_len", "2")
    assert_one_line_error(result, f"left the previous engine at {hidden}")
    before = tree(tmp_path)  # a build refused for its input touches nothing
    assert_one_line_error(run_tool("build.py", *SMALL, "--output_dir", engine_dir, "--tokenizer_dir",
                                   tmp_path / "nowhere"), "holds no tokenizer.model")
    assert tree(tmp_path) == before
    (checkpoint / "model.safetensors").write_bytes(b"damaged")  # fails after the old engine is restored
    assert_one_line_error(run_tool("build.py", "--model_dir", checkpoint, "--output_dir", engine_dir),
                          "cannot read weights file")
    assert tree(engine_dir) == old and hidden_leftovers(tmp_path) == []


def test_concurrent_builds_of_one_output_dir_take_turns(tmp_path):
    engine_dir = tmp_path / "engine"
    processes = [start_build(*SMALL, "--output_dir", engine_dir, "--random_seed", seed) for seed in range(3)]
    for process in processes:
        process.wait()
        assert process.returncode == 0, process.stderr.read()
    assert hidden_leftovers(tmp_path) == []
    (tmp_path / "p.csv").write_text("5,6\n")
    assert run_tool("run.py", "--engine_dir", engine_dir, "--input_tokens", tmp_path / "p.csv",
                    "--max_output_len", "2").returncode == 0


# --- the engine checked as a whole --------------------------------------------------------------


@pytest.fixture
def engine_copy(tiny_engine_factory, tiny_tokenizer_dir, tmp_path) -> Path:
    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_engine_factory(*SMALL, "--tokenizer_dir", tiny_tokenizer_dir), engine_dir)
    return engine_dir


def edit_config(engine_dir: Path, edit, sign: bool) -> None:
    config = json.loads((engine_dir / "config.json").read_text())
    edit(config)
    if sign:  # as if the edit came with a matching checksum: the tensors still disagree
        config["config_sha256"] = config_digest(config)
    (engine_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, sign, message", [
    ("num_layers", 3, False, "config.json fails its sha256 check"),
    ("num_layers", 3, True, "tensor 'layers.2.input_layernorm.weight' is absent"),
    ("vocab_size", 2048, True, "tensor 'output_layer.weight' is F16 [1024, 64]"),
    ("kv_channels", 32, True, "tensor 'layers.0.self_attention.dense.weight' is F16 [64, 64]"),
    ("dtype", "float32", True, "tensor 'final_layernorm.weight' is F16 [64] but its config.json implies F32"),
    ("hidden_size", 64.0, True, "hidden_size must be an integer, got 64.0"),
    ("max_batch_size", "4", True, "max_batch_size must be an integer, got '4'"),
])
def test_an_edited_engine_config_is_refused_before_any_tensor_is_used(engine_copy, field, value, sign, message):
    section = "build" if field in ("dtype", "max_batch_size") else "model"
    edit_config(engine_copy, lambda config: config[section].__setitem__(field, value), sign)
    result = run_tool("run.py", "--engine_dir", engine_copy, "--max_output_len", "2")
    assert_one_line_error(result, message)


def test_a_changed_tokenizer_file_fails_its_checksum(engine_copy):
    with open(engine_copy / "tokenizer.model", "ab") as stream:
        stream.write(b"\0")
    result = run_tool("run.py", "--engine_dir", engine_copy, "--max_output_len", "2")
    assert_one_line_error(result, "tokenizer.model has")


@pytest.mark.parametrize("edit, message", [
    (lambda config: config.update(hidden_size=64.0), "hidden_size must be an integer, got 64.0"),
    (lambda config: config.update(num_layers=True), "num_layers must be an integer, got True"),
    (lambda config: config.update(layernorm_epsilon="x"), "layernorm_epsilon must be a finite number"),
    (lambda config: config.update(eos_token_id=[]), "eos_token_id must be an integer, got []"),
    (lambda config: config.update(rmsnorm="yes"), "rmsnorm must be true or false"),
])
def test_wrongly_typed_checkpoint_configs_are_refused(checkpoint, tmp_path, edit, message):
    config = json.loads((checkpoint / "config.json").read_text())
    edit(config)
    (checkpoint / "config.json").write_text(json.dumps(config))
    before = tree(tmp_path)
    assert_one_line_error(run_tool("build.py", "--model_dir", checkpoint, "--output_dir", tmp_path / "engine"),
                          message)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("value, dtype, message", [(float("nan"), "float32", "holds NaN or Inf"),
                                                   (1e6, "float16", "overflows torch.float16")])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, value, dtype, message):
    from safetensors.torch import load_file, save_file

    state = load_file(checkpoint / "model.safetensors")
    state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"][0, 0] = value
    save_file(state, checkpoint / "model.safetensors")
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", tmp_path / "engine", "--dtype", dtype)
    assert_one_line_error(result, f"tensor 'transformer.encoder.layers.1.mlp.dense_4h_to_h.weight' in {checkpoint} "
                                  f"{message}")
    assert not (tmp_path / "engine").exists() and hidden_leftovers(tmp_path) == []


# --- files from inputs ----------------------------------------------------------------------------


def test_a_tokenizer_file_linking_outside_the_checkpoint_is_never_copied(checkpoint, tmp_path):
    (tmp_path / "secret.txt").write_text("password\n")
    (checkpoint / "tokenizer_config.json").symlink_to(tmp_path / "secret.txt")
    before = tree(tmp_path)
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", tmp_path / "engine")
    assert_one_line_error(result, "tokenizer file 'tokenizer_config.json'")
    assert "resolves outside it" in result.stderr
    assert tree(tmp_path) == before


def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(tiny_checkpoint_factory, tmp_path):
    model_dir = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint_factory("safetensors", seed=42), model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    shutil.copy(model_dir / index["weight_map"][first], tmp_path / "elsewhere.safetensors")
    index["weight_map"] = {name: "../elsewhere.safetensors" if shard == index["weight_map"][first] else shard
                           for name, shard in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    result = run_tool("build.py", "--model_dir", model_dir, "--output_dir", tmp_path / "engine")
    assert_one_line_error(result, "weights file '../elsewhere.safetensors'")


def test_a_hub_cache_snapshot_builds_through_its_links(tiny_checkpoint_factory, tmp_path):
    """The Hugging Face cache keeps a snapshot's files as links into the repository's blobs/."""
    source = tiny_checkpoint_factory("safetensors", seed=43)
    repo = tmp_path / "models--THUDM--chatglm2-6b"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.name.encode()).hexdigest()
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("../..") / "blobs" / blob.name)
    result = run_tool("build.py", "--model_dir", snapshot, "--output_dir", tmp_path / "engine")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "engine" / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    assert not (tmp_path / "engine" / "tokenizer.model").is_symlink()


# --- output files ------------------------------------------------------------------------------


def test_output_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path):
    umask = os.umask(0o027)
    try:
        with output_stream(tmp_path / "new.csv", "--output_csv") as stream:
            stream.write("1\n")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o640
    (tmp_path / "new.csv").chmod(0o604)
    with output_stream(tmp_path / "new.csv", "--output_csv") as stream:
        stream.write("2\n")
    assert (tmp_path / "new.csv").read_text() == "2\n"
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o604
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.csv"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    (tmp_path / "out.json").write_text("old")
    with pytest.raises(RuntimeError), output_stream(tmp_path / "out.json", "--output_json") as stream:
        stream.write("half")
        raise RuntimeError
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]
    assert (tmp_path / "out.json").read_text() == "old"


def test_run_writes_into_a_fifo_without_replacing_it(tiny_engine_factory, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    (tmp_path / "p.csv").write_text("5,6,7\n")
    result = run_tool("run.py", "--engine_dir", tiny_engine_factory(*SMALL), "--input_tokens", tmp_path / "p.csv",
                      "--max_output_len", "3", "--output_csv", fifo)
    reader.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert len(received[0].strip().split(",")) == 3


@pytest.mark.parametrize("path, message", [("missing/out.csv", "does not exist; create it first"),
                                           (".", "is a directory")])
def test_bad_output_paths_are_refused_before_any_work(tmp_path, path, message):
    with pytest.raises(GlmEngineError, match=message):
        check_output_file(tmp_path / path, "--output_csv")
    check_output_file("/dev/null", "--output_csv")  # a device: written straight, never replaced


def test_benchmark_refuses_a_bad_output_path_before_measuring(tiny_engine_factory, tmp_path):
    started = time.monotonic()
    result = run_tool("benchmark.py", "--engine_dir", tiny_engine_factory(*SMALL), "--input_len", "4",
                      "--output_len", "2", "--device", "cpu", "--plot", tmp_path / "missing" / "plot.png")
    assert_one_line_error(result, "--plot")
    assert "glm_engine" not in result.stdout and time.monotonic() - started < 60
    assert list(tmp_path.iterdir()) == []


def test_weights_only_pickles_are_refused_without_advice_to_unpickle(checkpoint, tmp_path):
    (checkpoint / "model.safetensors").unlink()
    torch.save({"transformer.embedding.word_embeddings.weight": torch.zeros(2), "code": Path("x")},
               checkpoint / "pytorch_model.bin")
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", tmp_path / "engine")
    assert_one_line_error(result, "holds pickled objects other than tensors")
    assert "weights_only=False" not in result.stderr and "weights_only` set to `False" not in result.stderr
