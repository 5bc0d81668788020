"""Decode attention per layer, microseconds: the tree's fused kernel (rotary + KV write +
split attention + merge, one kernel) at several split counts against the base tree's
rotary kernel + split kernel + merge kernel. 28 layers (distinct caches) chained in a
CUDA graph, replayed; ChatGLM2-6B shapes (32 heads, 2 groups, 128 dims, rotary 64)."""
import importlib.util, json, sys, time
import torch

sys.path.insert(0, ".")
from glm_engine.kernels import decode_attention as fused
from glm_engine.kernels.reference import rotary_inv_freq


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = sys.argv[1]
variants = load("/tmp/variants.py", "variants")  # the fused tree's decode_attention.py with variants.patch
old_attention = load(f"{base}/glm_engine/kernels/decode_attention.py", "old_decode")
old_rotary = load(f"{base}/glm_engine/kernels/rotary_kv.py", "old_rotary")
HEADS, GROUPS, D, LAYERS, BLOCK, MAX_CONTEXT = 32, 2, 128, 28, 64, 2560
dev = torch.device("cuda")
inv_freq = rotary_inv_freq(64, 10000.0).to(dev)


def time_graph(fn, replays=50):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / LAYERS


rows = []
for batch, context in [(1, 1024), (8, 1024)]:
    blocks_per_seq = MAX_CONTEXT // BLOCK
    num_blocks = batch * blocks_per_seq
    caches = [[torch.randn(num_blocks * BLOCK, GROUPS, D, dtype=torch.float16, device=dev) for _ in range(2)]
              for _ in range(LAYERS)]
    tables = torch.randperm(num_blocks, device=dev).view(batch, blocks_per_seq).to(torch.int32)
    qkvs = [torch.randn(batch, (HEADS + 2 * GROUPS) * D, dtype=torch.float16, device=dev) for _ in range(LAYERS)]
    positions = torch.full((batch,), context - 1, device=dev)
    slots = (tables[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=dev)
    arrivals = torch.zeros(batch * GROUPS, dtype=torch.int32, device=dev)

    def old_chain():
        for layer in range(LAYERS):
            q = old_rotary.rotary_kv_write(qkvs[layer], positions, inv_freq, 1.0, slots, *caches[layer], HEADS)
            old_attention.decode_attention(q, *caches[layer], tables, lengths, BLOCK, D ** -0.5, MAX_CONTEXT)

    def fused_chain(splits):
        def run():
            for layer in range(LAYERS):
                fused.decode_attention(qkvs[layer], positions, inv_freq, 1.0, slots, *caches[layer], tables, lengths,
                                       BLOCK, D ** -0.5, MAX_CONTEXT, HEADS, arrivals, splits)
        return run

    # Same results (one layer): fused against old.
    q = old_rotary.rotary_kv_write(qkvs[0], positions, inv_freq, 1.0, slots, *caches[0], HEADS)
    expected = old_attention.decode_attention(q, *caches[0], tables, lengths, BLOCK, D ** -0.5, MAX_CONTEXT)
    got = fused.decode_attention(qkvs[0], positions, inv_freq, 1.0, slots, *caches[0], tables, lengths, BLOCK,
                                 D ** -0.5, MAX_CONTEXT, HEADS, arrivals)
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    default = fused.choose_num_splits(batch, GROUPS, MAX_CONTEXT)
    row = {"batch": batch, "context": context, "error_vs_old": error, "old_us": time_graph(old_chain),
           "default_splits": default}
    for splits in sorted({default, 10}):
        row[f"fused_{splits}_us"] = time_graph(fused_chain(splits))
    rotated = [old_rotary.rotary_kv_write(qkvs[layer], positions, inv_freq, 1.0, slots, *caches[layer], HEADS)
               for layer in range(LAYERS)]

    def old_no_rotary():
        for layer in range(LAYERS):
            old_attention.decode_attention(rotated[layer], *caches[layer], tables, lengths, BLOCK, D ** -0.5,
                                           MAX_CONTEXT)
    row["old_without_rotary_us"] = time_graph(old_no_rotary)
    for guard in (True, False):
        for warps in (4, 8):
            def split_rotary():
                for layer in range(LAYERS):
                    variants.split_rotary(qkvs[layer], positions, inv_freq, 1.0, slots, *caches[layer], tables,
                                          lengths, BLOCK, D ** -0.5, MAX_CONTEXT, HEADS, old_attention, guard, warps)
            check = variants.split_rotary(qkvs[0], positions, inv_freq, 1.0, slots, *caches[0], tables, lengths,
                                          BLOCK, D ** -0.5, MAX_CONTEXT, HEADS, old_attention, guard, warps)
            row[f"split_rotary_guard{int(guard)}_w{warps}_error"] = (
                (check.float() - expected.float()).norm() / expected.float().norm()).item()
            row[f"split_rotary_guard{int(guard)}_w{warps}_us"] = time_graph(split_rotary)
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
