"""The kernels build.py compiles on a GPU travel with the engine (glm_engine/engine_format/kernel_cache.py):
listed in kernels.json with their group files made relative, copied at start-up into
Triton's cache where Triton's own reader finds them, never over what is there, and
only for the architecture and Triton version they were compiled for. The cache
entries here are written by Triton's own cache writer (compiling needs a GPU); the
GPU run (benchmarks/startup.sh) measures the start-up they save."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from triton.runtime.cache import FileCacheManager

from conftest import TINY_SHAPE_FLAGS
from glm_engine import GlmEngineError
from glm_engine.engine_format import kernel_cache
from glm_engine.engine_format.engine_dir import check_output_dir

TARGET = {"arch": "sm_90", "triton": "3.6.0", "gpu": "NVIDIA H100 80GB HBM3"}


def compile_into(cache: Path, monkeypatch) -> dict[str, str]:
    """Two kernels' entries as Triton writes them into `cache` (binary, metadata, group
    file naming both by absolute path); {file name: contents}."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    contents = {}
    for key, name in (("KEYGEMV", "_gemv_kernel"), ("KEYNORM", "_add_rms_norm_kernel")):
        manager = FileCacheManager(key)
        binary = manager.put(f"{name} cubin".encode(), f"{name}.cubin")
        metadata = manager.put(f'{{"name": "{name}"}}', f"{name}.json", binary=False)
        manager.put_group(f"{name}.json", {f"{name}.cubin": binary, f"{name}.json": metadata})
        contents[f"{name}.cubin"], contents[f"{name}.json"] = f"{name} cubin", f'{{"name": "{name}"}}'
    return contents


@pytest.fixture
def engine_with_kernels(tiny_engine_factory, tmp_path, monkeypatch) -> Path:
    """A tiny engine whose kernels were 'compiled' in its staging directory, which was then renamed."""
    staging = tmp_path / ".engine.building-1"
    shutil.copytree(tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "8", "--max_output_len", "4"),
                    staging)
    compile_into(staging / "kernels", monkeypatch)
    assert kernel_cache.write_manifest(staging, TARGET) == 6
    return staging.rename(tmp_path / "engine")


def test_the_engines_kernels_are_found_by_triton_in_the_users_cache(engine_with_kernels, tmp_path, monkeypatch):
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(user_cache))
    monkeypatch.setattr(kernel_cache, "compile_target", lambda device: TARGET)
    assert kernel_cache.seed_triton_cache(engine_with_kernels, torch.device("cpu")) == 6
    for key, name in (("KEYGEMV", "_gemv_kernel"), ("KEYNORM", "_add_rms_norm_kernel")):
        group = FileCacheManager(key).get_group(f"{name}.json")  # Triton's lookup before it compiles
        assert group is not None and sorted(group) == [f"{name}.cubin", f"{name}.json"]
        assert all(Path(path).parent == user_cache / key for path in group.values())
    assert (user_cache / "KEYGEMV" / "_gemv_kernel.cubin").read_bytes() == b"_gemv_kernel cubin"
    assert not list(user_cache.rglob("*.partial"))


def test_seeding_never_replaces_what_the_cache_holds(engine_with_kernels, tmp_path, monkeypatch):
    user_cache = tmp_path / "user_cache"
    (user_cache / "KEYGEMV").mkdir(parents=True)
    (user_cache / "KEYGEMV" / "_gemv_kernel.cubin").write_bytes(b"the user's own")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(user_cache))
    monkeypatch.setattr(kernel_cache, "compile_target", lambda device: TARGET)
    assert kernel_cache.seed_triton_cache(engine_with_kernels, torch.device("cpu")) == 5
    assert (user_cache / "KEYGEMV" / "_gemv_kernel.cubin").read_bytes() == b"the user's own"
    assert kernel_cache.seed_triton_cache(engine_with_kernels, torch.device("cpu")) == 0


@pytest.mark.parametrize("other", [{"arch": "sm_80"}, {"triton": "3.5.0"}])
def test_kernels_of_another_gpu_or_triton_are_not_used(engine_with_kernels, tmp_path, monkeypatch, caplog, other):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "user_cache"))
    monkeypatch.setattr(kernel_cache, "compile_target", lambda device: {**TARGET, **other})
    with caplog.at_level(logging.INFO, logger="kernels"):
        assert kernel_cache.seed_triton_cache(engine_with_kernels, torch.device("cpu")) == 0
    assert "the engine's kernels were compiled for sm_90 with Triton 3.6.0" in caplog.text
    assert not (tmp_path / "user_cache").exists()


def test_an_engine_without_kernels_says_they_are_compiled(tiny_engine_factory, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "user_cache"))
    engine = tiny_engine_factory(*TINY_SHAPE_FLAGS, "--max_input_len", "8", "--max_output_len", "4")
    with caplog.at_level(logging.INFO, logger="kernels"):
        assert kernel_cache.seed_triton_cache(engine, torch.device("cpu")) == 0
    assert "the engine holds no kernels compiled at build" in caplog.text


def test_a_rebuild_replaces_an_engine_with_kernels_but_not_what_the_user_added(engine_with_kernels):
    check_output_dir(engine_with_kernels, {})  # its kernels are the engine's own
    (engine_with_kernels / "kernels" / "notes.txt").write_text("the user's file\n")
    with pytest.raises(GlmEngineError, match="holds 'kernels/notes.txt', which build.py did not write"):
        check_output_dir(engine_with_kernels, {})
    (engine_with_kernels / "kernels" / "notes.txt").unlink()
    (engine_with_kernels / "kernels.json").unlink()
    with pytest.raises(GlmEngineError, match="holds 'kernels', which build.py did not write"):
        check_output_dir(engine_with_kernels, {})


def test_an_unwritable_cache_means_compiling_not_a_failed_start(engine_with_kernels, tmp_path, monkeypatch, caplog):
    (tmp_path / "not_a_directory").write_text("x")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "not_a_directory"))
    monkeypatch.setattr(kernel_cache, "compile_target", lambda device: TARGET)
    with caplog.at_level(logging.WARNING, logger="kernels"):
        assert kernel_cache.seed_triton_cache(engine_with_kernels, torch.device("cpu")) == 0
    assert "could not copy the engine's compiled kernels into Triton's cache" in caplog.text
