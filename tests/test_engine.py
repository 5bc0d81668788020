"""The engine directory: round trip, checksums, format version, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine_format.engine import ENGINE_FORMAT_VERSION, load_engine, save_engine, write_rank_file
from weight import dummy_weights

CONFIG = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, kv_channels=8,
                     multi_query_group_num=1, ffn_hidden_size=24, vocab_size=32, seq_length=64)


def one_rank(weights):
    """save_engine's write_weights for a one-rank engine."""
    return lambda staging: dict([write_rank_file(staging, 0, weights)])


def write(output_dir, seed: int = 0, tokenizer_files=()):
    weights = dummy_weights(CONFIG, torch.float16, seed)
    save_engine(output_dir, CONFIG, BuildConfig(max_batch_size=2), one_rank(weights), list(tokenizer_files),
                {"dtype": "float16"})
    return weights


def test_round_trip(tmp_path, tiny_tokenizer_dir):
    weights = write(tmp_path / "engine", tokenizer_files=[tiny_tokenizer_dir / "tokenizer.model"])
    engine = load_engine(tmp_path / "engine")
    assert engine.model_config == CONFIG and engine.build_config.max_batch_size == 2
    assert all(torch.equal(engine.weights[name], weights[name]) for name in weights)
    assert (tmp_path / "engine" / "tokenizer.model").is_file()
    config = json.loads((tmp_path / "engine" / "config.json").read_text())
    assert config["format_version"] == ENGINE_FORMAT_VERSION
    assert {"torch", "device", "glm_engine"} <= config["built_with"].keys()
    assert len(config["checksums"]["rank0.safetensors"]["sha256"]) == 64


def test_corrupted_weights_never_load(tmp_path):
    write(tmp_path / "engine")
    path = tmp_path / "engine" / "rank0.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GlmEngineError, match="fails its sha256 check"):
        load_engine(tmp_path / "engine")


def test_truncated_weights_never_load(tmp_path):
    write(tmp_path / "engine")
    path = tmp_path / "engine" / "rank0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GlmEngineError, match="corrupted or truncated"):
        load_engine(tmp_path / "engine")


def test_other_format_version_is_refused(tmp_path):
    write(tmp_path / "engine")
    path = tmp_path / "engine" / "config.json"
    config = json.loads(path.read_text())
    config["format_version"] = ENGINE_FORMAT_VERSION + 1
    path.write_text(json.dumps(config))
    with pytest.raises(GlmEngineError, match=f"format version {ENGINE_FORMAT_VERSION + 1}"):
        load_engine(tmp_path / "engine")


def test_not_an_engine(tmp_path):
    with pytest.raises(GlmEngineError, match="is not an engine directory"):
        load_engine(tmp_path)


def test_rebuild_replaces_the_engine(tmp_path):
    write(tmp_path / "engine", seed=1)
    weights = write(tmp_path / "engine", seed=2)
    engine = load_engine(tmp_path / "engine")
    assert torch.equal(engine.weights["output_layer.weight"], weights["output_layer.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_failed_write_leaves_nothing(tmp_path):
    weights = dummy_weights(CONFIG, torch.float16, 0)
    weights["bad"] = "not a tensor"
    with pytest.raises(Exception):
        save_engine(tmp_path / "engine", CONFIG, BuildConfig(), one_rank(weights), [], {})
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_engine(tmp_path):
    old = write(tmp_path / "engine", seed=3)
    weights = dummy_weights(CONFIG, torch.float16, 4)
    weights["bad"] = "not a tensor"
    with pytest.raises(Exception):
        save_engine(tmp_path / "engine", CONFIG, BuildConfig(), one_rank(weights), [], {})
    assert torch.equal(load_engine(tmp_path / "engine").weights["output_layer.weight"], old["output_layer.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_directory_that_is_not_an_engine_is_not_replaced(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "notes.txt").write_text("mine")
    with pytest.raises(GlmEngineError, match="exists and is not an engine"):
        write(tmp_path / "engine")
    assert (tmp_path / "engine" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_weights_file_is_standard_safetensors_with_true_checksums(tmp_path, monkeypatch, chunk_bytes):
    """The streaming writer's file loads with the safetensors library, and its
    recorded sha256 values are those of the bytes on disk."""
    import hashlib

    from safetensors.torch import load_file

    from glm_engine.engine_format import engine as engine_module

    monkeypatch.setattr(engine_module, "CHECKSUM_CHUNK_BYTES", chunk_bytes)
    tensors = {"half": torch.randn(3, 5).half(), "brain": torch.randn(7).bfloat16(),
               "int": torch.arange(-4, 4, dtype=torch.int8), "empty": torch.zeros(0, 4)}
    checksums = engine_module.write_safetensors(tmp_path / "w.safetensors", tensors, {"k": "v"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    data = (tmp_path / "w.safetensors").read_bytes()
    assert checksums["size"] == len(data)
    assert checksums["sha256"] == hashlib.sha256(data).hexdigest()
    assert checksums["chunk_sha256"] == [hashlib.sha256(data[i:i + chunk_bytes]).hexdigest()
                                         for i in range(0, len(data), chunk_bytes)]


def test_engines_written_before_group_wise_scales_still_load():
    """A build config without `weight_only_group_size` (engines built before the flag) reads
    as per-channel scales, which is what such an engine holds; any other missing field is refused."""
    from glm_engine.config import BuildConfig

    written = {name: value for name, value in BuildConfig(weight_only_precision="int4").to_dict().items()
               if name != "weight_only_group_size"}
    assert BuildConfig.from_dict(written) == BuildConfig(weight_only_precision="int4", weight_only_group_size=0)
    with pytest.raises(GlmEngineError, match="the engine's build config has no field 'world_size'"):
        BuildConfig.from_dict({name: value for name, value in written.items() if name != "world_size"})


def test_engines_written_before_model_families_load_as_chatglm_and_other_families_are_refused(tmp_path):
    """A model config without `model_type` (engines built before the registry) reads as
    ChatGLM; an engine of a family this build does not know is refused in one line, before
    any weight is read."""
    written = {name: value for name, value in CONFIG.to_dict().items() if name != "model_type"}
    assert ModelConfig.from_dict(written) == CONFIG and CONFIG.model_type == "chatglm"
    write(tmp_path / "engine")
    config_path = tmp_path / "engine" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["model_type"] = "llama"
    from glm_engine.engine_format.engine import config_digest

    config["config_sha256"] = config_digest(config)
    config_path.write_text(json.dumps(config))
    with pytest.raises(GlmEngineError, match="model_type 'llama' is not supported; supported: chatglm"):
        load_engine(tmp_path / "engine", torch.device("cpu"))
