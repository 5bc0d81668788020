"""Scratch (session 5 call 3): the tensor-core int4 GEMV (mma_kernel.cu) against the shipped Triton GEMV,
1 and 8 rows, ChatGLM2-6B's shapes, in CUDA graphs over weight copies (cold)."""
import sys, json, torch
sys.path.insert(0, ".")
from glm_engine.kernels.gemv import gemv, default_config
from glm_engine.kernels import reference
from glm_engine.quantization import quantize_symmetric
SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "up": (27392, 4096), "down": (4096, 13696)}
SOURCE = open(".ab/s5/mma_kernel.cu").read()

def to_mma_layout(packed, n, k):
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], -1).reshape(n, k)
    u = (nib ^ 8).reshape(n // 16, 2, 8, k // 64, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1).reshape(-1, 8)
    words = (u.to(torch.int64) << (torch.arange(8, device=u.device) * 4)).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32).contiguous()

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

kernels = {}
for warps in (8, 16):
    for unroll in (1, 2, 4):
        for pipe in (0, 1):
            kernels[(warps, unroll, pipe)] = torch.cuda._compile_kernel(
                SOURCE, "int4_gemv_mma", nvcc_options=[f"-DWARPS={warps}", f"-DUNROLL={unroll}", f"-DPIPE={pipe}"])
print("compiled", len(kernels), flush=True)

def mma_gemv(kernel, warps, x, words, scales, bias, n, k, out):
    kernel(grid=(n // 16, 1, 1), block=(32 * warps, 1, 1),
           args=[words, x, scales, bias if bias is not None else scales, out, x.shape[0], n, k, int(bias is not None)])
    return out

torch.manual_seed(0)
rows_out = []
for name, (n, k) in SHAPES.items():
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
    packed, scales = quantize_symmetric(w, 4, 0)
    words = to_mma_layout(packed, n, k)
    bias = torch.randn(n, device="cuda", dtype=torch.float16) * 0.1
    copies = [(packed, words)] + [(packed.clone(), words.clone()) for _ in range(max(1, -(-256_000_000 // words.nbytes)) - 1)]
    deq = reference.dequantize(packed, scales, 4, torch.float32)
    for rows in (1, 8):
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        expect = x.float() @ deq.t() + bias.float()
        shipped = gemv(x, packed, bias, scales, 4).float()
        err_shipped = ((shipped - expect).norm() / expect.norm()).item()
        base = graph_us([lambda p=p: gemv(x, p, bias, scales, 4) for p, _ in copies])
        line = [f"{name:5s} rows {rows}: shipped {base:6.1f} us (err {err_shipped:.1e})"]
        best = None
        for (warps, unroll, pipe), kern in kernels.items():
            out = torch.empty(rows, n, device="cuda", dtype=torch.float16)
            got = mma_gemv(kern, warps, x, words, scales, bias, n, k, out).float()
            err = ((got - expect).norm() / expect.norm()).item()
            us = graph_us([lambda wd=wd, kern=kern, warps=warps, out=out: mma_gemv(kern, warps, x, wd, scales, bias, n, k, out)
                           for _, wd in copies])
            rows_out.append(dict(shape=name, rows=rows, warps=warps, unroll=unroll, pipe=pipe, us=us, err=err, shipped_us=base,
                                 shipped_err=err_shipped, tb_s=words.nbytes / us / 1e6))
            if best is None or us < best[0]:
                best = (us, warps, (unroll, pipe), err)
            print(f"   {name} rows {rows} mma warps {warps} unroll {unroll} pipe {pipe}: {us:6.1f} us {words.nbytes/us/1e6:5.2f} TB/s err {err:.1e}", flush=True)
        line.append(f"best mma {best[0]:6.1f} us (warps {best[1]}, unroll {best[2]}, err {best[3]:.1e})")
        print("  ".join(line), flush=True)
    del copies
json.dump(rows_out, open(sys.argv[1], "w"), indent=1)
