"""Scratch: where a 2048-token prefill's wall time goes beyond its kernels.
Times session.generate(max_new_tokens=1) (wall), then profiles one with CPU+CUDA and
python stacks; prints: wall, kernel sum, GPU busy (union), time to first kernel, tail
after last kernel, and GPU idle gaps > 20 us with the python functions on the host then."""
from __future__ import annotations
import json, sys, tempfile, time, statistics
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from glm_engine.config import CHATGLM2_6B, BuildConfig, ModelConfig
from glm_engine.engine import Engine
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.layout import weight_shapes
from glm_engine.prompts import random_prompts
from model import load_session

batch, tokens = int(sys.argv[1]), int(sys.argv[2])
plugins = dict(use_gpt_attention_plugin="float16", use_layernorm_plugin="float16", use_gemm_plugin="float16",
               context_fmha="enabled_with_fp32_acc")
config = ModelConfig.from_hf_config(CHATGLM2_6B)
weights = {n: torch.randn(s, device="cuda", dtype=torch.float16) / (s[-1] ** 0.5 if len(s) > 1 else 1.0)
           for n, s in weight_shapes(config).items()}
prompts = random_prompts([tokens] * batch, 60000, seed=0)
session = load_session(Engine(Path("."), config, BuildConfig(max_batch_size=batch, max_input_len=tokens, **plugins),
                              dict(weights)), "cuda")
sampling = SamplingConfig(max_new_tokens=1, end_id=-1)
run = lambda: session.generate(prompts, sampling)
walls = []
for i in range(8):
    torch.cuda.synchronize(); t = time.perf_counter(); run(); torch.cuda.synchronize()
    walls.append(1000 * (time.perf_counter() - t))
print("wall ms", " ".join(f"{w:.2f}" for w in walls), "median(after 1)", f"{statistics.median(walls[1:]):.2f}")
import cProfile, pstats, io
prof_c = cProfile.Profile(); prof_c.enable(); run(); torch.cuda.synchronize(); prof_c.disable()
text = io.StringIO(); pstats.Stats(prof_c, stream=text).sort_stats("tottime").print_stats(25); print(text.getvalue()[-6000:])
for stack in (False, True):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=stack) as prof:
        t = time.perf_counter(); run(); torch.cuda.synchronize(); wall = 1000 * (time.perf_counter() - t)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name); events = json.loads(Path(f.name).read_text())["traceEvents"]
    xs = [e for e in events if e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in xs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    cpu = [e for e in xs if e.get("cat") in ("cpu_op", "python_function", "cuda_runtime", "cuda_driver")]
    t0 = min(e["ts"] for e in cpu); t1 = max(e["ts"] + e["dur"] for e in cpu)
    busy, gaps, end = 0.0, [], gpu[0][0]
    cur_s, cur_e = gpu[0][0], gpu[0][1]
    for s, e, n in gpu[1:]:
        if s > cur_e:
            busy += cur_e - cur_s; gaps.append((s - cur_e, cur_e, s, n)); cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    ksum = sum(e - s for s, e, _ in gpu)
    print(f"== with_stack={stack}: wall {wall:.2f} ms (under profiler); host span {(t1-t0)/1000:.2f}; kernels {len(gpu)} "
          f"sum {ksum/1000:.2f} ms; GPU busy {busy/1000:.2f}; first kernel at +{(gpu[0][0]-t0)/1000:.2f} ms; "
          f"last kernel end to host end {(t1-cur_e)/1000:.2f} ms; gaps>20us {sum(g[0] for g in gaps if g[0]>20)/1000:.2f} ms")
    if not stack:
        continue
    def on_host(a, b):
        names = {}
        for e in cpu:
            if e.get("cat") == "python_function" and e["ts"] < b and e["ts"] + e["dur"] > a and e["dur"] < 50000:
                ov = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
                names[e["name"]] = max(names.get(e["name"], 0), ov)
        return sorted(names.items(), key=lambda kv: kv[1])[:6]
    def inside(a, b, floor):
        found = [e for e in cpu if e.get("cat") == "python_function" and e["ts"] >= a and e["ts"] + e["dur"] <= b
                 and e["dur"] > floor]
        return [f"{e['name'][-60:]} +{(e['ts']-a)/1000:.2f} {e['dur']/1000:.2f}ms" for e in sorted(found, key=lambda e: e["ts"])]
    print("before first kernel (python functions > 150 us):")
    for line in inside(t0, gpu[0][0], 150)[:40]:
        print("   ", line)
    print("first GPU ops:", [(n[:40], round((s - t0) / 1000, 2)) for s, e, n in gpu[:6]])
    for g, a, b, n in sorted(gaps, reverse=True)[:12]:
        print(f"gap {g:.0f} us at +{(a-t0)/1000:.2f} ms before {n[:50]}: host in {[x for x, _ in on_host(a, b)]}")
    print("after last kernel:", [n for n, _ in on_host(cur_e, t1)])
