"""Prefill pieces at ChatGLM2-6B shape (32 heads, 2 groups, 128 dims, fp16): (a) the rotary + KV-write kernel,
this tree (several tokens a program) against the base tree's (one head of one token a program), microseconds a
call (CUDA events); (b) a prompt step's attention through PagedAttention, SDPA (FLASH_MIN_TOKENS 1) against our
FMHA (FLASH_MIN_TOKENS huge), wall microseconds a call with the host's work (eager, as prompts run)."""
import importlib.util, json, statistics, sys, time
import torch

sys.path.insert(0, ".")
import glm_engine.attention as attention_module
from glm_engine.attention import PagedAttention, StepLayout
from glm_engine.config import CHATGLM2_6B, ModelConfig
from glm_engine.kernels import rotary_kv
from glm_engine.kernels.reference import rotary_inv_freq
from glm_engine.runtime.kv_cache import KVCache

spec = importlib.util.spec_from_file_location("old_rotary", f"{sys.argv[1]}/glm_engine/kernels/rotary_kv.py")
old_rotary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old_rotary)
dev = torch.device("cuda")
HEADS, GROUPS, D = 32, 2, 128
inv_freq = rotary_inv_freq(64, 10000.0).to(dev)
result = {"rotary": [], "attention": []}


def events(fn, reps=50):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


for tokens in (1, 8, 256, 1024, 2048, 8192):
    qkv = torch.randn(tokens, (HEADS + 2 * GROUPS) * D, dtype=torch.float16, device=dev)
    positions = torch.arange(tokens, device=dev)
    slots = torch.randperm(tokens, device=dev)
    caches = [torch.zeros(tokens, GROUPS, D, dtype=torch.float16, device=dev) for _ in range(4)]
    row = {"tokens": tokens}
    q_old = old_rotary.rotary_kv_write(qkv, positions, inv_freq, 1.0, slots, caches[0], caches[1], HEADS)
    q_new = rotary_kv.rotary_kv_write(qkv, positions, inv_freq, 1.0, slots, caches[2], caches[3], HEADS)
    row["same_bits"] = bool(torch.equal(q_old, q_new) and torch.equal(caches[0], caches[2])
                            and torch.equal(caches[1], caches[3]))
    row["old_us"] = events(lambda: old_rotary.rotary_kv_write(qkv, positions, inv_freq, 1.0, slots, caches[0],
                                                              caches[1], HEADS))
    for block_t in (None, 1, 4, 8, 16, 32, 64):
        row[f"new_{block_t}_us"] = events(lambda: rotary_kv.rotary_kv_write(qkv, positions, inv_freq, 1.0, slots,
                                                                            caches[2], caches[3], HEADS, block_t))
    print(json.dumps(row), flush=True)
    result["rotary"].append(row)

config = ModelConfig.from_hf_config(CHATGLM2_6B)
for batch, length in [(1, 64), (1, 128), (1, 256), (1, 512), (1, 1024), (1, 2048), (4, 256), (4, 1024), (8, 1024)]:
    block = 64
    blocks_each = -(-length // block)
    tables = [list(range(i * blocks_each, (i + 1) * blocks_each)) for i in range(batch)]
    cache = KVCache(1, batch * blocks_each, block, GROUPS, D, torch.float16, dev)
    paged = PagedAttention(config, torch.float16, dev, "enabled_with_fp32_acc", 4096)
    layout = StepLayout.of(tables, [0] * batch, [length] * batch, block)
    qkv = torch.randn(batch * length, (HEADS + 2 * GROUPS) * D, dtype=torch.float16, device=dev)
    row = {"batch": batch, "length": length}
    outs = {}
    for name, threshold in (("sdpa", 1), ("fmha", 10 ** 9)):
        attention_module.FLASH_MIN_TOKENS = threshold
        walls = []
        for attempt in range(25):
            torch.cuda.synchronize()
            start = time.perf_counter()
            meta = paged.metadata(layout)
            outs[name] = paged(qkv, 0, meta, cache)
            torch.cuda.synchronize()
            if attempt >= 5:
                walls.append(time.perf_counter() - start)
        row[f"{name}_wall_us"] = 1e6 * statistics.median(walls)
        meta = paged.metadata(layout)
        row[f"{name}_gpu_us"] = events(lambda: paged(qkv, 0, meta, cache), 20)
    row["error_sdpa_vs_fmha"] = ((outs["sdpa"].float() - outs["fmha"].float()).norm()
                                 / outs["fmha"].float().norm()).item()
    print(json.dumps(row), flush=True)
    result["attention"].append(row)
json.dump(result, open(sys.argv[2], "w"), indent=1)
