"""Scratch (session 6 call 3): the bulk-copy (TMA) mma kernel against the register one, per shape, rows 1 8 16,
bits 4 8, stages and warps swept; CUDA graphs over weight copies > L2 (tune_gemv.graph_us)."""
import sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from tune_gemv import graph_us
from glm_engine.kernels import weight_only_mma as mma
from glm_engine.quantization import quantize_symmetric
torch.manual_seed(0)
SHAPES = {"qkv": (4608, 4096, False), "dense": (4096, 4096, False), "up": (27392, 4096, True),
          "down": (4096, 13696, False)}
STAGES = {4: (2, 4, 8), 8: (2, 4)}
header = ["regs"] + [f"tma s{s} w{w}" for s in (2, 4, 8) for w in (8, 16)]
print(f"{'bits':>4} {'rows':>4} {'shape':6} " + " ".join(f"{h:>11}" for h in header), flush=True)
for bits in (4, 8):
    for name, (n, k, gated) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        values, scales = quantize_symmetric(w, bits)
        copies = max(1, -(-256_000_000 // values.nbytes))
        first = mma.shuffle(values, bits)
        shuffled = [first] + [first.clone() for _ in range(copies - 1)]
        default = mma.launch_config(n, k)
        for rows in (1, 8, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            row = []
            mma._use_tma = lambda index: False
            row.append(graph_us([lambda s=s: mma.gemm(x, s, None, scales, bits, swiglu=gated) for s in shuffled]))
            mma._use_tma = lambda index: True
            for stages in (2, 4, 8):
                for warps in (8, 16):
                    if stages not in STAGES[bits]:
                        row.append(float("nan"))
                        continue
                    mma.TMA_STAGES[bits] = stages
                    config = (warps, 1, 0) if warps == 8 else (16, 1, 1)
                    row.append(graph_us([lambda s=s: mma.gemm(x, s, None, scales, bits, config, swiglu=gated)
                                         for s in shuffled]))
            mma.TMA_STAGES.update({4: 4, 8: 2})
            print(f"{bits:>4} {rows:>4} {name:6} " + " ".join(f"{v:11.1f}" for v in row) + f"   default {default}",
                  flush=True)
        del shuffled
