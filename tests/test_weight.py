"""Reading checkpoints: every layout gives the same weights; a config or a
tensor that does not fit is refused with the offender's name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import CHECKPOINT_FORMATS
from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.engine_format.layout import weight_shapes
from glm_engine.models import read_model_config
from weight import dummy_weights, load_hf_config, load_hf_weights


def model_config(model_dir) -> ModelConfig:
    return read_model_config(load_hf_config(model_dir))


def test_every_checkpoint_layout_gives_the_same_weights(tiny_checkpoint_factory):
    loaded = []
    for fmt in CHECKPOINT_FORMATS:
        model_dir = tiny_checkpoint_factory(fmt, seed=11)
        loaded.append(load_hf_weights(model_dir, model_config(model_dir), torch.float32))
    assert set(loaded[0]) == set(weight_shapes(model_config(model_dir)))
    for weights in loaded[1:]:
        assert weights.keys() == loaded[0].keys()
        assert all(torch.equal(weights[name], loaded[0][name]) for name in weights)


def test_weights_are_converted_to_the_build_dtype(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("bin", seed=12, torch_dtype="float16")
    weights = load_hf_weights(model_dir, model_config(model_dir), torch.bfloat16)
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


def rewrite_single_file(model_dir, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("single_safetensors", seed=13)
    rewrite_single_file(model_dir, lambda t: t.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(GlmEngineError, match="'transformer.encoder.layers.1.mlp.dense_4h_to_h.weight' missing"):
        load_hf_weights(model_dir, model_config(model_dir), torch.float32)


def test_wrong_shape_is_named(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("single_safetensors", seed=14)
    name = "transformer.encoder.layers.0.self_attention.dense.weight"
    rewrite_single_file(model_dir, lambda t: t.update({name: torch.zeros(64, 32)}))
    with pytest.raises(GlmEngineError, match=rf"'{name}' has shape \(64, 32\), config.json implies \(64, 64\)"):
        load_hf_weights(model_dir, model_config(model_dir), torch.float32)


def test_unexpected_tensor_is_named(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("single_safetensors", seed=15)
    rewrite_single_file(model_dir, lambda t: t.update({"transformer.encoder.layers.2.mlp.extra": torch.ones(3)}))
    with pytest.raises(GlmEngineError, match="unexpected tensor 'transformer.encoder.layers.2.mlp.extra'"):
        load_hf_weights(model_dir, model_config(model_dir), torch.float32)


def test_shard_named_in_index_but_missing(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("bin", seed=16)
    (model_dir / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(GlmEngineError, match="pytorch_model-00002-of-00002.bin is named in"):
        load_hf_weights(model_dir, model_config(model_dir), torch.float32)


def test_unreadable_shard(tiny_checkpoint_factory):
    model_dir = tiny_checkpoint_factory("bin", seed=17)
    (model_dir / "pytorch_model-00001-of-00002.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(GlmEngineError, match="cannot read weights file .*pytorch_model-00001-of-00002.bin"):
        load_hf_weights(model_dir, model_config(model_dir), torch.float32)


def test_bin_files_are_loaded_without_running_pickled_code(tiny_checkpoint_factory, tmp_path):
    """torch.load(weights_only=True) refuses a pickle that would call a function."""
    model_dir = tiny_checkpoint_factory("single_bin", seed=18)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"transformer.output_layer.weight": Payload()}, model_dir / "pytorch_model.bin")
    with pytest.raises(GlmEngineError, match="cannot read weights file"):
        load_hf_weights(model_dir, model_config(model_dir), torch.float32)
    assert not marker.exists()


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "llama", "model_type 'llama'"),
    ("rmsnorm", False, "rmsnorm=False"),
    ("apply_residual_connection_post_layernorm", True, "apply_residual_connection_post_layernorm=True"),
    ("add_bias_linear", True, "add_bias_linear=True"),
    ("post_layer_norm", False, "post_layer_norm=False"),
])
def test_config_this_network_cannot_compute_is_refused(tiny_checkpoint_factory, field, value, message):
    model_dir = tiny_checkpoint_factory("bin", seed=19, **{field: value})
    with pytest.raises(GlmEngineError, match=message):
        model_config(model_dir)


def test_chatglm_v1_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "num_layers": 28,
                                                      "hidden_size": 4096, "inner_hidden_size": 16384}))
    with pytest.raises(GlmEngineError, match="ChatGLM-6B v1 is not supported"):
        model_config(tmp_path)


def test_model_dir_without_config(tmp_path):
    with pytest.raises(GlmEngineError, match="config.json not found"):
        load_hf_config(tmp_path)
    with pytest.raises(GlmEngineError, match="is not a directory"):
        load_hf_config(tmp_path / "absent")


def test_dummy_weights_are_seeded():
    config = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, kv_channels=8,
                         multi_query_group_num=1, ffn_hidden_size=24, vocab_size=32, seq_length=64)
    first, again, other = (dummy_weights(config, torch.float16, seed) for seed in (1, 1, 2))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["output_layer.weight"], other["output_layer.weight"])
    assert {name: tuple(t.shape) for name, t in first.items()} == weight_shapes(config)
