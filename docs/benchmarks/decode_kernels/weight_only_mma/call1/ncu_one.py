"""Scratch: one GEMV call per shape/kind for ncu (launch 2 of each is profiled: launch 1 compiles)."""
import sys, torch
sys.path.insert(0, ".")
from glm_engine.kernels.gemv import gemv
from glm_engine.quantization import quantize_symmetric
SHAPES = {"qkv": (4608, 4096), "dense": (4096, 4096), "up": (27392, 4096), "down": (4096, 13696)}
torch.manual_seed(0)
for spec in sys.argv[1:]:
    bits, name = spec.split(":")
    bits = int(bits); n, k = SHAPES[name]
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    stored, scales = (w, None) if bits == 0 else quantize_symmetric(w, bits, 0)
    for _ in range(2):
        gemv(x, stored, None, scales, bits)
    torch.cuda.synchronize()
