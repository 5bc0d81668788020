"""Tensor parallelism on the CPU (gloo): engines of a tiny checkpoint split over 2 and
4 ranks give the 1-rank engine's greedy tokens and logits, --parallel_build writes the
serial build's bytes, the tools run under torchrun (rank 0 prints), and the errors of
a wrong launch are one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, assert_one_line_error, run_tool
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine_format.layout import engine_tensor_specs
from glm_engine.engine_format.layout import linear_weight_names
from glm_engine.quantization import WeightOnly, linear_method, quantize_weights
from glm_engine.runtime import distributed
from glm_engine.runtime.distributed import Launch, launch_from_environment, rank_device
from glm_engine.engine_format.tensor_parallel import check_world_size, merge_weights, split_weights
from weight import dummy_weights

TINY = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                   ffn_hidden_size=96, vocab_size=1022, seq_length=256)
# The tiny checkpoint with a vocabulary 4 does not divide: the last rank's output rows are padded.
VOCAB = 1022


def torchrun(ranks: int, script: str, *args: object) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node ranks script args` on the CPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(REPO_ROOT / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory("safetensors", seed=5, padded_vocab_size=VOCAB)


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    """(flags, world size) -> engine directory, built once."""
    built = {}

    def make(world_size: int, *flags: str) -> Path:
        key = (world_size, flags)
        if key not in built:
            output_dir = tmp_path_factory.mktemp("tp_engine") / "engine"
            result = run_tool("build.py", "--model_dir", checkpoint, "--dtype", "float32", "--max_input_len", "32",
                              "--max_output_len", "16", "--max_batch_size", "4", "--world_size", world_size,
                              "--output_dir", output_dir, "--log_level", "error", *flags)
            assert result.returncode == 0, result.stderr
            built[key] = output_dir
        return built[key]

    return make


def quantized_build(precision: str | None, **fields) -> BuildConfig:
    """A float32 build storing the decoder linears as `precision` says (None, int8, int4, fp8)."""
    if precision == "fp8":
        return BuildConfig(dtype="float32", enable_fp8=True, **fields)
    return BuildConfig(dtype="float32", weight_only_precision=precision, **fields)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("precision", [None, "int8", "int4", "fp8"])
def test_rank_slices_have_the_layout_shapes(world_size, precision):
    build = quantized_build(precision, world_size=world_size)
    weights = quantize_weights(dummy_weights(TINY, torch.float32, 0), linear_weight_names(TINY), linear_method(build))
    specs = engine_tensor_specs(TINY, build)
    for rank in range(world_size):
        shard = split_weights(weights, TINY, world_size, rank)
        assert {name: (tuple(t.shape), t.dtype) for name, t in shard.items()} == specs


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("precision", [None, "int4", "fp8"])
def test_merging_the_rank_slices_gives_the_whole_model(world_size, precision):
    """What the Hugging Face reference of a tensor-parallel engine is built from."""
    weights = quantize_weights(dummy_weights(TINY, torch.float32, 0), linear_weight_names(TINY),
                               linear_method(quantized_build(precision)))
    merged = merge_weights([split_weights(weights, TINY, world_size, rank) for rank in range(world_size)], TINY)
    assert merged.keys() == weights.keys()
    as_bytes = {torch.float8_e4m3fn: torch.uint8}  # (torch.equal takes no float8 on the CPU)
    assert all(torch.equal(merged[name].view(as_bytes.get(tensor.dtype, tensor.dtype)),
                           tensor.view(as_bytes.get(tensor.dtype, tensor.dtype))) for name, tensor in weights.items())


@pytest.mark.parametrize("world_size", [1, 2])
def test_group_scales_split_with_their_columns(world_size):
    """--weight_only_group_size 32: the row-parallel layers' scales per group of input
    columns go to the rank holding those columns, so each rank's slice dequantizes to its
    share of the whole weight; the shapes are the layout's and merging restores the model."""
    import dataclasses

    from glm_engine.kernels import reference

    config = dataclasses.replace(TINY, ffn_hidden_size=128)  # 64 MLP channels per rank: whole groups
    check_world_size(config, world_size, "int4", 32)
    weights = quantize_weights(dummy_weights(config, torch.float32, 0), linear_weight_names(config),
                               WeightOnly("int4", 32))
    build = BuildConfig(dtype="float32", world_size=world_size, weight_only_precision="int4",
                        weight_only_group_size=32)
    specs = engine_tensor_specs(config, build)
    shards = [split_weights(weights, config, world_size, rank) for rank in range(world_size)]
    for shard in shards:
        assert {name: (tuple(t.shape), t.dtype) for name, t in shard.items()} == specs
    merged = merge_weights(shards, config)
    assert all(torch.equal(merged[name], weights[name]) for name in weights)
    for name in ("layers.0.self_attention.dense.weight", "layers.0.mlp.dense_4h_to_h.weight"):
        whole = reference.dequantize(weights[name], weights[name + "_scales"], 4, torch.float32)
        share = whole.shape[1] // world_size
        for rank, shard in enumerate(shards):
            assert torch.equal(reference.dequantize(shard[name], shard[name + "_scales"], 4, torch.float32),
                               whole[:, rank * share:(rank + 1) * share])


