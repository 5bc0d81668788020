"""Scratch (session 6 call 10): fp16 weights on the mma GEMM (read row-major as they are) against the Triton GEMV
(gemv.gemv) and cuBLAS, per shape (the up projection with SwiGLU on mma; + the SwiGLU kernel on the others), rows 1
and 8, every launch config of a sweep; CUDA graphs over weight copies larger than L2."""
import itertools, json, sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from tune_gemv import graph_us
from glm_engine.kernels import weight_only_mma as mma, swiglu
from glm_engine.kernels.gemv import gemv
torch.manual_seed(0)
SHAPES = {"qkv": (4608, 4096, False), "dense": (4096, 4096, False), "up": (27392, 4096, True),
          "down": (4096, 13696, False), "up/2": (13696, 4096, True)}
CONFIGS = [c for c in itertools.product((4, 8, 16), (1, 2), (0, 1))]
results = []
print(f"{'shape':6} {'rows':>4} {'cuBLAS':>7} {'Triton':>7} {'mma dflt':>8}  best configs", flush=True)
for name, (n, k, gated) in SHAPES.items():
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
    copies = [w] + [w.clone() for _ in range(max(1, -(-256_000_000 // w.nbytes)) - 1)]
    for rows in (1, 8):
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        post = swiglu.swiglu if gated else (lambda t: t)
        cublas = graph_us([lambda c=c: post(torch.nn.functional.linear(x, c)) for c in copies])
        triton = graph_us([lambda c=c: post(gemv(x, c, None, None, 0)) for c in copies])
        times = {cfg: graph_us([lambda c=c: mma.gemm(x, c, None, None, 0, cfg, swiglu=gated) for c in copies])
                 for cfg in CONFIGS}
        default = mma.launch_config(n, k, 16, gated)
        dflt = times.get(default) or graph_us([lambda c=c: mma.gemm(x, c, None, None, 0, swiglu=gated) for c in copies])
        best = sorted(times, key=times.get)[:3]
        print(f"{name:6} {rows:>4} {cublas:7.1f} {triton:7.1f} {dflt:8.1f}  " + ", ".join(f"{c} {times[c]:.1f}" for c in best),
              flush=True)
        results.append({"shape": name, "rows": rows, "cublas": cublas, "triton": triton, "default": list(default),
                        "times": {str(c): t for c, t in times.items()}})
    del copies
json.dump(results, open(sys.argv[1], "w"), indent=1)
