"""Whether an allocation fits the memory left, asked before making it: an absurd size
(a hand-made config, a typo in a flag) becomes a clear error instead of an
allocator traceback or the out-of-memory killer."""

from __future__ import annotations

import torch

from glm_engine import GlmEngineError


def available_bytes(device: torch.device) -> int | None:
    """Free GPU memory on a CUDA device; on the CPU, MemAvailable plus free swap
    (None where /proc/meminfo cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as stream:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in stream if line.split()[1:]}
    except (OSError, ValueError, IndexError):
        return None
    return fields.get("MemAvailable", 0) + fields.get("SwapFree", 0)


def check_fits(what: str, needed: int, device: torch.device, fix: str) -> None:
    """Raises GlmEngineError when `needed` bytes exceed what `device` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise GlmEngineError(f"{what} needs {needed / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB of "
                             f"{'GPU' if device.type == 'cuda' else 'host'} memory is free; {fix}")