def test_key_value_groups_follow_the_query_heads():
    """4 ranks over 2 K/V groups: ranks 0 and 1 hold group 0, ranks 2 and 3 group 1."""
    weights = dummy_weights(TINY, torch.float32, 0)
    qkv = weights["layers.0.self_attention.query_key_value.weight"]
    q, d = TINY.q_size, TINY.kv_channels
    for rank in range(4):
        shard = split_weights(weights, TINY, 4, rank)["layers.0.self_attention.query_key_value.weight"]
        group = rank // 2
        assert torch.equal(shard[:d], qkv[rank * d:(rank + 1) * d])  # one query head each
        assert torch.equal(shard[d:2 * d], qkv[q + group * d:q + (group + 1) * d])
        assert torch.equal(shard[2 * d:], qkv[q + TINY.kv_size + group * d:q + TINY.kv_size + (group + 1) * d])


def run_worker(engine: Path, ranks: int, tmp_path: Path) -> dict:
    output = tmp_path / f"worker_{ranks}.pt"
    result = torchrun(ranks, "tests/tensor_parallel_worker.py", engine, output)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


@pytest.mark.parametrize("world_size,flags", [(2, ()), (4, ()), (2, ("--use_weight_only",))],
                         ids=["fp32-2", "fp32-4", "int8-2"])
def test_ranks_give_the_one_rank_tokens_and_logits(engines, tmp_path, world_size, flags):
    one = run_worker(engines(1, *flags), 1, tmp_path)
    many = run_worker(engines(world_size, *flags), world_size, tmp_path)
    assert many["tokens"] == one["tokens"]
    assert torch.allclose(many["logits"], one["logits"], rtol=0, atol=1e-5), \
        (many["logits"] - one["logits"]).abs().max()
    assert [len(tokens) for tokens in many["sampled"]] == [6, 6]  # unseeded sampling kept the ranks in step


def test_fp8_ranks_stay_close_to_one_rank(engines, tmp_path):
    """A row-parallel FP8 linear quantizes each rank's share of a token's inputs with a
    scale of its own, so the ranks' logits are close to one rank's, not equal."""
    from glm_engine.tools.compare import relative_error

    one = run_worker(engines(1, "--enable_fp8"), 1, tmp_path)
    two = run_worker(engines(2, "--enable_fp8"), 2, tmp_path)
    dense = run_worker(engines(1), 1, tmp_path)
    error = relative_error(two["logits"], one["logits"])
    assert 0 < error < relative_error(one["logits"], dense["logits"]), error


def test_int8_kv_cache_ranks_stay_close_to_one_rank(engines, tmp_path):
    """Each rank's K/V groups quantized with their scales from the one calibration."""
    from glm_engine.tools.compare import relative_error

    one = run_worker(engines(1, "--int8_kv_cache"), 1, tmp_path)
    two = run_worker(engines(2, "--int8_kv_cache"), 2, tmp_path)
    assert relative_error(two["logits"], one["logits"]) < 1e-3
    assert [len(tokens) for tokens in two["tokens"]] == [len(tokens) for tokens in one["tokens"]]


def test_parallel_build_writes_the_serial_bytes(engines, checkpoint, tmp_path):
    serial = engines(2)
    output_dir = tmp_path / "parallel"
    result = run_tool("build.py", "--model_dir", checkpoint, "--dtype", "float32", "--max_input_len", "32",
                      "--max_output_len", "16", "--max_batch_size", "4", "--world_size", "2", "--parallel_build",
                      "--output_dir", output_dir, "--log_level", "error")
    assert result.returncode == 0, result.stderr
    for name in ("rank0.safetensors", "rank1.safetensors"):
        assert (output_dir / name).read_bytes() == (serial / name).read_bytes()
    configs = [json.loads((path / "config.json").read_text()) for path in (serial, output_dir)]
    assert configs[0]["checksums"] == configs[1]["checksums"]
    assert configs[1]["build"]["world_size"] == 2


