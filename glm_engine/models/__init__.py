"""Model families, by the model_type of their checkpoints' config.json. A family is
one module holding everything particular to it:

- `MODEL_TYPE`; `model_config(hf_config, rope_ratio_mode)`: its config.json read into a ModelConfig
- `LINEARS`, `UP_PROJECTION`, `weight_shapes(config)`, `parameter_count(config)`: the runtime layout
- `tensor_split(name)`: how tensor parallelism cuts each tensor (tensor_parallel.py)
- `IGNORED_TENSORS`, `runtime_name(name)`, `checkpoint_name(name)`: the checkpoint's tensor names
- `build_network(config, ops, weights, device)`: the network, over the op table and the KV cache
- `reference_config(config)`, `reference_model(hf_config)`, `reference_state_dict(config, weights)`: the
  Hugging Face reference

A new family is a new module and a line in FAMILIES."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.models import chatglm

FAMILIES: dict[str, ModuleType] = {chatglm.MODEL_TYPE: chatglm}


def family(model_type: str) -> ModuleType:
    """The family module of `model_type`."""
    found = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if found is None:
        raise GlmEngineError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return found


def checkpoint_family(hf_config: dict[str, Any]) -> ModuleType:
    """The family of a checkpoint's config.json, with a clear error for any other."""
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise GlmEngineError(f"config.json has model_type {model_type!r}; only ChatGLM2/ChatGLM3 "
                             "checkpoints (model_type 'chatglm') are supported")
    return FAMILIES[model_type]


def read_model_config(hf_config: dict[str, Any], rope_ratio_mode: str | None = None) -> ModelConfig:
    """A checkpoint's config.json read by its family."""
    return checkpoint_family(hf_config).model_config(hf_config, rope_ratio_mode)
