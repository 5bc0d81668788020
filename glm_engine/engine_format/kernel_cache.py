"""The engine's compiled kernels: Triton's binaries for one GPU architecture and
Triton version, kept in the engine directory as TensorRT keeps its engine's.

build.py, on a GPU, runs the finished engine once in a child process whose Triton
cache is the staging engine's `kernels/` directory, then writes `kernels.json`
(what they were compiled for, and every file). At start-up, `seed_triton_cache`
copies them into the user's Triton cache (only entries it lacks; nothing there is
replaced), so the first start does not compile (H100, the all-plugins 6B engine: the
decode graphs' capture 0.9 s instead of 10.2 s; docs/PERFORMANCE.md). On another
architecture or Triton version the kernels are compiled as before, with a log line
saying why.

Triton's cache is a directory per kernel (named by a hash of its source, options,
target and Triton's own version) holding the binary, its metadata and a group file
naming them by absolute path: the engine keeps those paths relative to kernels/,
and the copies name their place in the user's cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from glm_engine.engine_format.engine_dir import KERNELS_DIR, KERNELS_MANIFEST

logger = logging.getLogger("kernels")

GROUP_PREFIX = "__grp__"  # Triton's group files: {"child_paths": {file name: absolute path}}


def compile_target(device: torch.device) -> dict:
    """What Triton compiles for on `device`: the GPU architecture and Triton's version."""
    import triton

    major, minor = torch.cuda.get_device_capability(device)
    return {"arch": f"sm_{major}{minor}", "triton": triton.__version__,
            "gpu": torch.cuda.get_device_name(device)}


def triton_cache_dir() -> Path:
    """The Triton cache this process compiles into (TRITON_CACHE_DIR, or Triton's default)."""
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except ImportError:  # Triton before 3.4
        from triton.runtime.cache import default_cache_dir

        return Path(default_cache_dir())


def write_manifest(engine_dir: Path, target: dict) -> int:
    """Lists every file compiled into `engine_dir`/kernels in `engine_dir`/kernels.json,
    after making the group files' paths relative to kernels/ (the directory is renamed
    into place later); returns the number of files."""
    kernels = engine_dir / KERNELS_DIR
    root = kernels.resolve()
    files = sorted(path for path in kernels.rglob("*") if path.is_file())

    def relative(child: str) -> str:
        resolved = Path(child).resolve()
        return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else child

    for path in files:
        if path.name.startswith(GROUP_PREFIX):
            _rewrite_group(path, path, relative)
    manifest = {**target, "files": [str(path.relative_to(kernels)) for path in files]}
    (engine_dir / KERNELS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return len(files)


def read_manifest(engine_dir: Path) -> dict | None:
    """The engine's kernels.json, or None when it has none or it is unreadable."""
    try:
        manifest = json.loads((engine_dir / KERNELS_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("files"), list)
    return manifest if ok else None


def seed_triton_cache(engine_dir: Path, device: torch.device) -> int:
    """Copies the engine's compiled kernels into Triton's cache when they were compiled
    for `device`'s architecture and this Triton; returns how many files were copied
    (entries already there are left as they are). Logs why when they cannot be used."""
    manifest = read_manifest(engine_dir)
    if manifest is None:
        logger.info("the engine holds no kernels compiled at build (built without a GPU, or tensor-parallel): "
                    "Triton compiles what this machine has not cached yet")
        return 0
    target = compile_target(device)
    if (manifest.get("arch"), manifest.get("triton")) != (target["arch"], target["triton"]):
        logger.info("the engine's kernels were compiled for %s with Triton %s; this GPU is %s with Triton %s: "
                    "compiling them (the first start takes longer)", manifest.get("arch"), manifest.get("triton"),
                    target["arch"], target["triton"])
        return 0
    source, cache = engine_dir / KERNELS_DIR, triton_cache_dir()
    copied = 0
    try:
        for name in manifest["files"]:
            relative = Path(name)
            destination = cache / relative
            if relative.is_absolute() or ".." in relative.parts or destination.exists():
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            _copy_entry(source / relative, destination, cache)
            copied += 1
    except (OSError, ValueError) as error:  # an unwritable cache, a damaged engine: Triton compiles instead
        logger.warning("could not copy the engine's compiled kernels into Triton's cache %s (%s): Triton compiles "
                       "what is missing", cache, error)
        return copied
    logger.info("%d of the engine's %d compiled files copied into Triton's cache %s", copied,
                len(manifest["files"]), cache)
    return copied


def _copy_entry(path: Path, destination: Path, cache: Path) -> None:
    """Copies one cache file, through a temporary name so a reader never sees half of it;
    a group file's relative paths become paths in `cache`."""
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    if path.name.startswith(GROUP_PREFIX):
        _rewrite_group(path, partial, lambda child: child if Path(child).is_absolute() else str(cache / child))
    else:
        shutil.copyfile(path, partial)
    os.replace(partial, destination)


def _rewrite_group(path: Path, destination: Path, move: Callable[[str], str]) -> None:
    """Writes Triton group file `path` to `destination` with each child path moved by `move`
    (a file of another form is copied as it is)."""
    group = json.loads(path.read_text(encoding="utf-8"))
    children = group.get("child_paths") if isinstance(group, dict) else None
    if isinstance(children, dict):
        group["child_paths"] = {child: move(child_path) for child, child_path in children.items()}
    destination.write_text(json.dumps(group), encoding="utf-8")
