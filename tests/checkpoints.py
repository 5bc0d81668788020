"""Write tiny ChatGLM2-format Hugging Face checkpoints for tests.

The layout (config fields, parameter names and shapes, shard and index file
names) follows THUDM/chatglm2-6b's, so code that loads these tiny checkpoints
loads the real THUDM/chatglm2-6b the same way.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm_engine.text.tokenizer import TOKENIZER_FILES

CHECKPOINT_FORMATS: tuple[str, ...] = ("bin", "safetensors", "single_bin", "single_safetensors")


def tiny_config(**overrides: object) -> dict:
    """A complete ChatGLM2 ``config.json`` dict with tiny sizes; ``overrides`` replace fields.

    ``torch_dtype`` is ``float32`` to match :func:`chatglm2_state_dict`'s
    default; override it when writing half-precision weights.
    """
    config: dict = {
        "_name_or_path": "chatglm2-tiny",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        # Same as the real checkpoint; nothing here ever imports these modules.
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "ffn_hidden_size": 96,
        "padded_vocab_size": 1024,
        "seq_length": 256,
        "layernorm_epsilon": 1e-5,
        "rmsnorm": True,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "original_rope": True,
        "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True,
        "fp32_residual_connection": False,
        "bias_dropout_fusion": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eos_token_id": 2,
        "pad_token_id": 0,
        "use_cache": True,
        "transformers_version": "4.27.1",
    }
    config.update(overrides)
    return config


def rotary_inv_freq(kv_channels: int) -> torch.Tensor:
    """ChatGLM2's stored ``rotary_pos_emb.inv_freq``: rotary acts on half of each head."""
    rot_dim = kv_channels // 2
    return 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def chatglm2_state_dict(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights with every ChatGLM2 parameter name and shape for ``config``.

    Matrices are scaled by ``1/sqrt(fan_in)`` rather than the usual 0.02 so
    that every layer moves the residual stream and attention is far from
    uniform at these tiny widths; the output layer is scaled up so logits
    have a spread of a few units and greedy argmax is not a near-tie.
    Norm weights are ``1 +`` noise, so a wrong norm weight still shows.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(dtype)

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config["kv_channels"]
    groups = config["multi_query_group_num"] if config.get("multi_query_attention", True) else heads
    ffn = config["ffn_hidden_size"]
    vocab = config["padded_vocab_size"]
    qkv_rows = (heads + 2 * groups) * head_dim

    state: dict[str, torch.Tensor] = {
        "transformer.embedding.word_embeddings.weight": normal(vocab, hidden, std=1.0),
        "transformer.rotary_pos_emb.inv_freq": rotary_inv_freq(head_dim).to(dtype),
    }
    for i in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{i}."
        state[prefix + "input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        state[prefix + "self_attention.query_key_value.weight"] = normal(qkv_rows, hidden, std=1 / math.sqrt(hidden))
        state[prefix + "self_attention.query_key_value.bias"] = normal(qkv_rows, std=0.1)
        state[prefix + "self_attention.dense.weight"] = normal(hidden, heads * head_dim, std=0.5 / math.sqrt(hidden))
        state[prefix + "post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        state[prefix + "mlp.dense_h_to_4h.weight"] = normal(2 * ffn, hidden, std=1 / math.sqrt(hidden))
        state[prefix + "mlp.dense_4h_to_h.weight"] = normal(hidden, ffn, std=0.5 / math.sqrt(ffn))
    state["transformer.encoder.final_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
    state["transformer.output_layer.weight"] = normal(vocab, hidden, std=3 / math.sqrt(hidden))
    return state


def _layer_unit(name: str, num_layers: int) -> int:
    """Which sharding unit a tensor belongs to: 0 for embeddings, i+1 for layer i, last for the head."""
    marker = "transformer.encoder.layers."
    if name.startswith(marker):
        return int(name[len(marker) :].split(".", 1)[0]) + 1
    if name.startswith(("transformer.embedding.", "transformer.rotary_pos_emb.")):
        return 0
    return num_layers + 1


def _shard_groups(state_dict: dict[str, torch.Tensor], num_layers: int, num_shards: int) -> list[list[str]]:
    """Tensor names per shard; whole layers stay together, as in the real checkpoint."""
    num_units = num_layers + 2
    if not 1 <= num_shards <= num_units:
        raise ValueError(f"num_shards must be between 1 and {num_units} for {num_layers} layers, got {num_shards}")
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    for name in state_dict:
        # Contiguous, near-equal runs of units per shard.
        groups[_layer_unit(name, num_layers) * num_shards // num_units].append(name)
    return groups


def _write_sharded(
    model_dir: Path, state_dict: dict[str, torch.Tensor], groups: list[list[str]], safetensors: bool
) -> None:
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    weight_map: dict[str, str] = {}
    for n, names in enumerate(groups, start=1):
        file_name = f"{stem}-{n:05d}-of-{len(groups):05d}.{ext}"
        shard = {name: state_dict[name].contiguous() for name in names}
        if safetensors:
            save_file(shard, str(model_dir / file_name), metadata={"format": "pt"})
        else:
            torch.save(shard, model_dir / file_name)
        weight_map.update({name: file_name for name in names})
    total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (model_dir / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_checkpoint(
    model_dir: str | Path,
    config: dict,
    state_dict: dict[str, torch.Tensor],
    fmt: str,
    num_shards: int = 2,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write ``config.json`` and the weights of a ChatGLM2 checkpoint; return ``model_dir``.

    ``fmt`` is ``"bin"`` (``pytorch_model-0000N-of-0000M.bin`` shards plus
    ``pytorch_model.bin.index.json``), ``"safetensors"`` (``model-...safetensors``
    shards plus ``model.safetensors.index.json``), ``"single_bin"``
    (``pytorch_model.bin``) or ``"single_safetensors"`` (``model.safetensors``).
    ``num_shards`` applies to the sharded formats.  Tokenizer files found in
    ``tokenizer_dir`` are copied alongside.
    """
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {', '.join(CHECKPOINT_FORMATS)}")
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    if fmt == "single_bin":
        torch.save({k: v.contiguous() for k, v in state_dict.items()}, out / "pytorch_model.bin")
    elif fmt == "single_safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    else:
        groups = _shard_groups(state_dict, config["num_layers"], num_shards)
        _write_sharded(out, state_dict, groups, safetensors=(fmt == "safetensors"))

    if tokenizer_dir is not None:
        for file_name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / file_name
            if source.is_file():
                shutil.copyfile(source, out / file_name)
    return out


def inject_outliers(state: dict[str, torch.Tensor], config: dict, factor: float = 30.0,
                    hidden_channels: tuple[int, ...] = (3, 17, 40), ffn_channels: tuple[int, ...] = (5, 60)) -> None:
    """Gives the network the activation outliers real LLMs have, without changing what it
    computes: a few hidden channels' norm weights times `factor` and the matching input
    columns of the linears they feed divided by it; a few MLP channels' up rows times it
    and the down projection's columns divided by it."""
    ffn = config["ffn_hidden_size"]
    for i in range(config["num_layers"]):
        prefix = f"transformer.encoder.layers.{i}."
        for norm, linear in (("input_layernorm", "self_attention.query_key_value"),
                             ("post_attention_layernorm", "mlp.dense_h_to_4h")):
            state[prefix + norm + ".weight"][list(hidden_channels)] *= factor
            state[prefix + linear + ".weight"][:, list(hidden_channels)] /= factor
        state[prefix + "mlp.dense_h_to_4h.weight"][[ffn + channel for channel in ffn_channels]] *= factor
        state[prefix + "mlp.dense_4h_to_h.weight"][:, list(ffn_channels)] /= factor
