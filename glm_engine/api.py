"""The Python API in one import, wherever glm_engine is installed (no repository files
needed): load_session opens an engine directory as a Session running its model
family's network; load_tokenizer reads an engine's or checkpoint's tokenizer (SentencePiece
for ChatGLM2/3, GLM-4's BPE); SamplingConfig, ChatGLMTokenizer and RequestOutput are what
a caller passes and gets back; SpeculativeConfig turns on speculative decoding."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from glm_engine.config import ModelConfig
from glm_engine.engine_format.engine import Engine
from glm_engine.models import family
from glm_engine.runtime.ops import Ops
from glm_engine.runtime.drafting import SpeculativeConfig
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import RequestOutput, Session
from glm_engine.text.tokenizer import ChatGLMTokenizer, load_tokenizer

__all__ = ["ChatGLMTokenizer", "RequestOutput", "SamplingConfig", "Session", "SpeculativeConfig", "build_network",
           "load_session", "load_tokenizer"]


def build_network(config: ModelConfig, ops: Ops, weights: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """The network of `config`'s model family on `device`, holding `weights` (runtime-layout
    names) and computing with `ops`: the builder a Session takes."""
    return family(config.model_type).build_network(config, ops, weights, device)


def load_session(engine: Engine | str | Path, device: str | torch.device | None = None, **options) -> Session:
    """The engine object (Session) on an engine directory or a loaded Engine, on `device`
    (default: cuda when available); `options` as Session's (cuda_graphs, KV-pool sizing,
    tokenizer, the scheduler's max_in_flight, tokens_per_step and chunked_prefill, prefix_caching, speculative)."""
    return Session(engine, build_network, device, **options)
