"""The error every tokenizer raises for a directory or file it cannot use."""

from __future__ import annotations

from glm_engine import GlmEngineError


class TokenizerError(GlmEngineError, ValueError):
    """A tokenizer directory or its files are missing or unusable."""
