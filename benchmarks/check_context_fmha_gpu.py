"""On a GPU: the context-FMHA kernel (fp16 and fp32 accumulation) over its block
shapes against torch's scaled_dot_product_attention (causal, GQA) on
ChatGLM2-6B's attention shape (32 query heads, 2 K/V groups, head dim 128),
K/V read through a shuffled block table of 64-token blocks. Prints time and
relative error against float32 attention, and the best config.
Usage: check_context_fmha_gpu.py [--json FILE]"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.tools.compare import relative_error  # noqa: E402
from glm_engine.kernels.context_attention import context_attention  # noqa: E402

HEADS, GROUPS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 64
CONFIGS = list(itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3]))


def causal_flops(lengths: list[int]) -> float:
    return sum(4 * HEADS * HEAD_DIM * n * (n + 1) / 2 for n in lengths)


def case(lengths: list[int], results: list[dict]) -> None:
    torch.manual_seed(0)
    total = sum(lengths)
    blocks_per = [-(-n // BLOCK_SIZE) for n in lengths]
    order = torch.randperm(sum(blocks_per)).tolist()
    width = max(blocks_per)
    tables, start = [], 0
    for count in blocks_per:
        tables.append(order[start:start + count] + [0] * (width - count))
        start += count
    block_tables = torch.tensor(tables, dtype=torch.int32, device="cuda")
    query = torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    keys = torch.randn(total, GROUPS, HEAD_DIM, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)
    key_cache = torch.zeros(len(order) * BLOCK_SIZE, GROUPS, HEAD_DIM, device="cuda", dtype=torch.float16)
    value_cache = torch.zeros_like(key_cache)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    for i, n in enumerate(lengths):
        positions = torch.arange(n, device="cuda")
        slots = block_tables[i].long()[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        key_cache[slots] = keys[starts[i]:starts[i] + n]
        value_cache[slots] = values[starts[i]:starts[i] + n]
    counts = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    last = torch.tensor([s + n - 1 for s, n in zip(starts, lengths)], dtype=torch.int32, device="cuda")
    scale = HEAD_DIM ** -0.5

    def sdpa(dtype: torch.dtype) -> torch.Tensor:
        outs = []
        for s, n in zip(starts, lengths):
            q = query[s:s + n].to(dtype).transpose(0, 1)[None]
            k = keys[s:s + n].to(dtype).transpose(0, 1)[None]
            v = values[s:s + n].to(dtype).transpose(0, 1)[None]
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
        return torch.cat(outs)

    expected = sdpa(torch.float32)
    error = lambda out: relative_error(out, expected)  # noqa: E731
    flops = causal_flops(lengths)
    sdpa_ms = do_bench(lambda: sdpa(torch.float16), return_mode="median")
    label = f"{len(lengths)}x{lengths[0]}" if len(set(lengths)) == 1 else "+".join(map(str, lengths))
    print(f"{label}: SDPA fp16 {sdpa_ms * 1e3:.0f} us ({flops / sdpa_ms / 1e9:.0f} TFLOP/s) "
          f"err {error(sdpa(torch.float16)):.1e}")
    results.append({"case": label, "kernel": "sdpa", "us": sdpa_ms * 1e3})
    for fp16_acc in (True, False):
        timed = []
        for block_m, block_n, warps, stages in CONFIGS:
            def run(block_m=block_m, block_n=block_n, warps=warps, stages=stages, fp16_acc=fp16_acc):
                return context_attention(query, key_cache, value_cache, block_tables, counts, counts, last,
                                         max(lengths), BLOCK_SIZE, scale, fp16_acc, block_m, block_n, warps, stages)
            try:
                ms = do_bench(run, warmup=5, rep=25, return_mode="median")
            except Exception as failure:  # noqa: BLE001 - a config out of shared memory is skipped
                print(f"  skip {(block_m, block_n, warps, stages)}: {type(failure).__name__}")
                continue
            timed.append((ms, (block_m, block_n, warps, stages), error(run())))
            results.append({"case": label, "kernel": "fmha", "fp16_acc": fp16_acc, "config": timed[-1][1],
                            "us": ms * 1e3, "error": timed[-1][2]})
        best = min(timed)
        default_ms = do_bench(lambda: context_attention(query, key_cache, value_cache, block_tables, counts, counts,
                                                        last, max(lengths), BLOCK_SIZE, scale, fp16_acc),
                              return_mode="median")
        print(f"  fmha {'fp16' if fp16_acc else 'fp32'}-acc: best {best[0] * 1e3:.0f} us "
              f"({flops / best[0] / 1e9:.0f} TFLOP/s) {best[1]} err {best[2]:.1e}; default {default_ms * 1e3:.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    results: list[dict] = []
    for lengths in ([2048], [1024] * 8, [37, 700, 2000, 5]):
        case(lengths, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
