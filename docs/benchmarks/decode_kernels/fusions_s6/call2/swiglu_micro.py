"""Scratch (session 6 call 2): the up projection with SwiGLU in the mma GEMM's epilogue against the GEMM + the
SwiGLU kernel, and the GEMM alone; rows 1 2 8 16, bits 4 8, CUDA graphs over weight copies > L2."""
import sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from tune_gemv import graph_us
from glm_engine.kernels import weight_only_mma, swiglu
from glm_engine.quantization import quantize_symmetric
torch.manual_seed(0)
print(f"{'bits':>4} {'rows':>4} {'n':>6} {'gemm':>6} {'gemm+swiglu':>11} {'fused':>6} {'fused 16,1,1':>12} {'fused 8,1,0':>11}")
for bits in (4, 8):
    for n, k in ((27392, 4096), (13696, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        values, scales = quantize_symmetric(w, bits)
        copies = max(1, -(-256_000_000 // values.nbytes))
        first = weight_only_mma.shuffle(values, bits)
        shuffled = [first] + [first.clone() for _ in range(copies - 1)]
        for rows in (1, 2, 8, 16):
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            g = graph_us([lambda s=s: weight_only_mma.gemm(x, s, None, scales, bits) for s in shuffled])
            u = graph_us([lambda s=s: swiglu.swiglu(weight_only_mma.gemm(x, s, None, scales, bits)) for s in shuffled])
            f = [graph_us([lambda s=s: weight_only_mma.gemm(x, s, None, scales, bits, c, swiglu=True) for s in shuffled])
                 for c in (None, (16, 1, 1), (8, 1, 0))]
            print(f"{bits:>4} {rows:>4} {n:>6} {g:6.1f} {u:11.1f} {f[0]:6.1f} {f[1]:12.1f} {f[2]:11.1f}", flush=True)
        del shuffled
