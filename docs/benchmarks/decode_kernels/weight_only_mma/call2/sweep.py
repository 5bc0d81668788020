"""Scratch (session 5 call 2): one-row half2 GEMV configs incl. larger K blocks, split K, 2 warps,
and a variant prefetching two blocks ahead (gemv_deep.py). CUDA graphs over weight copies (cold)."""
import sys, json, itertools, importlib.util, torch
sys.path.insert(0, ".")
from glm_engine.kernels import gemv as shipped
from glm_engine.kernels.gemv import GemvConfig, default_config
from glm_engine.quantization import quantize_symmetric
spec = importlib.util.spec_from_file_location("gemv_deep", ".ab/s5/gemv_deep.py")
deep = importlib.util.module_from_spec(spec); spec.loader.exec_module(deep)
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

def cands(name):
    if name == "up":
        grid = itertools.product([8, 16, 32], [512, 1024, 2048], [1], [4])
    else:
        grid = itertools.product([4, 8, 16], [1024, 2048, 4096], [1, 2], [4])
    out = [GemvConfig(n, k, s, False, w, half2=True) for n, k, s, w in grid]
    return out

torch.manual_seed(0)
rows = []
for bits in [int(b) for b in sys.argv[2:]]:
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        stored, scales = quantize_symmetric(w, bits, 0)
        ref = (x.float() @ (stored.float() if bits == 8 else None).t()) if False else None
        nbytes = stored.numel()
        copies = [(stored, scales)] + [(stored.clone(), scales) for _ in range(max(1, -(-256_000_000 // nbytes)) - 1)]
        expect = shipped.gemv(x, stored, None, scales, bits).float()
        results = []
        for module, tag in ((shipped, "shipped"), (deep, "deep")) if bits == 4 else ((shipped, "shipped"),):
            configs = cands(name) + [default_config(1, n, k, bits, half2_ok=True)._replace(num_warps=2)]
            for cfg in configs:
                try:
                    got = module.gemv(x, stored, None, scales, bits, cfg).float()
                    err = ((got - expect).norm() / expect.norm()).item()
                    us = graph_us([lambda w_=w_, s_=s_: module.gemv(x, w_, None, s_, bits, cfg) for w_, s_ in copies])
                except Exception as exc:  # noqa
                    print("fail", tag, cfg, exc); continue
                results.append((us, tag, cfg, err))
                rows.append(dict(bits=bits, shape=name, variant=tag, config=list(cfg), us=us, err=err,
                                 tb_s=nbytes / us / 1e6))
        base = graph_us([lambda w_=w_, s_=s_: shipped.gemv(x, w_, None, s_, bits) for w_, s_ in copies])
        results.sort(key=lambda r: r[0])
        print(f"bits {bits} {name}: default {tuple(default_config(1, n, k, bits, half2_ok=True))} {base:.1f} us")
        for us, tag, cfg, err in results[:6]:
            print(f"   {us:6.1f} us {nbytes/us/1e6:5.2f} TB/s {tag:7s} {tuple(cfg)[:5]} err {err:.1e}", flush=True)
        del copies
json.dump(rows, open(sys.argv[1], "w"), indent=1)
