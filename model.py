"""The networks the tools run, as the original example's model.py: each model
family's network lives in glm_engine/models (ChatGLM2/ChatGLM3: models/chatglm.py,
GLM-4: models/glm.py and models/glm4.py); glm_engine/api.py picks it from the
engine's model config and hands it to the runtime. This module names them for the
tools: `build_model(config, ops, weights, device)` builds a family's network and
`load_session(engine, device, **options)` opens an engine as a Session."""

from __future__ import annotations

from glm_engine.api import build_network as build_model
from glm_engine.api import load_session

__all__ = ["build_model", "load_session"]