def test_run_py_under_torchrun_in_flight(engines, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("1000,1001,5,17,300\n9,8,7\n100,200,300,400,500,600,700\n42\n3,4\n")
    csv = {}
    for ranks in (1, 2):
        csv[ranks] = tmp_path / f"out{ranks}.csv"
        engine = engines(ranks, "--use_inflight_batching", "--max_batch_size", "2")
        if ranks == 1:
            result = run_tool("run.py", "--engine_dir", engine, "--input_tokens", prompts, "--output_csv", csv[ranks],
                              "--max_output_len", "8")
        else:
            result = torchrun(ranks, "run.py", "--engine_dir", engine, "--input_tokens", prompts, "--output_csv",
                              csv[ranks], "--max_output_len", "8")
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("Output --->") == 5  # printed once, by rank 0
    assert csv[2].read_text() == csv[1].read_text()


def test_an_engine_of_several_ranks_needs_its_launch(engines, tmp_path):
    (tmp_path / "prompt.csv").write_text("5,6,7\n")
    result = run_tool("run.py", "--engine_dir", engines(2), "--input_tokens", tmp_path / "prompt.csv")
    assert_one_line_error(result, "torchrun --nproc_per_node 2")


def test_a_launch_of_another_world_size_is_refused(engines, monkeypatch):
    from model import load_session

    for name, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(GlmEngineError, match="4 ranks were started but the engine was built with --world_size 2"):
        load_session(engines(2), "cpu")


def test_a_missing_rank_file_is_named_before_any_rank_waits(engines, tmp_path, monkeypatch):
    import shutil

    from model import load_session

    engine = tmp_path / "engine"
    shutil.copytree(engines(2), engine)
    (engine / "rank1.safetensors").unlink()
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(GlmEngineError, match="rank1.safetensors is missing"):
        load_session(engine, "cpu")  # rank 0, whose own file is there, fails without waiting for rank 1


def test_world_sizes_that_do_not_split_the_model_are_refused(checkpoint, tmp_path):
    result = run_tool("build.py", "--model_dir", checkpoint, "--world_size", "3", "--output_dir", tmp_path / "e")
    assert_one_line_error(result, "--world_size 3 does not divide the model's 4 attention heads")
    result = run_tool("build.py", "--parallel_build", "--output_dir", tmp_path / "e")
    assert_one_line_error(result, "--parallel_build converts the ranks of a --world_size N > 1 build")
    with pytest.raises(GlmEngineError, match="MLP's 96 channels"):
        check_world_size(ModelConfig(**{**TINY.to_dict(), "num_attention_heads": 128, "multi_query_group_num": 128,
                                        "kv_channels": 4}), 64)
    assert not list(tmp_path.iterdir())  # nothing written


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert rank_device(Launch(3, 4, 1, 2), None) == "cuda:1"
    with pytest.raises(GlmEngineError, match="4 ranks on this host but only 2 GPU"):
        rank_device(Launch(0, 4, 0, 4), None)
    with pytest.raises(GlmEngineError, match="not a GPU number"):
        rank_device(Launch(0, 2, 0, 2), "cuda:1")


def test_mpirun_variables_are_read(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert launch_from_environment() == Launch(1, 2, 1, 2)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "29500")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")  # two hosts of two ranks: rank 0's address is needed
    with pytest.raises(GlmEngineError, match="set MASTER_ADDR"):
        launch_from_environment()


def test_summarize_under_torchrun_agrees_with_hugging_face(tmp_path):
    """Rank 0 alone prints the scores and builds the Hugging Face side from the merged
    rank files; fp32 gives its tokens exactly."""
    engine = tmp_path / "engine"
    built = run_tool("build.py", "--output_dir", engine, "--dtype", "float32", "--world_size", "2", "--n_layer", "2",
                     "--n_embd", "64", "--n_head", "4", "--multi_query_group_num", "2", "--inter_size", "96",
                     "--vocab_size", "1024", "--max_input_len", "64", "--max_output_len", "8", "--log_level", "error")
    assert built.returncode == 0, built.stderr
    result = torchrun(2, "summarize.py", "--engine_dir", engine, "--dataset_path",
                      REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl", "--batch_size", "2", "--max_ite", "1",
                      "--output_len", "8", "--max_input_len", "64", "--data_type", "fp32", "--test_hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("glm_engine (total latency:") == 1
    assert "Token agreement: 100.0% of outputs identical" in result.stdout


def test_run_py_under_mpirun_variables(engines, tmp_path):
    """Ranks started as `mpirun -n 2` starts them (Open MPI's variables only; no mpirun
    here): they find each other through the defaults and give the one-rank tokens."""
    (tmp_path / "prompts.csv").write_text("9,8,7\n100,200,300\n")
    one = tmp_path / "one.csv"
    result = run_tool("run.py", "--engine_dir", engines(1), "--input_tokens", tmp_path / "prompts.csv",
                      "--output_csv", one, "--max_output_len", "6")
    assert result.returncode == 0, result.stderr
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "TRITON_INTERPRET")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT), MASTER_PORT="29531", OMPI_COMM_WORLD_SIZE="2",
               OMPI_COMM_WORLD_LOCAL_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, str(REPO_ROOT / "run.py"), "--engine_dir", engines(2), "--input_tokens",
                               tmp_path / "prompts.csv", "--output_csv", tmp_path / "mpi.csv", "--max_output_len", "6"],
                              env={**env, "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
             for rank in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    assert (tmp_path / "mpi.csv").read_text() == one.read_text()
    assert outputs[1][0] == ""  # rank 1 prints nothing


def test_benchmark_rate_mode_under_torchrun(engines, tmp_path):
    """Arrivals follow rank 0's clock: both ranks plan the same steps and every request
    completes with all its tokens (the benchmark checks that)."""
    engine = engines(2, "--use_inflight_batching", "--max_batch_size", "2")
    output = tmp_path / "rate.json"
    result = torchrun(2, "benchmark.py", "--engine_dir", engine, "--mode", "rate", "--request_rate", "50",
                      "--num_requests", "6", "--input_len_range", "4", "16", "--output_len", "4", "--device", "cpu",
                      "--output_json", output)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(output.read_text())["rows"][0]
    assert row["requests"] == 6 and row["blocks_free_at_end"] == row["blocks_total"]


def test_serve_py_under_torchrun_answers_with_the_one_rank_tokens(engines):
    """serve.py over 2 ranks: rank 0 serves HTTP, both step; concurrent requests (and one
    after an idle spell longer than the idle turn) give the one-rank engine's greedy
    tokens; SIGTERM to torchrun ends every rank."""
    import signal
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from glm_engine.runtime.sampling import SamplingConfig
    from glm_engine.text.tokenizer import load_tokenizer
    from model import load_session

    flags = ("--use_inflight_batching", "--max_batch_size", "2")
    prompts = [[1000, 1001, 5, 17, 300], [9, 8, 7], [100, 200, 300, 400, 500, 600, 700], [42]]
    one_rank = load_session(engines(1, *flags), "cpu")
    tokenizer = load_tokenizer(engines(1, *flags))
    expected = [tokenizer.decode(output.token_ids) for output in
                one_rank.generate(prompts, SamplingConfig(max_new_tokens=6, end_id=-1))]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(REPO_ROOT / "serve.py"), "--engine_dir", str(engines(2, *flags)), "--port",
                               str(port), "--model_name", "tp", "--log_level", "warning"],
                              env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def complete(prompt: list[int]) -> str:
        body = {"model": "tp", "prompt": prompt, "max_tokens": 6, "min_tokens": 6, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

    try:
        deadline = time.monotonic() + 120
        while not _answers(url + "/health"):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
            time.sleep(0.2)
        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(complete, prompts)) == expected
        time.sleep(2.5)  # idle turns keep the other rank in step
        assert complete(prompts[2]) == expected[2]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        finally:
            server.kill()
    stderr = server.stderr.read()
    # No rank's traceback: no frame of this repository's code (torchrun prints its own stop, from .venv).
    own_frames = [line for line in stderr.splitlines()
                  if line.strip().startswith(f'File "{REPO_ROOT}/') and f"{REPO_ROOT}/.venv/" not in line]
    assert not own_frames, stderr[-3000:]
    assert subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True).stdout == b""


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
