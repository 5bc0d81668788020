"""On a GPU: our skinny-GEMM kernel against the maintained libraries, per ChatGLM2-6B
decoder linear, at 1 and 8 rows (issue 10's side-by-side table):
- fp16 weights: ours (the Triton GEMV, and the tensor-core GEMM that engines built with
  --use_gemm_plugin run) vs cuBLAS (torch linear);
- int8 weight-only, per-channel scales: ours (the Triton GEMV, and the tensor-core GEMM,
  kernels/weight_only_mma.py) vs gemlite's A16W8;
- int4 weight-only: ours (the Triton GEMV with per-channel scales and with scales
  per 128 input channels as --weight_only_group_size 128 builds them, and the
  tensor-core GEMM, per channel) vs torch's tinygemm
  (`aten._weight_int4pack_mm`, group 128, bfloat16 activations: its only dtype on
  CUDA) and gemlite's A16W4 (group 128).
gemlite is optional (a wheel carried to the GPU); without it its rows are skipped.

Each variant is checked first: its output against float32 x @ W^T on the weights it
dequantizes to (relative error <= 5e-3), then timed as tune_gemv.py times: inside a
CUDA graph, over copies of the weight totalling >= 256 MB (each call streams from
HBM, not L2). Prints us per call, the weight-stream bandwidth, and per layer (the
four linears) last. Usage: gemv_libraries.py [--rows 1 8] [--kinds fp16 int8 int4] [--json FILE]"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tune_gemv import SHAPES, graph_us  # noqa: E402

from glm_engine.tools.compare import relative_error  # noqa: E402
from glm_engine.kernels import reference  # noqa: E402
from glm_engine.kernels.gemv import gemv  # noqa: E402
from glm_engine.quantization import quantize_symmetric  # noqa: E402

GROUP = 128  # the libraries' int4 group size
STREAM_BYTES = 256 * 2**20


def group_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantization in groups of GROUP along K: unsigned values 0..15
    [N, K] uint8, scales and zeros [N, K / GROUP] (w = (q - zero) * scale)."""
    n, k = weight.shape
    groups = weight.float().view(n, k // GROUP, GROUP)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-8)
    zeros = -low / scales
    values = torch.round(groups / scales[..., None] + zeros[..., None]).clamp(0, 15)
    return values.view(n, k).to(torch.uint8), scales, zeros


def grouped_dense(values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    n, k = values.shape
    return ((values.float().view(n, k // GROUP, GROUP) - zeros[..., None]) * scales[..., None]).view(n, k)


def ours(bits: int, weight: torch.Tensor, group_size: int = 0):
    """(call(x, packed), packed weight, dense float32 weight it stands for)."""
    if bits == 0:
        return (lambda x, w: gemv(x, w)), weight, weight.float()
    values, scales = quantize_symmetric(weight, bits, group_size)
    dense = reference.dequantize(values, scales, bits, torch.float32)
    return (lambda x, w: gemv(x, w[0], weight_scales=w[1], quant_bits=bits)), (values, scales), dense


def ours_mma(bits: int, weight: torch.Tensor):
    """The tensor-core GEMM the engine runs at 1-16 rows: fp16 weights (bits 0) as they are,
    int8/int4 ones with per-channel scales shuffled into its layout."""
    from glm_engine.kernels import weight_only_mma

    if bits == 0:
        return (lambda x, w: weight_only_mma.gemm(x, w, None, None, 0)), weight, weight.float()
    values, scales = quantize_symmetric(weight, bits)
    dense = reference.dequantize(values, scales, bits, torch.float32)
    call = lambda x, w: weight_only_mma.gemm(x, w[0], None, w[1], bits)  # noqa: E731
    return call, (weight_only_mma.shuffle(values, bits), scales), dense


def cublas(weight: torch.Tensor):
    return (lambda x, w: torch.nn.functional.linear(x, w)), weight, weight.float()


def tinygemm(weight: torch.Tensor):
    values, scales, zeros = group_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack((values[:, 0::2] << 4 | values[:, 1::2]).contiguous(), 8)
    # tinygemm dequantizes (q - 8) * scale + zero_value: its zero is a value, not an index.
    zero_values = (8 - zeros) * scales
    scales_and_zeros = torch.stack([scales.t(), zero_values.t()], dim=2).contiguous().to(torch.bfloat16)
    call = lambda x, w: torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), w[0], GROUP, w[1])  # noqa: E731
    return call, (packed, scales_and_zeros), grouped_dense(values, scales, zeros)


def gemlite_int8(weight: torch.Tensor):
    from gemlite.helper import A16W8

    values, scales = quantize_symmetric(weight, 8)
    layer = A16W8(device=str(weight.device), dtype=weight.dtype).from_weights(
        values, scales=scales[:, None].to(weight.dtype))
    return (lambda x, w: w(x)), layer, reference.dequantize(values, scales, 8, torch.float32)


def gemlite_int4(weight: torch.Tensor):
    from gemlite.helper import A16Wn

    values, scales, zeros = group_int4(weight)
    layer = A16Wn(device=str(weight.device), dtype=weight.dtype).from_weights(
        values, scales.to(weight.dtype), zeros.to(weight.dtype), 4, GROUP)
    return (lambda x, w: w(x)), layer, grouped_dense(values, scales, zeros)


VARIANTS = {"fp16": [("cuBLAS", cublas), ("ours", lambda w: ours(0, w)), ("ours mma", lambda w: ours_mma(0, w))],
            "int8": [("ours", lambda w: ours(8, w)), ("ours mma", lambda w: ours_mma(8, w)),
                     ("gemlite A16W8", gemlite_int8)],
            "int4": [("ours (per channel)", lambda w: ours(4, w)), ("ours mma (per channel)", lambda w: ours_mma(4, w)),
                     ("ours g128", lambda w: ours(4, w, GROUP)),
                     ("tinygemm g128", tinygemm),
                     ("gemlite A16W4 g128", gemlite_int4)]}
WEIGHT_BYTES = {"fp16": 2, "int8": 1, "int4": 0.5}


def measure(kind: str, name: str, make, shape: tuple[int, int], rows: int) -> dict:
    n, k = shape
    weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    call, packed, dense = make(weight)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
    expected = x.float() @ dense.t()
    error = relative_error(call(x, packed).float(), expected)
    if not error <= 5e-3:
        raise AssertionError(f"{kind} {name} {shape} rows {rows}: relative error {error:.2e}")
    # Each copy its own storage (fp16 variants return the weight itself: clone it), so no call finds it in L2.
    copies = [packed] + [make(weight.clone())[1]
                         for _ in range(max(1, int(STREAM_BYTES / (n * k * WEIGHT_BYTES[kind]))) - 1)]
    us = graph_us([lambda w=w: call(x, w) for w in copies])
    return {"kind": kind, "variant": name, "layer": shape, "rows": rows, "us": us, "error": error,
            "gb_per_s": n * k * WEIGHT_BYTES[kind] / us / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--kinds", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="weight kinds to time (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    for kind in set(VARIANTS) - set(args.kinds):
        del VARIANTS[kind]
    try:
        import gemlite  # noqa: F401
    except ImportError:
        print("gemlite is not installed: its rows are skipped")
        for kind in VARIANTS:
            VARIANTS[kind] = [(name, make) for name, make in VARIANTS[kind] if not name.startswith("gemlite")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    results = []
    for rows in args.rows:
        for kind, variants in VARIANTS.items():
            for name, make in variants:
                for layer, shape in SHAPES.items():
                    try:
                        row = measure(kind, name, make, shape, rows)
                    except Exception as error:  # noqa: BLE001 - a library that fails a shape is a row too
                        row = {"kind": kind, "variant": name, "layer": shape, "rows": rows, "failed": repr(error)}
                    row["layer_name"] = layer
                    results.append(row)
                    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\n{'rows':>4} {'kind':5} {'variant':22} " + " ".join(f"{name:>8}" for name in SHAPES) + "  per layer us")
    for rows in args.rows:
        for kind, variants in VARIANTS.items():
            for name, _ in variants:
                cells = [r for r in results if r["rows"] == rows and r["kind"] == kind and r["variant"] == name]
                times = [r.get("us") for r in cells]
                text = " ".join(f"{t:8.1f}" if t is not None else "  failed" for t in times)
                total = sum(times) if None not in times else float("nan")
                print(f"{rows:>4} {kind:5} {name:22} {text}  {total:8.1f}")


if __name__ == "__main__":
    main()
