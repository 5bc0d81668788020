"""build.py, run.py and summarize.py end to end, as subprocesses, the way a user runs them."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, assert_one_line_error, run_tool
from test_model import oracle

SAMPLE = REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl"
LIMITS = ["--max_batch_size", "4", "--max_input_len", "64", "--max_output_len", "24"]


@pytest.fixture(scope="module")
def dummy_engine(tiny_engine_factory, tiny_tokenizer_dir):
    return tiny_engine_factory(*TINY_SHAPE_FLAGS, *LIMITS, "--random_seed", "3", "--tokenizer_dir",
                               tiny_tokenizer_dir)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_checkpoint_engine_csv_output_equals_glm_for_causal_lm_greedy(tiny_checkpoint_factory, tmp_path, fmt):
    model_dir = tiny_checkpoint_factory(fmt, seed=21)
    result = run_tool("build.py", "--model_dir", model_dir, "--dtype", "float32", "--output_dir",
                      tmp_path / "engine", *LIMITS)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "engine" / "tokenizer.model").is_file()
    prompts = [[1001, 1003, 30, 31, 32, 33], [1001, 1003, 900], [7] * 20]  # 1001, 1003: [gMASK] sop
    (tmp_path / "prompts.csv").write_text("\n".join(",".join(map(str, p)) for p in prompts) + "\n")
    result = run_tool("run.py", "--engine_dir", tmp_path / "engine", "--input_tokens", tmp_path / "prompts.csv",
                      "--output_csv", tmp_path / "out.csv", "--max_output_len", "24")
    assert result.returncode == 0, result.stderr
    rows = [[int(t) for t in line.split(",")] if line else [] for line in
            (tmp_path / "out.csv").read_text().splitlines()]
    reference_model = oracle(model_dir)
    for prompt, row in zip(prompts, rows, strict=True):
        with torch.no_grad():
            generated = reference_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                 eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
        assert row == (generated[:generated.index(2)] if 2 in generated else generated)


def test_run_prints_input_and_output_for_text_prompts(dummy_engine):
    result = run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "8",
                      "--input_text", "续写：北京市教育资源丰富", "The weather today")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Input --->") == 2 and result.stdout.count("Output --->") == 2
    assert "\t续写：北京市教育资源丰富" in result.stdout and "\tThe weather today" in result.stdout


def test_run_default_prompt_and_streaming(dummy_engine, tmp_path):
    plain = run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "6",
                     "--output_csv", tmp_path / "plain.csv")
    streamed = run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "6", "--streaming",
                        "--output_csv", tmp_path / "streamed.csv")
    assert plain.returncode == 0 and streamed.returncode == 0, streamed.stderr
    assert "续写：北京市教育资源丰富" in plain.stdout
    assert (tmp_path / "plain.csv").read_text() == (tmp_path / "streamed.csv").read_text()
    # One prompt streams into its Output block: the same text, printed once.
    assert streamed.stdout == plain.stdout and plain.stdout.lstrip().startswith("Input --->")


def test_run_sampling_flags_change_the_output(dummy_engine, tmp_path):
    def output(*flags):
        run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "12", "--output_csv",
                 tmp_path / "o.csv", *flags)
        return (tmp_path / "o.csv").read_text()

    greedy = output()
    sampled = output("--top_k", "0", "--temperature", "2.0", "--random_seed", "1")
    assert sampled == output("--top_k", "0", "--temperature", "2.0", "--random_seed", "1")
    assert sampled != greedy
    assert output("--top_k", "0", "--temperature", "2.0", "--random_seed", "2") != sampled


def test_summarize_with_hf_and_accuracy_check(dummy_engine):
    common = ["--engine_dir", dummy_engine, "--dataset_path", SAMPLE, "--batch_size", "2", "--max_ite", "2",
              "--output_len", "8", "--max_input_len", "64", "--data_type", "fp32"]
    result = run_tool("summarize.py", *common, "--test_hf", "--check_accuracy", "--rouge1_threshold", "0")
    assert result.returncode == 0, result.stderr
    for header in ("glm_engine (total latency:", "Hugging Face (total latency:"):
        assert header in result.stdout
    # 4 summaries of 8 tokens (no end token in so few of a dummy model's tokens).
    assert result.stdout.count("(total output tokens: 32)") == 2 and "(tokens per second: " in result.stdout
    assert result.stdout.count("rouge1 :") == 2 and result.stdout.count("rougeLsum :") == 2
    assert "Token agreement: 100.0% of outputs identical" in result.stdout
    assert "accuracy check passed" in result.stdout
    failed = run_tool("summarize.py", *common, "--check_accuracy", "--tensorrt_llm_rouge1_threshold", "101")
    assert_one_line_error(failed, "accuracy check failed: rouge1")


def test_summarize_offline_without_dataset_path(dummy_engine):
    result = run_tool("summarize.py", "--engine_dir", dummy_engine, "--max_ite", "1")
    assert_one_line_error(result, "--dataset_path")


# --- bad input: one line, non-zero exit, nothing left behind ---------------------------------


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "is not a directory"),
    ("other_architecture", "model_type 'llama'"),
    ("missing_tensor", "'transformer.encoder.layers.1.self_attention.dense.weight' missing"),
    ("wrong_shape", "has shape (7,)"),
    ("shape_flag_with_checkpoint", "--n_layer sets a dummy engine's shape"),
])
def test_bad_checkpoints_are_refused(tiny_checkpoint_factory, tmp_path, case, message):
    model_dir = tiny_checkpoint_factory("single_bin", seed=22)
    flags = []
    if case == "missing_dir":
        model_dir = tmp_path / "nowhere"
    elif case == "other_architecture":
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif case == "shape_flag_with_checkpoint":
        flags = ["--n_layer", "3"]
    else:
        state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
        name = "transformer.encoder.layers.1.self_attention.dense.weight"
        if case == "missing_tensor":
            del state[name]
        else:
            state["transformer.encoder.layers.0.input_layernorm.weight"] = torch.ones(7)
        torch.save(state, model_dir / "pytorch_model.bin")
    output = tmp_path / "out"
    output.mkdir()
    result = run_tool("build.py", "--model_dir", model_dir, "--output_dir", output / "engine", *flags)
    assert_one_line_error(result, message)
    assert list(output.iterdir()) == []


def corrupt_weights(engine_dir):
    path = engine_dir / "rank0.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def other_version(engine_dir):
    path = engine_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))


@pytest.mark.parametrize("damage, message", [(corrupt_weights, "fails its sha256 check"),
                                             (other_version, "format version 99")])
def test_damaged_engines_never_load(tiny_engine_factory, tmp_path, damage, message):
    import shutil

    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "8"), engine_dir)
    damage(engine_dir)
    (tmp_path / "p.csv").write_text("1,2,3\n")
    result = run_tool("run.py", "--engine_dir", engine_dir, "--input_tokens", tmp_path / "p.csv",
                      "--output_csv", tmp_path / "out.csv")
    assert_one_line_error(result, message)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("csv_text, flags, message", [
    ("5,6,1024\n", [], "token id 1024, outside the vocabulary"),
    (",".join(["5"] * 65) + "\n", [], "65 tokens, over the engine's max_input_len 64"),
    ("5,6\n\n7\n", [], "line 2: empty prompt"),
    ("5,six,7\n", [], "line 1: 'six' is not a token id"),
    ("", [], "holds no prompt"),
    ("5\n", ["--max_output_len", "25"], "exceeds the engine's max_output_len 24"),
    (None, ["--input_text", ""], "--input_text holds an empty prompt"),
    (None, ["--engine_dir", "/nonexistent"], "is not an engine directory"),
])
def test_bad_prompts_are_refused(dummy_engine, tmp_path, csv_text, flags, message):
    prompt_flags = []
    if csv_text is not None:
        (tmp_path / "p.csv").write_text(csv_text)
        prompt_flags = ["--input_tokens", tmp_path / "p.csv"]
    result = run_tool("run.py", "--engine_dir", dummy_engine, *prompt_flags, "--output_csv",
                      tmp_path / "out.csv", *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "out.csv").exists()


def test_a_dummy_engine_no_tokenizer_fits_needs_token_ids(tiny_engine_factory):
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS[:-2], "--vocab_size", "200", "--max_input_len", "8")
    assert not (engine_dir / "tokenizer.model").exists()
    assert_one_line_error(run_tool("run.py", "--engine_dir", engine_dir), "pass --tokenizer_dir")


def test_benchmark_measures_engine_and_hf_on_the_same_weights(tiny_engine_factory, tmp_path):
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_input_len", "16",
                                     "--max_output_len", "24")
    result = run_tool("benchmark.py", "--engine_dir", engine_dir, "--batch_size", "1", "2", "--input_len", "16",
                      "--output_len", "24", "--repeats", "1", "--hf", "--accuracy", "--device", "cpu",
                      "--output_json", tmp_path / "result.json", "--plot", tmp_path / "throughput.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = json.loads((tmp_path / "result.json").read_text())
    assert [(row["side"], row["batch_size"]) for row in measured["rows"]] == [
        ("glm_engine", 1), ("glm_engine", 2), ("hf_eager", 1), ("hf_eager", 2)]
    assert all(row["prefill_ms"] > 0 and row["decode_ms_per_step"] > 0 for row in measured["rows"][:2])
    assert all(row["prefill_ms"] > 0 for row in measured["rows"][2:])
    assert measured["logits_relative_error_vs_hf_fp32"] < 1e-5
    assert measured["decode_logits_relative_error_vs_hf_fp32"] < 1e-5
    assert {"card", "date", "command", "torch"} <= measured["environment"].keys()


def test_random_seed_decides_the_dummy_weights(tiny_engine_factory):
    def sha(seed):
        engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "9", "--random_seed", seed)
        return json.loads((engine_dir / "config.json").read_text())["checksums"]["rank0.safetensors"]["sha256"]

    first = sha(1)
    assert first == json.loads((tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "9", "--random_seed", 1)
                                / "config.json").read_text())["checksums"]["rank0.safetensors"]["sha256"]
    assert first != sha(2)


def test_run_with_a_tokenizer_given_apart_from_the_engine(tiny_engine_factory, tiny_tokenizer_dir):
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "32")
    result = run_tool("run.py", "--engine_dir", engine_dir, "--tokenizer_dir", tiny_tokenizer_dir,
                      "--max_output_len", "4", "--input_text", "Hello there")
    assert result.returncode == 0, result.stderr
    assert "\tHello there" in result.stdout


def test_summarize_against_the_checkpoint_given(tiny_checkpoint_factory, tmp_path):
    model_dir = tiny_checkpoint_factory("safetensors", seed=23)
    build = run_tool("build.py", "--model_dir", model_dir, "--dtype", "float32", "--output_dir",
                     tmp_path / "engine", *LIMITS)
    assert build.returncode == 0, build.stderr
    result = run_tool("summarize.py", "--engine_dir", tmp_path / "engine", "--hf_model_location", model_dir,
                      "--dataset_path", SAMPLE, "--test_hf", "--data_type", "fp32", "--batch_size", "3",
                      "--max_ite", "1", "--output_len", "12", "--max_input_len", "64")
    assert result.returncode == 0, result.stderr
    assert "Token agreement: 100.0% of outputs identical" in result.stdout


def test_plain_engines_run_without_triton(tiny_engine_factory, tmp_path):
    """Triton is needed only by plugin and weight-only engines."""
    import subprocess
    import sys

    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "8")
    (tmp_path / "p.csv").write_text("5,6,7\n")
    script = ("import sys, runpy; sys.modules['triton'] = None; "
              f"sys.argv = ['run.py', '--engine_dir', {str(engine_dir)!r}, '--input_tokens', "
              f"{str(tmp_path / 'p.csv')!r}, '--max_output_len', '3']; "
              f"runpy.run_path({str(REPO_ROOT / 'run.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert "Output --->" in result.stdout


def test_summarize_plugin_weight_only_engine_against_hf_on_its_dequantized_weights(tiny_engine_factory,
                                                                                   tiny_tokenizer_dir):
    engine_dir = tiny_engine_factory(*TINY_SHAPE_FLAGS, *LIMITS, "--dtype", "float32", "--tokenizer_dir",
                                     tiny_tokenizer_dir, "--use_gpt_attention_plugin", "float32",
                                     "--use_layernorm_plugin", "float32", "--use_weight_only",
                                     "--weight_only_precision", "int4")
    result = run_tool("summarize.py", "--engine_dir", engine_dir, "--dataset_path", SAMPLE, "--test_hf",
                      "--data_type", "fp32", "--batch_size", "2", "--max_ite", "1", "--output_len", "8",
                      "--max_input_len", "64")
    assert result.returncode == 0, result.stderr
    assert "Token agreement: 100.0% of outputs identical" in result.stdout


def test_benchmark_accuracy_reference_engine_dir_sets_the_reference_weights(tiny_engine_factory, tmp_path):
    flags = [*TINY_SHAPE_FLAGS, "--dtype", "float32", "--max_input_len", "16", "--max_output_len", "4"]
    engine_dir = tiny_engine_factory(*flags, "--random_seed", "1")
    other_weights = tiny_engine_factory(*flags, "--random_seed", "2")
    result = run_tool("benchmark.py", "--engine_dir", engine_dir, "--batch_size", "1", "--input_len", "16",
                      "--output_len", "2", "--repeats", "1", "--accuracy", "--reference_engine_dir", other_weights,
                      "--device", "cpu", "--output_json", tmp_path / "result.json")
    assert result.returncode == 0, result.stderr
    measured = json.loads((tmp_path / "result.json").read_text())
    assert measured["logits_relative_error_vs_hf_fp32"] > 1e-2  # other weights: far from this engine
    assert measured["decode_logits_relative_error_vs_hf_fp32"] > 1e-2
    other_shape = tiny_engine_factory(*TINY_SHAPE_FLAGS[:-2], "--vocab_size", "512", "--max_input_len", "16")
    result = run_tool("benchmark.py", "--engine_dir", engine_dir, "--batch_size", "1", "--input_len", "16",
                      "--output_len", "2", "--repeats", "1", "--accuracy", "--reference_engine_dir", other_shape,
                      "--device", "cpu")
    assert_one_line_error(result, "holds another model shape")


def test_run_takes_cpu_with_an_index_and_prompts_from_a_pipe(dummy_engine, tmp_path):
    """`--device cpu:0` is the CPU; `--input_tokens` may be a FIFO (e.g. <(...) in a shell)."""
    import threading

    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("1001,1003,30\n"))
    writer.start()
    result = run_tool("run.py", "--engine_dir", dummy_engine, "--device", "cpu:0", "--input_tokens", fifo,
                      "--max_output_len", "3")
    writer.join(timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Output --->" in result.stdout


def test_run_chat_formats_each_prompt_as_a_user_message(dummy_engine, tmp_path):
    """--chat: the output is the engine's answer to the family's chat prompt of the text,
    as given to --input_tokens."""
    from glm_engine.text.prompts import chat_prompt_ids
    from glm_engine.text.tokenizer import load_tokenizer

    chat = run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "8", "--chat", "--input_text",
                    "你好", "--output_csv", tmp_path / "chat.csv")
    assert chat.returncode == 0, chat.stderr
    ids = chat_prompt_ids(load_tokenizer(dummy_engine), [("user", "你好")])
    assert ids != load_tokenizer(dummy_engine).encode("你好")
    (tmp_path / "ids.csv").write_text(",".join(map(str, ids)) + "\n")
    given = run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "8", "--input_tokens",
                     tmp_path / "ids.csv", "--output_csv", tmp_path / "given.csv")
    assert given.returncode == 0, given.stderr
    assert (tmp_path / "chat.csv").read_text() == (tmp_path / "given.csv").read_text()
    assert_one_line_error(run_tool("run.py", "--engine_dir", dummy_engine, "--chat", "--input_tokens",
                                   tmp_path / "ids.csv"), "--input_tokens are used as given")


def test_run_end_id_ends_generation_at_the_ids_given(dummy_engine, tmp_path):
    """--end_id replaces the model's end ids: the output stops before the first of them."""
    def output(*flags):
        result = run_tool("run.py", "--engine_dir", dummy_engine, "--max_output_len", "12", "--output_csv",
                          tmp_path / "o.csv", *flags)
        assert result.returncode == 0, result.stderr
        return [int(token) for token in (tmp_path / "o.csv").read_text().split(",")]

    free = output()
    assert len(free) == 12
    assert output("--end_id", str(free[3])) == free[:free.index(free[3])]
    assert output("--end_id", "1", str(free[5])) == free[:free.index(free[5])]
    assert_one_line_error(run_tool("run.py", "--engine_dir", dummy_engine, "--end_id", "99999999"),
                          "--end_id 99999999 is not a token id of this engine")
    assert_one_line_error(run_tool("run.py", "--engine_dir", dummy_engine, "--num_beams", "2", "--end_id", "5", "6"),
                          "beam search ends at one --end_id")
