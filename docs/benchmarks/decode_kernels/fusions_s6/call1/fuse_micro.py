"""Scratch (session 6 call 1): the norm-fused mma GEMMs against the norm kernel + GEMM (+ SwiGLU kernel), per
projection (qkv: norm; up: norm + SwiGLU), rows 1 2 8 16, bits 4 8, CUDA graphs over weight copies > L2."""
import sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from tune_gemv import graph_us
from glm_engine.kernels import weight_only_mma, norm, swiglu
from glm_engine.quantization import quantize_symmetric
torch.manual_seed(0)
SHAPES = {"qkv": (4608, 4096, False), "up": (27392, 4096, True)}
print(f"{'bits':>4} {'rows':>4} {'shape':6} {'unfused us':>10} {'fused us':>8} {'fused 16,1,1':>12} {'fused 8,1,0':>11}")
for bits in (4, 8):
    for name, (n, k, gated) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        values, scales = quantize_symmetric(w, bits)
        copies = max(1, -(-256_000_000 // values.nbytes))
        shuffled = [weight_only_mma.shuffle(values, bits)] + [None] * (copies - 1)
        shuffled = [shuffled[0]] + [shuffled[0].clone() for _ in range(copies - 1)]
        nw = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
        for rows in (1, 2, 8, 16):
            res = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            br = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            def unfused(s):
                normed, _ = norm.add_rms_norm(br, res, nw, 1e-5)
                out = weight_only_mma.gemm(normed, s, None, scales, bits)
                return swiglu.swiglu(out) if gated else out
            u = graph_us([lambda s=s: unfused(s) for s in shuffled])
            f = graph_us([lambda s=s: weight_only_mma.norm_gemm(br, res, nw, 1e-5, s, None, scales, bits, gated)
                          for s in shuffled])
            extra = []
            for config in ((16, 1, 1), (8, 1, 0)):
                extra.append(graph_us([lambda s=s: weight_only_mma.norm_gemm(br, res, nw, 1e-5, s, None, scales, bits,
                                                                             gated, config) for s in shuffled]))
            print(f"{bits:>4} {rows:>4} {name:6} {u:10.1f} {f:8.1f} {extra[0]:12.1f} {extra[1]:11.1f}", flush=True)
        del shuffled
