"""Scratch (session 5): int4/int8/fp16 one-row GEMV timings with num_warps variants, in CUDA graphs."""
import sys, json, torch
sys.path.insert(0, ".")
from glm_engine.kernels.gemv import GemvConfig, default_config, gemv
from glm_engine.quantization import quantize_symmetric
SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "up": (27392, 4096), "down": (4096, 13696)}

def graph_us(calls):
    for c in calls: c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls: c()
    g.replay()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10): g.replay()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / (10 * len(calls))

torch.manual_seed(0)
rows = []
for bits in (4, 8, 0):
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        stored, scales = (w, None) if bits == 0 else quantize_symmetric(w, bits, 0)
        nbytes = stored.numel() * stored.element_size()
        copies = [(stored, scales)] + [(stored.clone(), scales) for _ in range(max(1, -(-256_000_000 // nbytes)) - 1)]
        base = default_config(1, n, k, bits, half2_ok=bits != 0)
        for warps in (1, 2, 4, 8):
            cfg = base._replace(num_warps=warps)
            us = graph_us([lambda w_=w_, s_=s_: gemv(x, w_, None, s_, bits, cfg) for w_, s_ in copies])
            # same weight every call: L2-resident after the first, so ~ the fixed cost
            hot = graph_us([lambda: gemv(x, stored, None, scales, bits, cfg) for _ in range(20)])
            rows.append(dict(bits=bits, shape=name, config=list(cfg), us=us, hot_us=hot, tb_s=nbytes / us / 1e6))
            print(f"bits {bits} {name:5s} {tuple(cfg)} cold {us:6.1f} us {nbytes/us/1e6:5.2f} TB/s  hot {hot:6.1f} us", flush=True)
        del copies
json.dump(rows, open(sys.argv[1], "w"), indent=1)
