"""Shared pytest fixtures."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Make `import glm_engine...` and `import checkpoints` work even when pytest
# is started without pytest.ini (for example from another directory).
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(REPO_ROOT), str(TESTS_DIR), str(REPO_ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from checkpoints import chatglm2_state_dict, tiny_config, write_checkpoint  # noqa: E402
from make_demo_tokenizer import train_demo_tokenizer  # noqa: E402

# ---------------------------------------------------------------------------
# Tiny tokenizer and tiny checkpoints
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a tiny ChatGLM2-flavored ``tokenizer.model`` trained on the sample data."""
    return train_demo_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> Callable[..., Path]:
    """A function ``(fmt, seed=0, **config_overrides) -> Path`` writing a fresh tiny checkpoint.

    ``fmt`` is one of ``bin``, ``safetensors``, ``single_bin``,
    ``single_safetensors``; the checkpoint includes the tiny tokenizer.  The
    weights are stored in the config's ``torch_dtype`` (override it, e.g.
    ``torch_dtype="float16"``, for half-precision checkpoints like the real one).
    """

    def make(fmt: str, seed: int = 0, **config_overrides: object) -> Path:
        config = tiny_config(**config_overrides)
        state_dict = chatglm2_state_dict(config, seed, dtype=getattr(torch, config["torch_dtype"]))
        model_dir = tmp_path_factory.mktemp(f"tiny_chatglm2_{fmt}_seed{seed}")
        return write_checkpoint(model_dir, config, state_dict, fmt, tokenizer_dir=tiny_tokenizer_dir)

    return make


# ---------------------------------------------------------------------------
# End of tiny tokenizer and tiny checkpoints
# ---------------------------------------------------------------------------
