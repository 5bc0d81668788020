"""On a GPU: times the skinny-GEMM kernel (fp16, int8, int4 weights) over block
shapes on ChatGLM2-6B's four decoder linears, against cuBLAS (torch linear) on
the fp16 weight; prints achieved weight-stream bandwidth and the best config."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.kernels import reference  # noqa: E402
from glm_engine.kernels.gemv import gemv  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "up": (27392, 4096), "down": (4096, 13696)}
CONFIGS = list(itertools.product([16, 32], [256, 512], [4, 8], [3, 4]))


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        cublas_ms = do_bench(lambda: torch.nn.functional.linear(x, weight), return_mode="median")
        print(f"{name} {n}x{k} rows {rows}: cuBLAS {cublas_ms * 1e3:.1f} us = {n * k * 2 / cublas_ms / 1e9:.0f} GB/s")
        for bits in (0, 8, 4):
            stored, scales = (weight, None) if bits == 0 else reference.quantize_per_channel(weight, bits)
            expected = reference.linear(x.float(), reference.dequantize(stored, scales, bits, torch.float32)
                                        if bits else weight.float())
            results = []
            for block_n, block_k, warps, stages in CONFIGS:
                def run():
                    return gemv(x, stored, None, scales, bits, block_n, block_k, warps, stages)
                error = ((run().float() - expected).norm() / expected.norm()).item()
                ms = do_bench(run, return_mode="median")
                results.append((ms, block_n, block_k, warps, stages, error))
            best = min(results)
            nbytes = stored.numel() * stored.element_size()
            print(f"  bits {bits}: best {best[0] * 1e3:.1f} us = {nbytes / best[0] / 1e9:.0f} GB/s with "
                  f"block_n {best[1]} block_k {best[2]} warps {best[3]} stages {best[4]} (rel err {best[5]:.1e});"
                  f" default-config {results[CONFIGS.index((16, 512, 4, 4))][0] * 1e3:.1f} us")


if __name__ == "__main__":
    main()
