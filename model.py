"""The networks the tools run, as the original example's model.py: each model
family's network lives in glm_engine/models (ChatGLM2/ChatGLM3: models/chatglm.py);
this module picks it from the engine's model config and hands it to the runtime."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glm_engine.config import ModelConfig
from glm_engine.engine_format.engine import Engine
from glm_engine.models import family
from glm_engine.runtime.ops import Ops
from glm_engine.runtime.session import Session


def build_model(config: ModelConfig, ops: Ops, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The network of `config`'s family on `device`, holding exactly `weights`
    (runtime-layout names) and computing with `ops`."""
    return family(config.model_type).build_network(config, ops, weights, device)


def load_session(engine: Engine | str | Path, device: str | torch.device | None = None,
                 **options) -> Session:
    """The engine object (Session) running its family's network on an engine (a directory
    or a loaded Engine); `options` as Session's (cuda_graphs, KV-pool sizing, tokenizer,
    the scheduler's max_in_flight, tokens_per_step and chunked_prefill)."""
    return Session(engine, build_model, device, **options)
