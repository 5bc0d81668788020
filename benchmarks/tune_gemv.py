"""On a GPU: times the skinny-GEMM kernel (fp16, int8, int4 weights) over block
shapes, K splits and every path (FMA, tl.dot, and half2 at one row on quantized
weights) on ChatGLM2-6B's four decoder linears, against cuBLAS (torch linear) on
the fp16 weight; prints achieved weight-stream bandwidth, the best config and the
default config's time.

Timed as the engine runs them: inside a CUDA graph (no Python launch cost,
which exceeds these kernels' GPU time), over enough copies of the weight
(>= 256 MB) that each call streams it from HBM rather than L2.
Usage: tune_gemv.py ROWS [ROWS...] [--bits B...] [--group_size G] [--json FILE]"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.compare import relative_error  # noqa: E402
from glm_engine.kernels import reference
from glm_engine.quantization import quantize_symmetric  # noqa: E402
from glm_engine.kernels.gemv import MAX_FMA_ROWS, GemvConfig, default_config, gemv  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "up": (27392, 4096), "down": (4096, 13696)}


def candidates(rows: int, bits: int) -> list[GemvConfig]:
    """Configs worth timing for this many rows of fp16 x on these weights."""
    configs = []
    if rows == 1 and bits:
        configs += [GemvConfig(n, k, s, False, half2=True)
                    for n, k, s in itertools.product([4, 8, 16, 32], [256, 512, 1024], [1, 2])]
    if rows <= MAX_FMA_ROWS:
        configs += [GemvConfig(n, k, s, False) for n, k, s in itertools.product([4, 8, 16], [256, 512], [1, 2, 4])]
    configs += [GemvConfig(n, k, s, True) for n, k, s in itertools.product([16, 32], [256, 512], [1, 2, 4])]
    return configs


def graph_us(calls: list) -> float:
    """Microseconds per call of `calls`, all captured in one CUDA graph and replayed."""
    for call in calls:
        call()  # compiles, allocates
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 10
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def tune(rows: int, bits_list: list[int], group_size: int, results: list[dict]) -> None:
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        copies = [weight] + [weight.clone() for _ in range(max(1, -(-256_000_000 // weight.nbytes)) - 1)]
        cublas_us = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in copies])
        print(f"{name} {n}x{k} rows {rows}: cuBLAS {cublas_us:.1f} us = {n * k * 2 / cublas_us / 1e6:.2f} TB/s")
        del copies
        for bits in bits_list:
            stored, scales = (weight, None) if bits == 0 else quantize_symmetric(weight, bits, group_size)
            nbytes = stored.numel() * stored.element_size()
            # Scales cloned with each copy too: group scales are 1/16 of int4 weights' bytes, read from HBM as well.
            stored_copies = [(stored, scales)] + [(stored.clone(), None if scales is None else scales.clone())
                                                  for _ in range(max(1, -(-256_000_000 // nbytes)) - 1)]
            expected = reference.linear(x.float(), reference.dequantize(stored, scales, bits, torch.float32)
                                        if bits else weight.float())
            timed = []
            for config in candidates(rows, bits):
                error = relative_error(gemv(x, stored, None, scales, bits, config), expected)
                us = graph_us([lambda w=w, s=s, config=config: gemv(x, w, None, s, bits, config)
                               for w, s in stored_copies])
                timed.append((us, config, error))
                results.append({"rows": rows, "shape": name, "bits": bits, "group_size": group_size,
                                "config": list(config), "us": us,
                                "tb_s": nbytes / us / 1e6, "error": error})
            best = min(timed, key=lambda item: item[0])
            default_us = graph_us([lambda w=w, s=s: gemv(x, w, None, s, bits) for w, s in stored_copies])
            chosen = default_config(rows, n, k, bits, half2_ok=rows == 1, grouped=group_size > 0)
            print(f"  bits {bits}: best {best[0]:.1f} us = {nbytes / best[0] / 1e6:.2f} TB/s "
                  f"{tuple(best[1])} (rel err {best[2]:.1e}); default "
                  f"{tuple(chosen)} {default_us:.1f} us = {nbytes / default_us / 1e6:.2f} TB/s")
            del stored_copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", type=int, nargs="+")
    parser.add_argument("--bits", type=int, nargs="+", default=[0, 8, 4], help="weight kinds to time")
    parser.add_argument("--group_size", type=int, default=0,
                        help="one scale per this many input channels of quantized weights (default 0: per channel)")
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    results: list[dict] = []
    for rows in args.rows:
        tune(rows, args.bits, args.group_size, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
