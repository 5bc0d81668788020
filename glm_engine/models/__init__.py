"""Model families, by the model_type of their checkpoints' config.json. A family is
one module holding everything particular to it:

- `MODEL_TYPE`; `model_config(hf_config, rope_ratio_mode)`: its config.json read into a ModelConfig
- `LINEARS`, `UP_PROJECTION`, `weight_shapes(config)`, `parameter_count(config)`: the runtime layout
- `tensor_split(name)`: how tensor parallelism cuts each tensor (tensor_parallel.py)
- `IGNORED_TENSORS`, `checkpoint_tensors(config)`: the checkpoint's tensor names, each with the
  runtime-layout tensor it is (or, concatenated by rows in that order with others, makes) and its shape
- `build_network(config, ops, weights, device)`: the network, over the op table and the KV cache
- `reference_config(config)`, `reference_model(hf_config)`, `reference_state_dict(config, weights)`: the
  Hugging Face reference

A new family is a new module and a line in FAMILIES."""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig, is_integer
from glm_engine.models import chatglm, glm, glm4

FAMILIES: dict[str, ModuleType] = {module.MODEL_TYPE: module for module in (chatglm, glm, glm4)}


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
        raise GlmEngineError(f"config.json has model_type {model_type!r}; only ChatGLM2/ChatGLM3/GLM-4 "
                             f"checkpoints (model_type {', '.join(map(repr, sorted(FAMILIES)))}) are supported")
    return FAMILIES[model_type]


def read_model_config(hf_config: dict[str, Any], rope_ratio_mode: str | None = None,
                      generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """A checkpoint's config.json read by its family; the end ids of its generation_config.json
    (GLM-4's lists ids its config.json may lack) are added after config.json's."""
    config = checkpoint_family(hf_config).model_config(hf_config, rope_ratio_mode)
    extra = (generation_config or {}).get("eos_token_id")
    if extra is None:
        return config
    extra = extra if isinstance(extra, list) else [extra]
    if not all(is_integer(token) for token in extra):
        raise GlmEngineError(f"generation_config.json: eos_token_id must be an integer or a list of integers, "
                             f"got {extra!r}")
    return dataclasses.replace(config, eos_token_ids=tuple(dict.fromkeys([*config.eos_token_ids, *extra])))
