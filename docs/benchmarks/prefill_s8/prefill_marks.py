"""Scratch: host and GPU time marks through one prefill (no profiler); GPU clocks while repeating."""
from __future__ import annotations
import statistics, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
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
marks = []
def mark(name):
    event = torch.cuda.Event(enable_timing=True); event.record(); marks.append((name, time.perf_counter(), event))
runner, network = session.runner, session.runner.network
for obj, attr in ((runner, "execute"), (runner, "forward"), (runner.attention, "metadata"), (network, "logits"),
                  (session, "step")):
    original = getattr(obj, attr)
    def wrapped(*a, _o=original, _n=attr, **k):
        mark(_n + " in"); out = _o(*a, **k); mark(_n + " out"); return out
    setattr(obj, attr, wrapped)
network.register_forward_pre_hook(lambda m, a: mark("network in"))
for i, layer in enumerate(network.layers):
    layer.register_forward_hook(lambda m, a, o, i=i: mark(f"layer {i}"))
for i in range(3):
    run(); torch.cuda.synchronize()
for attempt in range(2):
    marks.clear(); torch.cuda.synchronize(); mark("start"); run(); mark("end"); torch.cuda.synchronize()
    t0, e0 = marks[0][1], marks[0][2]
    print(f"-- attempt {attempt}: name, host ms, GPU ms (when the GPU reached it)")
    for name, t, e in marks:
        if name.startswith("layer") and name.split()[1] not in ("0", "1", "2", "3", "13", "26", "27"):
            continue
        print(f"  {name:18} {1000 * (t - t0):8.2f} {e0.elapsed_time(e):8.2f}")
# clocks while repeating
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active",
                        "--format=csv,noheader", "-lms", "100"], stdout=subprocess.PIPE, text=True)
walls = []
for i in range(20):
    torch.cuda.synchronize(); t = time.perf_counter(); run(); torch.cuda.synchronize()
    walls.append(1000 * (time.perf_counter() - t))
time.sleep(0.3); smi.terminate(); samples = smi.stdout.read().strip().splitlines()
print("walls", " ".join(f"{w:.1f}" for w in walls))
print("smi samples (sm MHz, W, C, reasons):", samples[:3], "...", samples[-6:])

import cProfile, io, pstats
for h in list(network._forward_pre_hooks): del network._forward_pre_hooks[h]
for layer in network.layers:
    for h in list(layer._forward_hooks): del layer._forward_hooks[h]
mark = lambda name: None
profiler = cProfile.Profile(); profiler.enable()
for i in range(5): run()
torch.cuda.synchronize(); profiler.disable()
text = io.StringIO(); pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
print("cProfile of 5 runs (tottime):", text.getvalue()[-7000:])
