"""The bad-input corpus: every tool over a table of bad inputs. Each must end with a
non-zero exit status, exactly one `error:` line on stderr naming the problem, no
traceback, and nothing written or removed (the workspace tree is compared).

The tools run in this process (their `__main__`, as `python tool.py` runs it), so a
hundred cases take seconds; any exception other than SystemExit fails the case.
test_cli.py and test_safety.py run the tools as subprocesses."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints import tiny_config
from conftest import REPO_ROOT, TINY_SHAPE_FLAGS, run_tool
from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine_format.layout import weight_shapes
from glm_engine.models import read_model_config
from glm_engine.text.prompts import read_token_csv
from test_safety import tree

LIMITS = ["--max_batch_size", "2", "--max_input_len", "32", "--max_output_len", "8"]
GOOD_ARTICLE = {"article": "The cat sat on the mat. It was warm.", "highlights": "A cat sat."}


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value)))


def bad_checkpoints(root: Path, good: Path) -> None:
    """root/<case>: copies of a good single-file checkpoint, each broken one way."""
    def variant(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    for name, field, value in [("hidden_text", "hidden_size", "64"), ("hidden_float", "hidden_size", 64.0),
                               ("hidden_null", "hidden_size", None), ("layers_true", "num_layers", True),
                               ("layers_list", "num_layers", [2]), ("layers_0", "num_layers", 0),
                               ("layers_huge", "num_layers", 10**9), ("epsilon_text", "layernorm_epsilon", "x"),
                               ("eos_text", "eos_token_id", "2"), ("eos_empty", "eos_token_id", []),
                               ("rope_text", "rope_ratio", "big"), ("mqa_text", "multi_query_attention", "yes"),
                               ("vocab_huge", "padded_vocab_size", 10**13), ("eos_huge", "eos_token_id", 10**6)]:
        edit_json(variant(f"config_{name}") / "config.json", lambda config: {**config, field: value})
    write(variant("config_list") / "config.json", "[1, 2]")
    write(variant("config_long_digits") / "config.json", '{"num_layers": ' + "9" * 5000 + "}")
    (variant("bin_int_key") / "model.safetensors").unlink()
    torch.save({5: torch.zeros(2)}, root / "bin_int_key" / "pytorch_model.bin")
    twice = variant("tensor_twice")
    from safetensors.torch import load_file, save_file

    state = load_file(twice / "model.safetensors")
    save_file({"transformer.output_layer.weight": state["transformer.output_layer.weight"] + 1},
              twice / "model-00002-of-00002.safetensors")
    (twice / "model.safetensors").rename(twice / "model-00001-of-00002.safetensors")
    write(twice / "model.safetensors.index.json", json.dumps({"weight_map": {
        **{name: "model-00001-of-00002.safetensors" for name in state},
        "transformer.output_layer.weight": "model-00002-of-00002.safetensors"}}))
    write(variant("config_empty") / "config.json", "")
    write(variant("config_not_utf8") / "config.json", b'{"model_type": "\xff\xfe"}')
    shutil.rmtree(variant("config_dir") / "config.json", ignore_errors=True)
    (root / "config_dir" / "config.json").unlink()
    (root / "config_dir" / "config.json").mkdir()
    write(variant("weights_garbage") / "model.safetensors", b"\x00garbage" * 10)
    write(variant("weights_empty") / "model.safetensors", b"")
    (variant("weights_dir") / "model.safetensors").unlink()
    (root / "weights_dir" / "model.safetensors").mkdir()
    (variant("weights_none") / "model.safetensors").unlink()
    for name, index in [("index_list", {"weight_map": ["model.safetensors"]}), ("index_no_map", {"metadata": {}}),
                        ("index_outside", {"weight_map": {"transformer.output_layer.weight": "../x.safetensors"}}),
                        ("index_missing_shard", {"weight_map": {"transformer.output_layer.weight": "gone.bin"}})]:
        write(variant(name) / "model.safetensors.index.json", json.dumps(index))
    write(variant("index_not_json") / "model.safetensors.index.json", "{")
    write(variant("tokenizer_config_not_utf8") / "tokenizer_config.json", b"\xff\xfe\xfd")
    write(variant("tokenizer_garbage") / "tokenizer.model", b"not a sentencepiece model")
    secret = write(root / "secret.txt", "password\n")
    (variant("tokenizer_link_outside") / "special_tokens_map.json").symlink_to(secret)
    state = load_file(good / "model.safetensors")
    state["transformer.encoder.layers.0.self_attention.dense.weight"][1, 1] = float("inf")
    save_file(state, variant("weights_inf") / "model.safetensors")


def bad_engines(root: Path, good: Path) -> None:
    """root/<case>: copies of a good engine, each broken one way."""
    def variant(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    write(variant("config_list") / "config.json", "[]")
    write(variant("config_not_utf8") / "config.json", b"\xff{}")
    edit_json(variant("config_edited") / "config.json", lambda config: {**config, "model": {
        **config["model"], "num_layers": 7}})
    edit_json(variant("no_marker") / "config.json", lambda config: {
        key: value for key, value in config.items() if key != "format"})
    edit_json(variant("version_9") / "config.json", lambda config: {**config, "format_version": 9})
    (variant("weights_missing") / "rank0.safetensors").unlink()
    with open(variant("weights_damaged") / "rank0.safetensors", "r+b") as stream:
        stream.seek(100)
        stream.write(b"\xff\xff")
    (variant("tokenizer_missing") / "tokenizer.model").unlink()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_engine_factory, tiny_tokenizer_dir, tiny_checkpoint_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    shutil.copytree(tiny_engine_factory(*TINY_SHAPE_FLAGS, *LIMITS, "--tokenizer_dir", tiny_tokenizer_dir),
                    root / "engine")
    shutil.copytree(tiny_engine_factory(*TINY_SHAPE_FLAGS, *LIMITS, "--paged_kv_cache"), root / "paged_engine")
    shutil.copytree(tiny_engine_factory(*TINY_SHAPE_FLAGS[:-2], "--vocab_size", "512", *LIMITS), root / "other_shape")
    shutil.copytree(tiny_checkpoint_factory("single_safetensors", seed=51), root / "checkpoint")
    shutil.copytree(tiny_tokenizer_dir, root / "tokenizer")
    bad_checkpoints(root / "bad_checkpoint", root / "checkpoint")
    bad_engines(root / "bad_engine", root / "engine")
    files = root / "files"
    write(files / "prompts.csv", "5,6,7\n")
    write(files / "not_a_dir", "x")
    write(files / "not_utf8.csv", b"5,6,\xff\n")
    write(files / "not_ids.csv", "5,six\n")
    write(files / "float_ids.csv", "5,6.5\n")
    write(files / "huge_id.csv", "5," + "9" * 30 + "\n")
    write(files / "negative_id.csv", "5,-3\n")
    write(files / "empty.csv", "")
    write(files / "blank_line.csv", "5\n\n6\n")
    write(files / "huge_field.csv", "5" * 200_000 + "\n")
    write(files / "long_digits.csv", "5," + "7" * 5000 + "\n")
    write(files / "long_digits.jsonl", '{"article": "a", "highlights": "b", "n": ' + "7" * 5000 + "}\n")
    write(files / "deep.json", "[" * 100_000 + "]" * 100_000)
    write(files / "articles.jsonl", json.dumps(GOOD_ARTICLE) + "\n")
    write(files / "long_articles.jsonl", (REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl").read_text())
    write(files / "not_utf8.jsonl", b'{"article": "\xff", "highlights": "x"}\n')
    write(files / "not_json.jsonl", "{\n")
    write(files / "number_rows.jsonl", "5\n")
    write(files / "number_article.jsonl", json.dumps({"article": 5, "highlights": "x"}) + "\n")
    write(files / "null_highlights.jsonl", json.dumps({"article": "a", "highlights": None}) + "\n")
    write(files / "list_article.json", json.dumps([{"article": ["a"], "highlights": "x"}]))
    write(files / "string.json", json.dumps("articles"))
    write(files / "object_without_test.json", json.dumps({"train": []}))
    write(files / "empty.json", "[]")
    write(files / "not_utf8.csv", b"article,highlights\n\xff,x\n")
    write(files / "missing_columns.csv", "text,summary\na,b\n")
    write(files / "articles.txt", "an article")
    write(files / "garbage.parquet", b"PAR1 not really")
    (files / "not_a_dataset").mkdir()
    write(files / "not_a_dataset" / "readme.txt", "x")
    return root


def run_in_process(script: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Runs `python script *args` in this process; (exit status, stderr)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    return status, capsys.readouterr().err


# (tool, arguments with {w} for the workspace, fragment of the error line)
CASES = [
    # build.py: output directories
    ("build.py", "--model_dir {w}/checkpoint --output_dir {w}/checkpoint", "is, holds or lies inside --model_dir"),
    ("build.py", "--model_dir {w}/checkpoint --output_dir {w}/checkpoint/engine", "lies inside --model_dir"),
    ("build.py", "--model_dir {w}/checkpoint --output_dir {w}", "is, holds or lies inside --model_dir"),
    ("build.py", "--tokenizer_dir {w}/tokenizer --output_dir {w}/tokenizer", "lies inside --tokenizer_dir"),
    ("build.py", "--output_dir {w}/files/not_a_dir", "exists and is not a directory"),
    ("build.py", "--output_dir /dev/null", "exists and is not a directory"),
    ("build.py", "--output_dir {w}/files/not_a_dir/engine", "cannot be created"),
    ("build.py", "--output_dir {w}/files", "is not an engine that build.py wrote"),
    ("build.py", "--output_dir {w}/bad_engine/no_marker", "is not an engine that build.py wrote"),
    # build.py: flags
    ("build.py", "--random_seed 18446744073709551616 --output_dir {w}/new", "--random_seed must be an integer in"),
    ("build.py", "--random_seed -1 --output_dir {w}/new", "--random_seed must be an integer in"),
    ("build.py", "--vocab_size 1000000000000 --output_dir {w}/new", "GiB of host memory is free"),
    ("build.py", "--n_layer 1000000000 --n_embd 64 --n_head 4 --output_dir {w}/new", "GiB of host memory is free"),
    ("build.py", "--n_head 0 --output_dir {w}/new", "--n_head must be positive"),
    ("build.py", "--n_embd -64 --output_dir {w}/new", "--n_embd must be positive"),
    ("build.py", "--n_embd 66 --n_head 4 --output_dir {w}/new", "must be a multiple of --n_head"),
    ("build.py", "--max_batch_size 0 --output_dir {w}/new", "--max_batch_size must be positive"),
    ("build.py", "--max_input_len -1 --output_dir {w}/new", "--max_input_len must be positive"),
    ("build.py", "--max_input_len 1000000000000 --output_dir {w}/new", "must stay under 2**31"),
    ("build.py", "--paged_kv_cache --tokens_per_block 1099511627776 --output_dir {w}/new", "must stay under 2**31"),
    ("build.py", "--vocab_size 2 --output_dir {w}/new", "eos_token_id 2 is outside the vocabulary [0, 2)"),
    ("build.py", "--world_size 3 --output_dir {w}/new", "--world_size 3 does not divide the model's 32 attention heads"),
    ("build.py", "--world_size 0 --output_dir {w}/new", "--world_size must be positive"),
    ("build.py", "--parallel_build --output_dir {w}/new", "--parallel_build converts the ranks"),
    ("build.py", "--weight_only_precision int4 --output_dir {w}/new", "applies to --use_weight_only"),
    ("build.py", "--paged_kv_cache --tokens_per_block 48 --output_dir {w}/new", "must be a power of two"),
    ("build.py", "--tokens_per_block 64 --output_dir {w}/new", "add --paged_kv_cache"),
    ("build.py", "--dtype float16 --use_gemm_plugin float32 --output_dir {w}/new", "the kernels compute in"),
    ("build.py", "--enable_context_fmha --output_dir {w}/new", "context FMHA runs inside"),
    ("build.py", "--dtype float8 --output_dir {w}/new", "invalid choice: 'float8'"),
    ("build.py", "--max_batch_size eight --output_dir {w}/new", "invalid int value: 'eight'"),
    ("build.py", "--no_such_flag --output_dir {w}/new", "unrecognized arguments: --no_such_flag"),
    ("build.py", "--model_dir {w}/checkpoint --n_layer 3 --output_dir {w}/new", "--n_layer sets a dummy engine"),
    ("build.py", "--model_dir {w}/checkpoint --random_seed 3 --output_dir {w}/new", "--random_seed seeds dummy"),
    ("build.py", "--rope_ratio_mode base --output_dir {w}/new", "--rope_ratio_mode applies to a checkpoint"),
    ("build.py", "--tokenizer_dir {w}/files --output_dir {w}/new", "holds no tokenizer.model"),
    ("build.py", "--tokenizer_dir {w}/nowhere --output_dir {w}/new", "holds no tokenizer.model"),
    ("build.py", "--model_dir {w}/nowhere --output_dir {w}/new", "is not a directory"),
    ("build.py", "--model_dir {w}/files/not_a_dir --output_dir {w}/new", "is not a directory"),
    # build.py: checkpoints
    ("build.py", "--model_dir {w}/bad_checkpoint/config_hidden_text --output_dir {w}/new",
     "hidden_size must be an integer, got '64'"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_hidden_float --output_dir {w}/new",
     "hidden_size must be an integer, got 64.0"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_hidden_null --output_dir {w}/new",
     "hidden_size must be an integer, got None"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_layers_true --output_dir {w}/new",
     "num_layers must be an integer, got True"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_layers_list --output_dir {w}/new",
     "num_layers must be an integer, got [2]"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_layers_0 --output_dir {w}/new",
     "num_layers must be positive, got 0"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_layers_huge --output_dir {w}/new",
     "GiB of host memory is free"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_vocab_huge --output_dir {w}/new",
     "GiB of host memory is free"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_epsilon_text --output_dir {w}/new",
     "layernorm_epsilon must be a finite number"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_eos_text --output_dir {w}/new",
     "eos_token_id must be an integer, got '2'"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_eos_empty --output_dir {w}/new",
     "eos_token_id must be an integer, got []"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_rope_text --output_dir {w}/new",
     "rope_ratio must be a finite number"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_mqa_text --output_dir {w}/new",
     "multi_query_attention must be true or false"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_list --output_dir {w}/new", "holds a JSON list"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_long_digits --output_dir {w}/new", "is not valid JSON"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_eos_huge --output_dir {w}/new",
     "eos_token_id 1000000 is outside the vocabulary"),
    ("build.py", "--model_dir {w}/bad_checkpoint/bin_int_key --output_dir {w}/new", "a dict of named tensors"),
    ("build.py", "--model_dir {w}/bad_checkpoint/tensor_twice --output_dir {w}/new", "appears twice"),
    ("build.py", "--model_dir '{w}/new\nline' --output_dir {w}/new", "is not a directory"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_empty --output_dir {w}/new", "is not valid JSON"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_not_utf8 --output_dir {w}/new", "is not valid JSON"),
    ("build.py", "--model_dir {w}/bad_checkpoint/config_dir --output_dir {w}/new", "config.json not found"),
    ("build.py", "--model_dir {w}/bad_checkpoint/weights_garbage --output_dir {w}/new", "cannot read weights file"),
    ("build.py", "--model_dir {w}/bad_checkpoint/weights_empty --output_dir {w}/new", "cannot read weights file"),
    ("build.py", "--model_dir {w}/bad_checkpoint/weights_dir --output_dir {w}/new", "is not a regular file"),
    ("build.py", "--model_dir {w}/bad_checkpoint/weights_none --output_dir {w}/new", "no weights in"),
    ("build.py", "--model_dir {w}/bad_checkpoint/weights_inf --output_dir {w}/new", "holds NaN or Inf"),
    ("build.py", "--model_dir {w}/bad_checkpoint/index_list --output_dir {w}/new", "weight_map must map"),
    ("build.py", "--model_dir {w}/bad_checkpoint/index_no_map --output_dir {w}/new", "is not a valid index"),
    ("build.py", "--model_dir {w}/bad_checkpoint/index_not_json --output_dir {w}/new", "is not a valid index"),
    ("build.py", "--model_dir {w}/bad_checkpoint/index_outside --output_dir {w}/new", "resolves outside it"),
    ("build.py", "--model_dir {w}/bad_checkpoint/index_missing_shard --output_dir {w}/new",
     "is named in model.safetensors.index.json but missing"),
    ("build.py", "--model_dir {w}/bad_checkpoint/tokenizer_config_not_utf8 --output_dir {w}/new",
     "tokenizer_config.json is not UTF-8 text"),
    ("build.py", "--model_dir {w}/bad_checkpoint/tokenizer_garbage --output_dir {w}/new",
     "is not a SentencePiece model"),
    ("build.py", "--model_dir {w}/bad_checkpoint/tokenizer_link_outside --output_dir {w}/new",
     "'special_tokens_map.json' in"),
    # run.py
    ("run.py", "--engine_dir {w}/nowhere", "is not an engine directory"),
    ("run.py", "--engine_dir {w}/files/not_a_dir", "is not an engine directory"),
    ("run.py", "--engine_dir {w}/files", "is not an engine directory"),
    ("run.py", "--engine_dir {w}/bad_engine/config_list", "lacks the \"format\": \"glm_engine\" marker"),
    ("run.py", "--engine_dir {w}/bad_engine/config_not_utf8", "is not valid JSON"),
    ("run.py", "--engine_dir {w}/bad_engine/config_edited", "fails its sha256 check"),
    ("run.py", "--engine_dir {w}/bad_engine/no_marker", "lacks the \"format\": \"glm_engine\" marker"),
    ("run.py", "--engine_dir {w}/bad_engine/version_9", "has format version 9"),
    ("run.py", "--engine_dir {w}/bad_engine/weights_missing", "rank0.safetensors is missing"),
    ("run.py", "--engine_dir {w}/bad_engine/weights_damaged", "fails its sha256 check"),
    ("run.py", "--engine_dir {w}/bad_engine/tokenizer_missing", "tokenizer.model is missing"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/not_utf8.csv", "is not UTF-8 text"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files", "is a directory"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/none.csv", "no such file"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/not_ids.csv", "'six' is not a token id"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/float_ids.csv", "'6.5' is not a token id"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/huge_id.csv", "outside the vocabulary"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/negative_id.csv", "token id -3, outside"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/empty.csv", "holds no prompt"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/blank_line.csv", "line 2: empty prompt"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/huge_field.csv", "is not a CSV file"),
    ("run.py", "--engine_dir {w}/engine --temperature nan", "temperature must be a finite number"),
    ("run.py", "--engine_dir {w}/engine --temperature inf", "temperature must be a finite number"),
    ("run.py", "--engine_dir {w}/engine --temperature 0", "temperature must be positive"),
    ("run.py", "--engine_dir {w}/engine --top_p nan", "top_p must be within [0, 1]"),
    ("run.py", "--engine_dir {w}/engine --top_p 1.5", "top_p must be within [0, 1]"),
    ("run.py", "--engine_dir {w}/engine --top_k -1", "top_k must be >= 0"),
    ("run.py", "--engine_dir {w}/engine --random_seed 18446744073709551616", "random_seed must be within"),
    ("run.py", "--engine_dir {w}/engine --random_seed -5", "random_seed must be within"),
    ("run.py", "--engine_dir {w}/engine --max_output_len 0", "max_output_len must be at least 1, got 0"),
    ("run.py", "--engine_dir {w}/engine --max_output_len -2", "max_output_len must be at least 1"),
    ("run.py", "--engine_dir {w}/engine --max_output_len 9", "exceeds the engine's max_output_len 8"),
    ("run.py", "--engine_dir {w}/engine --device meta", "engines run on cpu or cuda"),
    ("run.py", "--engine_dir {w}/engine --device xyz", "is not a device"),
    ("run.py", "--engine_dir {w}/engine --device cuda:7", "cuda"),
    ("run.py", "--engine_dir {w}/engine --output_csv {w}/files", "is a directory"),
    ("run.py", "--engine_dir {w}/engine --output_csv {w}/nowhere/out.csv", "does not exist; create it first"),
    ("run.py", "--engine_dir {w}/engine --output_csv {w}/files/not_a_dir/out.csv", "Not a directory"),
    ("run.py", "--engine_dir {w}/engine --input_text", "expected at least one argument"),
    ("run.py", "--engine_dir {w}/engine --input_text hi --input_tokens {w}/files/prompts.csv", "not both"),
    ("run.py", "--engine_dir {w}/engine --output_csv ''", "is a directory"),
    ("run.py", "--engine_dir {w}/engine --input_tokens {w}/files/long_digits.csv", "is not a token id"),
    ("run.py", "--engine_dir '{w}/new\nline'", "is not an engine directory"),
    ("run.py", "--engine_dir {w}/paged_engine --input_tokens {w}/files/prompts.csv --max_output_len 8 "
               "--max_tokens_in_paged_kv_cache 16", "under one block of 64 tokens"),
    ("run.py", "--engine_dir {w}/engine --input_text ''", "--input_text holds an empty prompt"),
    ("run.py", "--engine_dir {w}/engine --input_text \udcff\udcfe", "not UTF-8"),
    ("run.py", "--engine_dir {w}/engine --tokenizer_dir {w}/files", "no tokenizer.model"),
    ("run.py", "--engine_dir {w}/engine --kv_cache_free_gpu_mem_fraction 0.5", "built without --paged_kv_cache"),
    ("run.py", "--engine_dir {w}/paged_engine --input_tokens {w}/files/prompts.csv "
               "--kv_cache_free_gpu_mem_fraction nan", "within (0, 1]"),
    ("run.py", "--engine_dir {w}/paged_engine --input_tokens {w}/files/prompts.csv "
               "--max_tokens_in_paged_kv_cache 100000000000000", "GiB of host memory is free"),
    ("run.py", "--engine_dir {w}/paged_engine --input_tokens {w}/files/prompts.csv "
               "--max_tokens_in_paged_kv_cache 3", "under one block"),
    # summarize.py
    ("summarize.py", "--engine_dir {w}/engine --hf_trust_remote_code --dataset_path {w}/files/articles.jsonl",
     "--hf_trust_remote_code runs a checkpoint's own code: it needs --hf_model_location"),
    ("summarize.py", "--engine_dir {w}/engine --max_ite 0 --dataset_path {w}/files/articles.jsonl", "positive"),
    ("summarize.py", "--engine_dir {w}/engine --batch_size 0 --dataset_path {w}/files/articles.jsonl", "positive"),
    ("summarize.py", "--engine_dir {w}/engine --output_len -1 --dataset_path {w}/files/articles.jsonl", "positive"),
    ("summarize.py", "--engine_dir {w}/engine --max_input_len 2 --dataset_path {w}/files/articles.jsonl", ">= 3"),
    ("summarize.py", "--engine_dir {w}/engine --rouge1_threshold nan --dataset_path {w}/files/articles.jsonl",
     "--rouge1_threshold must be a finite number"),
    ("summarize.py", "--engine_dir {w}/engine --no_test_trt_llm", "nothing to test"),
    ("summarize.py", "--engine_dir {w}/engine --device meta --dataset_path {w}/files/articles.jsonl",
     "engines run on cpu or cuda"),
    ("summarize.py", "--engine_dir {w}/nowhere --dataset_path {w}/files/articles.jsonl", "is not an engine directory"),
    ("summarize.py", "--engine_dir {w}/engine --tokenizer {w}/files --dataset_path {w}/files/articles.jsonl",
     "no tokenizer.model"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/none.jsonl", "no such file or directory"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/not_utf8.jsonl", "cannot be parsed"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/not_json.jsonl", "cannot be parsed"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/long_digits.jsonl", "cannot be parsed"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/deep.json", "cannot be parsed"),
    ("summarize.py", "--engine_dir {w}/engine --test_hf --hf_model_location {w}/nowhere --dataset_path "
                     "{w}/files/articles.jsonl", "--hf_model_location"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/number_rows.jsonl",
     "record 0 lacks 'article' and 'highlights'"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/number_article.jsonl", "must be text"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/null_highlights.jsonl", "must be text"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/list_article.json", "must be text"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/string.json", "expected a JSON list"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/object_without_test.json",
     "expected a JSON list"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/empty.json", "holds no article"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/not_utf8.csv", "cannot be parsed"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/missing_columns.csv", "lacks 'article'"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/articles.txt", "unknown format '.txt'"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/garbage.parquet", "garbage.parquet"),
    ("summarize.py", "--engine_dir {w}/engine --dataset_path {w}/files/not_a_dataset", "not_a_dataset"),
    ("summarize.py", "--engine_dir {w}/engine --max_input_len 64 --output_len 4 --dataset_path "
                     "{w}/files/long_articles.jsonl",
     "over the engine's max_input_len 32"),
    # benchmark.py
    ("benchmark.py", "--engine_dir {w}/engine --batch_size 0", "--batch_size must be at least 1, got 0"),
    ("benchmark.py", "--engine_dir {w}/engine --batch_size 1 -2", "--batch_size must be at least 1, got -2"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 0", "--input_len must be at least 1"),
    ("benchmark.py", "--engine_dir {w}/engine --output_len 0", "--output_len must be at least 1"),
    ("benchmark.py", "--engine_dir {w}/engine --repeats 0", "--repeats must be at least 1"),
    ("benchmark.py", "--engine_dir {w}/engine --mode throughput --num_requests 0", "--num_requests must be at"),
    ("benchmark.py", "--engine_dir {w}/engine --hf_batch_size 0", "--hf_batch_size must be at least 1"),
    ("benchmark.py", "--engine_dir {w}/engine --max_in_flight 0", "--max_in_flight must be at least 1"),
    ("benchmark.py", "--engine_dir {w}/engine --mode rate --request_rate nan", "needs a finite --request_rate of at least"),
    ("benchmark.py", "--engine_dir {w}/engine --mode rate --request_rate inf", "needs a finite --request_rate of at least"),
    ("benchmark.py", "--engine_dir {w}/engine --mode rate --request_rate 0", "needs a finite --request_rate of at least"),
    ("benchmark.py", "--engine_dir {w}/engine --mode rate", "of at least 1e-06 requests/s, got None"),
    ("benchmark.py", "--engine_dir {w}/engine --mode rate --request_rate 1e-300", "got 1e-300"),
    ("benchmark.py", "--engine_dir {w}/engine --request_rate 5", "add --mode rate or drop it"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --output_len 4 --output_json ''", "is a directory"),
    ("benchmark.py", "--engine_dir {w}/engine --mode throughput --input_len_range 5 1", "need 1 <= MIN <= MAX"),
    ("benchmark.py", "--engine_dir {w}/engine --mode throughput --output_len 4 --input_len_range 1 64",
     "--input_len_range MAX 64 exceeds the engine's max_input_len 32"),
    ("benchmark.py", "--engine_dir {w}/engine --mode throughput --plot {w}/p.png", "--plot applies to --mode"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 33 --output_len 4", "--input_len 33 exceeds the engine's max_input_len"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --output_len 4 --batch_size 1 4", "--batch_size 4 exceeds"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --output_len 9", "--output_len 9 exceeds"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --output_json {w}/nowhere/r.json", "does not exist"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --output_json {w}/files", "is a directory"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --plot {w}/nowhere/p.png", "does not exist"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --reference_engine_dir {w}/engine", "add --accuracy"),
    ("benchmark.py", "--engine_dir {w}/engine --input_len 8 --output_len 4 --accuracy --reference_engine_dir "
                     "{w}/other_shape", "holds another model shape"),
    ("benchmark.py", "--engine_dir {w}/nowhere", "is not an engine directory"),
    ("benchmark.py", "--engine_dir {w}/engine --device meta", "engines run on cpu or cuda"),
    ("benchmark.py", "--engine_dir {w}/engine --mode fast", "invalid choice: 'fast'"),
    ("benchmark.py", "--engine_dir {w}/engine --num_beams 2 --num_return_sequences 2 --mode throughput",
     "changes no measurement"),
    ("benchmark.py", "--engine_dir {w}/engine --enable_chunked_context", "add --mode throughput or rate"),
    ("benchmark.py", "--engine_dir {w}/engine --mode throughput --server_url http://127.0.0.1:9 --max_in_flight 2",
     "--max_in_flight sets the in-process scheduler; pass it to serve.py instead"),
    ("benchmark.py", "--engine_dir {w}/engine --mode throughput --server_url http://127.0.0.1:9 "
                     "--speculative_decoding_mode prompt_lookup", "pass it to serve.py instead"),
    ("benchmark.py", "--engine_dir {w}/engine --max_draft_len 2", "add --speculative_decoding_mode"),
    ("benchmark.py", "--engine_dir {w}/engine --prompt_lookup_max_ngram 2", "add --speculative_decoding_mode"),
    ("benchmark.py", "--engine_dir {w}/engine --speculative_decoding_mode draft_model --draft_engine_dir "
                     "{w}/engine --prompt_lookup_max_ngram 2", "applies to --speculative_decoding_mode prompt_lookup"),
    ("run.py", "--engine_dir {w}/engine --speculative_decoding_mode prompt_lookup --input_text hi",
     "rebuild with it"),
    ("build.py", "--output_dir {w}/built --max_draft_len 65", "--max_draft_len must be within [0, 64]"),
]


def case_id(case: tuple[str, str, str]) -> str:
    tool, arguments, _ = case
    return f"{tool[:-3]}:{arguments.replace('{w}/', '')[:70]}"


@pytest.mark.parametrize("tool, arguments, fragment", CASES, ids=map(case_id, CASES))
def test_bad_input_is_one_error_line_and_touches_nothing(workspace, monkeypatch, capsys, tool, arguments,
                                                         fragment):
    import shlex

    args = [part.replace("{w}", str(workspace)) for part in shlex.split(arguments)]
    before = tree(workspace)
    status, stderr = run_in_process(tool, args, monkeypatch, capsys)
    assert status != 0, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert fragment in errors[0], errors[0]
    assert tree(workspace) == before


def test_the_corpus_covers_every_tool_and_runs_the_tools_for_real(workspace):
    """One case per tool again as a subprocess: the in-process runs stand for these."""
    assert {case[0] for case in CASES} == {"build.py", "run.py", "summarize.py", "benchmark.py"}
    for tool, arguments, fragment in [CASES[0], CASES[70], CASES[130], CASES[-3]]:
        result = run_tool(tool, *[part.replace("{w}", str(workspace)) for part in arguments.split()])
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert fragment in result.stderr


# --- parsers under random input ------------------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=4)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(tiny_config())), JSON_VALUES, max_size=4))
def test_any_checkpoint_config_gives_a_model_config_or_a_clear_error(overrides):
    try:
        config = read_model_config({**tiny_config(), **overrides})
    except GlmEngineError:
        return
    assert sum(map(len, weight_shapes(config).values())) > 0  # a config that loads is one the layout can use


BUILD_FIELDS = sorted(BuildConfig().to_dict())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(BUILD_FIELDS), JSON_VALUES, max_size=3))
def test_any_engine_build_config_gives_a_build_config_or_a_clear_error(overrides):
    try:
        BuildConfig.from_dict({**BuildConfig().to_dict(), **overrides})
    except GlmEngineError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(alphabet="0123456789,-\n\r \"x", max_size=40).map(str.encode))
def test_any_token_csv_gives_prompts_or_a_clear_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("csv") / "prompts.csv"
    path.write_bytes(content)
    try:
        prompts = read_token_csv(path)
    except GlmEngineError:
        return
    assert prompts and all(prompt and all(isinstance(token, int) for token in prompt) for prompt in prompts)


def test_a_checkpoint_weight_of_another_kind_is_refused(workspace, tmp_path):
    """Integer tensors are not weights: named in the error."""
    from safetensors.torch import load_file, save_file

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(workspace / "checkpoint", checkpoint)
    state = load_file(checkpoint / "model.safetensors")
    state["transformer.output_layer.weight"] = state["transformer.output_layer.weight"].to(torch.int32)
    save_file(state, checkpoint / "model.safetensors")
    result = run_tool("build.py", "--model_dir", checkpoint, "--output_dir", tmp_path / "engine")
    assert result.returncode != 0 and "'transformer.output_layer.weight' has dtype torch.int32" in result.stderr
