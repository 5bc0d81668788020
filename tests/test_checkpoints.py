"""Tests of the tiny ChatGLM2 checkpoint writer used by the other tests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import CHECKPOINT_FORMATS, chatglm2_state_dict, tiny_config, write_checkpoint
from glm_engine.text.tokenizer import ChatGLMTokenizer

# Every config field of THUDM/chatglm2-6b's config.json.
DESIGN_FIELDS = {
    "model_type", "num_layers", "hidden_size", "num_attention_heads", "kv_channels",
    "multi_query_attention", "multi_query_group_num", "ffn_hidden_size", "padded_vocab_size",
    "seq_length", "layernorm_epsilon", "rmsnorm", "add_qkv_bias", "add_bias_linear",
    "apply_residual_connection_post_layernorm", "post_layer_norm", "original_rope",
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "fp32_residual_connection",
    "tie_word_embeddings", "torch_dtype", "eos_token_id", "pad_token_id",
}


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory in any of the four formats."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if index_path.exists():
            state: dict[str, torch.Tensor] = {}
            for file_name in sorted(set(json.loads(index_path.read_text())["weight_map"].values())):
                state.update(_load_file(model_dir / file_name))
            return state
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).exists():
            return _load_file(model_dir / single)
    raise FileNotFoundError(model_dir)


def _expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, heads, d, g, f, v = (c["hidden_size"], c["num_attention_heads"], c["kv_channels"],
                            c["multi_query_group_num"], c["ffn_hidden_size"], c["padded_vocab_size"])
    shapes = {
        "transformer.embedding.word_embeddings.weight": (v, h),
        "transformer.rotary_pos_emb.inv_freq": (d // 4,),
        "transformer.encoder.final_layernorm.weight": (h,),
        "transformer.output_layer.weight": (v, h),
    }
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attention.query_key_value.weight": ((heads + 2 * g) * d, h),
            p + "self_attention.query_key_value.bias": ((heads + 2 * g) * d,),
            p + "self_attention.dense.weight": (h, heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.dense_h_to_4h.weight": (2 * f, h),
            p + "mlp.dense_4h_to_h.weight": (h, f),
        }
    return shapes


def test_tiny_config_is_complete_chatglm2() -> None:
    config = tiny_config()
    assert DESIGN_FIELDS <= set(config)
    assert config["model_type"] == "chatglm" and config["architectures"] == ["ChatGLMModel"]
    assert "AutoModelForCausalLM" in config["auto_map"]
    assert (config["num_layers"], config["hidden_size"], config["num_attention_heads"], config["kv_channels"],
            config["multi_query_group_num"], config["ffn_hidden_size"], config["padded_vocab_size"],
            config["seq_length"]) == (2, 64, 4, 16, 2, 96, 1024, 256)
    assert tiny_config(num_layers=3, rope_ratio=2.0)["num_layers"] == 3
    assert tiny_config(rope_ratio=2.0)["rope_ratio"] == 2.0
    assert "rope_ratio" not in tiny_config()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_layers": 3, "num_attention_heads": 8, "kv_channels": 8, "hidden_size": 64, "multi_query_group_num": 4}],
)
def test_state_dict_names_and_shapes(overrides: dict) -> None:
    config = tiny_config(**overrides)
    state = chatglm2_state_dict(config, seed=0)
    assert {k: tuple(v.shape) for k, v in state.items()} == _expected_shapes(config)
    assert all(v.dtype == torch.float32 for v in state.values())


def test_rotary_inv_freq_matches_chatglm2() -> None:
    inv_freq = chatglm2_state_dict(tiny_config(), seed=0)["transformer.rotary_pos_emb.inv_freq"]
    # kv_channels 16 -> rotary over 8 dims -> 4 frequencies 10000^(-j/8), j = 0, 2, 4, 6.
    expected = torch.tensor([10000 ** (-j / 8) for j in (0, 2, 4, 6)])
    torch.testing.assert_close(inv_freq, expected)


def test_state_dict_is_seeded_and_scaled() -> None:
    config = tiny_config()
    a, b, c = (chatglm2_state_dict(config, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.output_layer.weight"], c["transformer.output_layer.weight"])
    norm = a["transformer.encoder.layers.0.input_layernorm.weight"]
    assert 0.8 < norm.mean() < 1.2 and norm.std() > 0.01
    assert 0.8 < a["transformer.embedding.word_embeddings.weight"].std() < 1.2
    half = chatglm2_state_dict(config, seed=0, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())


@pytest.mark.parametrize("fmt", CHECKPOINT_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_format_round_trips(tmp_path: Path, fmt: str, dtype: torch.dtype) -> None:
    config = tiny_config(torch_dtype=str(dtype).removeprefix("torch."))
    state = chatglm2_state_dict(config, seed=3, dtype=dtype)
    model_dir = write_checkpoint(tmp_path / "ckpt", config, state, fmt)
    assert json.loads((model_dir / "config.json").read_text()) == config
    loaded = _load_checkpoint(model_dir)
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == dtype, name
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(("fmt", "stem", "ext"), [("bin", "pytorch_model", "bin"), ("safetensors", "model", "safetensors")])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
def test_index_covers_every_tensor(tmp_path: Path, fmt: str, stem: str, ext: str, num_shards: int) -> None:
    config = tiny_config()
    state = chatglm2_state_dict(config, seed=0)
    model_dir = write_checkpoint(tmp_path, config, state, fmt, num_shards=num_shards)
    index = json.loads((model_dir / f"{stem}.{ext}.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    assert weight_map.keys() == state.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())

    files = sorted(set(weight_map.values()))
    assert files == [f"{stem}-{n:05d}-of-{num_shards:05d}.{ext}" for n in range(1, num_shards + 1)]
    for file_name in files:
        stored = _load_file(model_dir / file_name)
        assert set(stored) == {k for k, f in weight_map.items() if f == file_name}
        if num_shards <= 2:
            assert len(stored) >= 2
    # No other weight files lie around to confuse a loader.
    weight_files = {p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".safetensors")}
    assert weight_files == set(files)


def test_layers_are_not_split_across_shards(tmp_path: Path) -> None:
    config = tiny_config(num_layers=4)
    model_dir = write_checkpoint(tmp_path, config, chatglm2_state_dict(config, seed=0), "bin", num_shards=3)
    weight_map = json.loads((model_dir / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shard_of_layer: dict[int, set[str]] = {}
    for name, file_name in weight_map.items():
        match = re.match(r"transformer\.encoder\.layers\.(\d+)\.", name)
        if match:
            shard_of_layer.setdefault(int(match.group(1)), set()).add(file_name)
    assert all(len(files) == 1 for files in shard_of_layer.values())
    assert weight_map["transformer.embedding.word_embeddings.weight"].startswith("pytorch_model-00001-")
    assert weight_map["transformer.output_layer.weight"].startswith("pytorch_model-00003-")


def test_single_file_names(tmp_path: Path) -> None:
    config = tiny_config()
    state = chatglm2_state_dict(config, seed=0)
    bin_dir = write_checkpoint(tmp_path / "b", config, state, "single_bin")
    st_dir = write_checkpoint(tmp_path / "s", config, state, "single_safetensors")
    assert sorted(p.name for p in bin_dir.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert sorted(p.name for p in st_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_bad_arguments(tmp_path: Path) -> None:
    config = tiny_config()
    state = chatglm2_state_dict(config, seed=0)
    with pytest.raises(ValueError, match="format"):
        write_checkpoint(tmp_path, config, state, "gguf")
    with pytest.raises(ValueError, match="num_shards"):
        write_checkpoint(tmp_path, config, state, "bin", num_shards=5)


def test_factory_writes_checkpoint_with_tokenizer(tiny_checkpoint_factory, tiny_tokenizer_dir: Path) -> None:
    model_dir = tiny_checkpoint_factory("safetensors", seed=1, num_layers=3, torch_dtype="float16")
    assert {"config.json", "tokenizer.model", "model.safetensors.index.json"} <= {p.name for p in model_dir.iterdir()}
    assert not any(p.suffix == ".py" for p in model_dir.iterdir())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["num_layers"] == 3
    state = _load_checkpoint(model_dir)
    assert state["transformer.output_layer.weight"].dtype == torch.float16
    assert "transformer.encoder.layers.2.mlp.dense_4h_to_h.weight" in state
    tok = ChatGLMTokenizer.from_dir(model_dir)
    assert tok.vocab_size <= config["padded_vocab_size"]
    assert (model_dir / "tokenizer.model").read_bytes() == (tiny_tokenizer_dir / "tokenizer.model").read_bytes()
    # Each call writes a fresh directory.
    assert tiny_checkpoint_factory("safetensors", seed=1) != model_dir
