"""How the decode step's kernels are launched: compiled or in Triton's interpreter,
and whether each may start while the kernel ahead of it finishes.

Programmatic dependent launch (Hopper and later, Triton >= 3.3): a kernel launched
with it is scheduled as the kernel ahead of it ends rather than after, and its
programs wait in `gdc_wait` until that kernel has finished and its writes are
visible. A decode step is ~300 short kernels in a CUDA graph; this hides part of
each one's launch behind its predecessor's tail (docs/PERFORMANCE.md). The kernels do
not signal the next one early (`gdc_launch_dependents`): that measured no faster at
batch 1 and slower at batch 8.

Every kernel launched this way calls `wait_for_previous_kernel` before it reads or
writes anything another kernel touches. Since each waits for the one ahead of it,
which itself waited, a kernel sees every earlier kernel's writes, as in plain
stream order."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

try:
    from triton.language.extra.cuda import gdc_wait
except ImportError:  # Triton before 3.3: kernels launch in plain stream order
    gdc_wait = None


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: wait until the kernel ahead has finished and its writes are visible."""
    if PDL:
        gdc_wait()


def compiled(kernel) -> bool:
    """Whether Triton compiles `kernel` (False under TRITON_INTERPRET=1, decided at import)."""
    return not isinstance(kernel, InterpretedFunction)


@functools.cache
def _hopper_or_later(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def dependent_launch(kernel, device: torch.device) -> dict:
    """Keyword arguments for launching `kernel` (which takes a `PDL` constexpr and calls
    `wait_for_previous_kernel(PDL)` first) on `device`: with programmatic dependent
    launch where the GPU, Triton and the compiled kernel support it."""
    if gdc_wait is None or device.type != "cuda" or not compiled(kernel):
        return {"PDL": False}
    if not _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}
