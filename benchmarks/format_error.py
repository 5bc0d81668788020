"""The rounding error each storage format puts into one linear layer, on the CPU: relative
error of x @ W^T against float32 for a ChatGLM2-6B-sized linear (4096 x 4096) on Gaussian
weights and activations (what the dummy engines hold), through the engine's own
quantizers and reference linears: FP8 E4M3 weights and per-token activations, each
alone, SmoothQuant's int8 W8A8, weight-only int8, and int4 per channel and per 128
inputs. The drift rows of docs/PERFORMANCE.md's accuracy table are 28 layers of four
such linears; this gives the floor a format sets for one.
Usage: format_error.py [--rows 64] [--size 4096] [--seed 0]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.kernels import reference  # noqa: E402
from glm_engine.quantization import Fp8, SmoothQuant, WeightOnly  # noqa: E402
from glm_engine.tools.compare import relative_error  # noqa: E402


def errors(rows: int, size: int, seed: int) -> dict[str, float]:
    """Format name -> relative error of one linear [size, size] on `rows` Gaussian rows."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, size, generator=generator)
    weight = torch.randn(size, size, generator=generator) / size ** 0.5
    exact = x @ weight.t()
    fp8, int8 = Fp8().quantize(weight), SmoothQuant().quantize(weight)
    fp8_weight = Fp8().dequantize(fp8[""], fp8["_scales"], torch.float32)
    x_values, x_scales = reference.quantize_rows_fp8(x)
    found = {
        "FP8 weights and activations": reference.fp8_linear(x, fp8[""], None, fp8["_scales"]),
        "FP8 weights only": x @ fp8_weight.t(),
        "FP8 activations only": (x_values.float() * x_scales) @ weight.t(),
        "SmoothQuant int8 W8A8 (unsmoothed)": reference.int8_linear(x, int8[""], None, int8["_scales"]),
    }
    for name, method in [("int8", WeightOnly("int8")), ("int4", WeightOnly("int4")),
                         ("int4 g128", WeightOnly("int4", 128))]:
        stored = method.quantize(weight)
        found[f"weight-only {name}"] = x @ method.dequantize(stored[""], stored["_scales"], torch.float32).t()
    return {name: relative_error(out, exact) for name, out in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, error in errors(args.rows, args.size, args.seed).items():
        print(f"{name:36s} {error:.3e}")


if __name__ == "__main__":
    main()
