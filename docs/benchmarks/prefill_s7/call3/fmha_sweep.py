"""Context FMHA at ChatGLM2-6B shape (32 heads, 2 K/V groups, 128 dims, fp16, one prompt of T tokens, fresh
cache): our Triton kernel over block sizes, warps, stages and tile order, against torch SDPA (causal, GQA).
Microseconds per layer (CUDA events, 30 calls after warm-up)."""
import importlib.util, itertools, json, sys
import torch
import torch.nn.functional as F

spec = importlib.util.spec_from_file_location("cav", "/tmp/context_attention_variant.py")  # the kernel with context_attention_variant.patch
cav = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cav)
HEADS, GROUPS, D, BLOCK = 32, 2, 128, 64
dev = torch.device("cuda")


def timed(fn, reps=30):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


rows = []
for tokens in (2048, 1024):
    torch.manual_seed(0)
    q = torch.randn(tokens, HEADS, D, dtype=torch.float16, device=dev)
    k = torch.randn(tokens, GROUPS, D, dtype=torch.float16, device=dev)
    v = torch.randn_like(k)
    blocks = tokens // BLOCK
    perm = torch.randperm(blocks, device=dev)
    key_cache = torch.empty(blocks * BLOCK, GROUPS, D, dtype=torch.float16, device=dev)
    value_cache = torch.empty_like(key_cache)
    slots = (perm[torch.arange(tokens, device=dev) // BLOCK] * BLOCK + torch.arange(tokens, device=dev) % BLOCK)
    key_cache[slots], value_cache[slots] = k, v
    tables = perm[None, :].to(torch.int32)
    as_int = lambda x: torch.tensor([x], dtype=torch.int32, device=dev)
    args = (q, key_cache, value_cache, tables, as_int(tokens), as_int(tokens), torch.tensor([tokens - 1], device=dev),
            tokens, BLOCK, D ** -0.5)
    qs, ks, vs = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    expected = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    row = {"tokens": tokens}
    row["sdpa_gqa_us"] = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
    ke, ve = ks.repeat_interleave(HEADS // GROUPS, 1), vs.repeat_interleave(HEADS // GROUPS, 1)
    row["sdpa_expanded_us"] = timed(lambda: F.scaled_dot_product_attention(qs, ke, ve, is_causal=True))
    for fp16_acc in (False, True):
        row[f"shipped_acc{int(fp16_acc)}_us"] = timed(lambda: cav.context_attention(*args, fp16_acc))
    best = []
    for block_m, block_n, warps, stages, reverse in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4),
                                                                      (False, True)):
        if block_m == 128 and warps == 4 and block_n == 128:
            continue
        try:
            out = cav.context_attention(*args, False, block_m, block_n, warps, stages, reverse)
            error = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
            us = timed(lambda: cav.context_attention(*args, False, block_m, block_n, warps, stages, reverse))
        except Exception as exc:  # out of shared memory and the like
            print(tokens, block_m, block_n, warps, stages, reverse, "failed", type(exc).__name__, flush=True)
            continue
        best.append((us, block_m, block_n, warps, stages, reverse, error))
    best.sort()
    row["best"] = best[:8]
    row["all"] = best
    print(json.dumps({key: value for key, value in row.items() if key != "all"}), flush=True)
    rows.append(row)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
