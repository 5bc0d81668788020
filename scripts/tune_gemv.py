"""On a GPU: times the skinny-GEMM kernel (fp16, int8, int4 weights) over block
shapes, K splits and both paths (FMA, tl.dot) on ChatGLM2-6B's four decoder
linears, against cuBLAS (torch linear) on the fp16 weight; prints achieved
weight-stream bandwidth, the best config and the default config's time.
Usage: tune_gemv.py ROWS [ROWS...] [--json FILE]"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.kernels import reference  # noqa: E402
from glm_engine.kernels.gemv import MAX_FMA_ROWS, GemvConfig, default_config, gemv  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "up": (27392, 4096), "down": (4096, 13696)}


def candidates(rows: int) -> list[tuple[bool, GemvConfig]]:
    """(use_dot, config) pairs worth timing for this many rows."""
    configs = []
    if rows <= MAX_FMA_ROWS:
        configs += [(False, GemvConfig(n, k, s)) for n, k, s in itertools.product([4, 8], [256, 512], [1, 2, 4, 8])]
    configs += [(True, GemvConfig(n, k, s)) for n, k, s in itertools.product([16, 32], [256, 512], [1, 2, 4])]
    return configs


def bench(function) -> float:
    return do_bench(function, warmup=5, rep=25, return_mode="median")


def tune(rows: int, results: list[dict]) -> None:
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        cublas_ms = bench(lambda: torch.nn.functional.linear(x, weight))
        print(f"{name} {n}x{k} rows {rows}: cuBLAS {cublas_ms * 1e3:.1f} us = {n * k * 2 / cublas_ms / 1e9:.2f} TB/s")
        for bits in (0, 8, 4):
            stored, scales = (weight, None) if bits == 0 else reference.quantize_per_channel(weight, bits)
            nbytes = stored.numel() * stored.element_size()
            expected = reference.linear(x.float(), reference.dequantize(stored, scales, bits, torch.float32)
                                        if bits else weight.float())
            timed = []
            for use_dot, config in candidates(rows):
                def run(use_dot=use_dot, config=config):
                    return gemv(x, stored, None, scales, bits, config, use_dot)
                error = ((run().float() - expected).norm() / expected.norm()).item()
                ms = bench(run)
                timed.append((ms, use_dot, config, error))
                results.append({"rows": rows, "shape": name, "bits": bits, "use_dot": use_dot,
                                "config": list(config), "us": ms * 1e3, "gb_s": nbytes / ms / 1e6, "error": error})
            best = min(timed, key=lambda item: item[0])
            default_ms = bench(lambda: gemv(x, stored, None, scales, bits))
            print(f"  bits {bits}: best {best[0] * 1e3:.1f} us = {nbytes / best[0] / 1e9:.2f} TB/s "
                  f"{'dot' if best[1] else 'fma'} {tuple(best[2])} (rel err {best[3]:.1e}); default "
                  f"{tuple(default_config(rows, n, k, bits))} {default_ms * 1e3:.1f} us = "
                  f"{nbytes / default_ms / 1e9:.2f} TB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", type=int, nargs="+")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    results: list[dict] = []
    for rows in args.rows:
        tune(rows, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
