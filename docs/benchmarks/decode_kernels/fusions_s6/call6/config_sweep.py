"""Scratch (session 6 call 6): launch configs (warps, unroll, pipe) of the mma GEMM per shape (the up projection
with its SwiGLU epilogue), rows 1 and 8, int4 and int8; ChatGLM2-6B's shapes and their halves at world size 2.
CUDA graphs over weight copies larger than L2 (tune_gemv.graph_us)."""
import itertools, json, sys, torch
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from tune_gemv import graph_us
from glm_engine.kernels import weight_only_mma as mma
from glm_engine.quantization import quantize_symmetric
torch.manual_seed(0)
SHAPES = {"qkv": (4608, 4096, False), "dense": (4096, 4096, False), "up": (27392, 4096, True),
          "down": (4096, 13696, False), "qkv/2": (2304, 4096, False), "dense/2": (4096, 2048, False),
          "up/2": (13696, 4096, True), "down/2": (4096, 6848, False)}
CONFIGS = [c for c in itertools.product((4, 8, 16), (1, 2, 4), (0, 1))]
results = []
for bits in (4, 8):
    for name, (n, k, gated) in SHAPES.items():
        if k % 64 or n % 16:
            continue
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        values, scales = quantize_symmetric(w, bits)
        copies = max(1, -(-256_000_000 // values.nbytes))
        first = mma.shuffle(values, bits)
        shuffled = [first] + [first.clone() for _ in range(copies - 1)]
        for rows in ((1, 8) if "/" not in name else (1,)):
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            times = {}
            for config in CONFIGS:
                times[config] = graph_us([lambda s=s: mma.gemm(x, s, None, scales, bits, config, swiglu=gated)
                                          for s in shuffled])
            default = mma.launch_config(n, k)
            best = sorted(times, key=times.get)[:3]
            print(f"{bits} {name:7} rows {rows}: default {default} {times[default]:5.1f} us; best "
                  + ", ".join(f"{c} {times[c]:5.1f}" for c in best), flush=True)
            results.append({"bits": bits, "shape": name, "rows": rows, "default": list(default),
                            "times": {str(c): t for c, t in times.items()}})
        del shuffled
json.dump(results, open(sys.argv[1], "w"), indent=1)
