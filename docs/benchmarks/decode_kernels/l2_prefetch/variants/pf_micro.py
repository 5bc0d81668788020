"""scratch: does an L2 prefetch make the next GEMV faster? graph of 8 x [tiny gemv (prefetching W_i or not), sleep, gemv on W_i]."""
import sys, torch
sys.path.insert(0, ".")
from glm_engine.kernels import gemv as g
from glm_engine.quantization import quantize_per_channel
dev = torch.device("cuda")
torch.manual_seed(0)
def graph_us(fn, reps=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    gr.replay(); torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps): gr.replay()
        b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b) * 1000 / reps)
    return min(times)
tiny_q, tiny_s = quantize_per_channel(torch.randn(64, 4096, device=dev), 4)
tiny_s = tiny_s.half()
rows = []
for bits in (4, 8):
    for name, (n, k) in {"qkv": (4608, 4096), "dense": (4096, 4096), "down": (4096, 13696), "up": (27392, 4096)}.items():
        copies = 8 if n * k < 60e6 else 3
        ws = []
        for _ in range(copies):
            q, s = quantize_per_channel(torch.randn(n, k, device=dev), bits); ws.append((q, s.half()))
        x = torch.randn(1, 4096, device=dev, dtype=torch.float16); xk = torch.randn(1, k, device=dev, dtype=torch.float16)
        for sleep_cycles in (20000,):
            res = {}
            for mode in ("none", "prefetch", "base", "warm"):
                def fn():
                    for q, s in ws:
                        g.gemv(x, tiny_q, None, tiny_s, 4, next_weight=q if mode == "prefetch" else None)
                        if sleep_cycles: torch.cuda._sleep(sleep_cycles)
                        if mode != "base": g.gemv(xk, q, None, s, bits)
                        if mode == "warm": g.gemv(xk, q, None, s, bits)
                res[mode] = graph_us(fn) / copies
            rows.append((bits, name, sleep_cycles, res["base"], res["none"] - res["base"], res["prefetch"] - res["base"]))
            print(f"int{bits} {name:5s} sleep {sleep_cycles:6d}: tiny+sleep {res['base']:7.2f} us; gemv cold {rows[-1][4]:6.2f} us, after prefetch {rows[-1][5]:6.2f} us, second run on L2-warm weights {res['warm'] - res['none']:6.2f}", flush=True)
