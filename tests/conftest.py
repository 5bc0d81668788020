"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Make `import glm_engine...` and `import checkpoints` work even when pytest
# is started without pytest.ini (for example from another directory).
# Triton kernels run in Triton's interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton kernels run on a GPU, or on the CPU in Triton's interpreter.
needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="Triton kernels run on a GPU or under TRITON_INTERPRET=1")
# Engines loaded on the CPU run their kernels only in the interpreter (on a GPU machine: the reference ops).
cpu_sessions_run_kernels = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                              reason="CPU sessions run the kernels only under TRITON_INTERPRET=1")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (str(REPO_ROOT), str(TESTS_DIR), str(REPO_ROOT / "scripts")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from checkpoints import chatglm2_state_dict, inject_outliers, tiny_config, write_checkpoint  # noqa: E402
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
@pytest.fixture(scope="session")
def outlier_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny checkpoint whose activations have the outlier channels of real LLMs
    (checkpoints.inject_outliers), for the calibrated quantization schemes."""
    config = tiny_config()
    state = chatglm2_state_dict(config, seed=51)
    inject_outliers(state, config)
    return write_checkpoint(tmp_path_factory.mktemp("outliers"), config, state, "safetensors",
                            tokenizer_dir=tiny_tokenizer_dir)


# End of tiny tokenizer and tiny checkpoints
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Engines and the command-line tools
# ---------------------------------------------------------------------------

# A tiny dummy engine's shape: the tiny checkpoint's, as build.py flags.
TINY_SHAPE_FLAGS = ["--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--multi_query_group_num", "2",
                    "--inter_size", "96", "--vocab_size", "1024"]


def run_tool(script: str, *args: object, cwd: Path | None = None,
             triton_interpreter: bool = False) -> subprocess.CompletedProcess:
    """Runs one of the repository's tools as a user would, on the CPU: engines with
    Triton kernels run the reference ops there, unless `triton_interpreter` runs the
    kernels in Triton's interpreter (slow; the kernels have their own tests)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    if triton_interpreter:
        env["TRITON_INTERPRET"] = "1"
    command = [sys.executable, str(REPO_ROOT / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd or REPO_ROOT, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """A failed tool: non-zero exit, no traceback, one `error:` line naming `fragment`."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert fragment in errors[0], errors[0]


@pytest.fixture(scope="session")
def tiny_engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A function ``(*build_flags) -> engine dir`` that runs build.py once per flag set."""
    built: dict[tuple, Path] = {}

    def make(*flags: object) -> Path:
        key = tuple(map(str, flags))
        if key not in built:
            output_dir = tmp_path_factory.mktemp("engine") / "engine"
            result = run_tool("build.py", "--output_dir", output_dir, "--log_level", "error", *key)
            assert result.returncode == 0, result.stderr
            built[key] = output_dir
        return built[key]

    return make
