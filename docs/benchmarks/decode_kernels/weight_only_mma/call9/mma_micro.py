"""Scratch (session 5 call 9): the weight-only mma GEMM (int8, int4) against the Triton GEMV, per shape, 1 and 8 rows,
default configs, CUDA graphs over weight copies."""
import sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from tune_gemv import SHAPES, graph_us
from glm_engine.kernels import weight_only_mma
from glm_engine.kernels.gemv import gemv
from glm_engine.quantization import quantize_symmetric
torch.manual_seed(0)
print(f"{'bits':>4} {'rows':>4} {'shape':6} {'triton us':>9} {'mma us':>7}")
for bits in (8, 4):
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        values, scales = quantize_symmetric(w, bits)
        copies = max(1, -(-256_000_000 // values.nbytes))
        packed = [values] + [values.clone() for _ in range(copies - 1)]
        shuffled = [weight_only_mma.shuffle(p, bits) for p in packed]
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            t = graph_us([lambda p=p: gemv(x, p, None, scales, bits) for p in packed])
            m = graph_us([lambda s=s: weight_only_mma.gemm(x, s, None, scales, bits) for s in shuffled])
            print(f"{bits:>4} {rows:>4} {name:6} {t:9.1f} {m:7.1f}", flush=True)
        del packed, shuffled
