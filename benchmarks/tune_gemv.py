"""On a GPU: times the skinny-GEMM kernel (glm_engine/kernels/gemv.py; fp16, int8, int4
weights) over block shapes, K splits and every path (FMA, tl.dot, and half2 at one row on
quantized weights) on ChatGLM2-6B's four decoder linears (one rank's share with
--world_size), against cuBLAS (torch linear) on the fp16 weight; prints achieved
weight-stream bandwidth, the best config and the current choice's time. With --mma it
times the tensor-core GEMM (weight_only_mma.py) over its launch configs (warps, chunks a
warp loads at once, pipelined or not) instead, the up projection with its SwiGLU epilogue
as the engine runs it.

--write FILE (glm_engine/kernels/launch_configs.json) merges the fastest choices into the
launch table under this GPU's architecture, replacing the entries of the same key: for the
GEMV one per (shape, bits, group scales or not, rows) -- at one row on quantized weights
also the fastest without the half2 path, for calls that cannot take it -- marked "cublas"
on fp16 weights where cuBLAS beat it; for the mma GEMM one per (shape, bits, SwiGLU), the
config of least time summed over the rows timed. The run is added to the file's provenance.

Timed as the engine runs them: inside a CUDA graph (no Python launch cost,
which exceeds these kernels' GPU time), over enough copies of the weight
(>= 256 MB) that each call streams it from HBM rather than L2.
Usage: tune_gemv.py ROWS [ROWS...] [--bits B...] [--group_size G] [--world_size W] [--mma]
[--json FILE] [--write FILE]"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.tools.compare import relative_error  # noqa: E402
from glm_engine.kernels import launch_configs, reference, weight_only_mma  # noqa: E402
from glm_engine.kernels.gemv import MAX_FMA_ROWS, GemvConfig, choice_of, default_config, gemv  # noqa: E402
from glm_engine.quantization import quantize_symmetric  # noqa: E402

COPY_BYTES = 256_000_000  # weight copies per timing: more than L2 holds
MAX_ERROR = 1e-2  # a config whose fp16 result is further off the reference is never chosen


def shapes(world_size: int = 1) -> dict[str, tuple[int, int]]:
    """ChatGLM2-6B's decoder linears (n, k) on one of `world_size` ranks: each rank computes
    its share of the 32 heads of 128 channels, of the 2 K/V groups (at least one) and of the
    FFN's 13696 channels; hidden 4096."""
    heads, groups, ffn, head_dim, hidden = 32 // world_size, max(1, 2 // world_size), 13696 // world_size, 128, 4096
    return {"qkv": ((heads + 2 * groups) * head_dim, hidden), "dense": (hidden, heads * head_dim),
            "up": (2 * ffn, hidden), "down": (hidden, ffn)}


SHAPES = shapes()  # one rank's (benchmarks/gemv_libraries.py times these too)


def candidates(rows: int, bits: int) -> list[GemvConfig]:
    """Configs worth timing for this many rows of fp16 x on these weights."""
    configs = []
    if rows == 1 and bits:
        configs += [GemvConfig(n, k, s, False, half2=True)
                    for n, k, s in itertools.product([4, 8, 16, 32], [256, 512, 1024], [1, 2])]
    if rows <= MAX_FMA_ROWS:
        configs += [GemvConfig(n, k, s, False) for n, k, s in itertools.product([4, 8, 16], [256, 512], [1, 2, 4])]
    configs += [GemvConfig(n, k, s, True) for n, k, s in itertools.product([16, 32], [256, 512], [1, 2, 4])]
    return configs


def mma_candidates(bits: int) -> list[tuple[int, int, int]]:
    """(warps, chunks a load, pipelined) worth timing for the mma GEMM on `bits` (16: fp16) weights."""
    return list(itertools.product((4, 8, 16), (1, 2) if bits == 16 else (1, 2, 4), (0, 1)))


def graph_us(calls: list) -> float:
    """Microseconds per call of `calls`, all captured in one CUDA graph and replayed."""
    for call in calls:
        call()  # compiles, allocates
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 10
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


def copies(*tensors: torch.Tensor | None) -> list[tuple]:
    """`tensors` and clones of them, COPY_BYTES in all at least (None stays None)."""
    nbytes = sum(tensor.nbytes for tensor in tensors if tensor is not None)
    clones = [tuple(None if tensor is None else tensor.clone() for tensor in tensors)
              for _ in range(max(1, -(-COPY_BYTES // nbytes)) - 1)]
    return [tensors] + clones


def time_gemv(rows: int, bits_list: list[int], group_size: int, linears: dict[str, tuple[int, int]],
              timings: list[dict], cublas_us: dict[tuple[int, int, int], float]) -> None:
    """Times every candidate config of gemv.py on `linears` at `rows` rows (appended to
    `timings`) and cuBLAS on their fp16 weights (into `cublas_us[(n, k, rows)]`)."""
    torch.manual_seed(0)
    for name, (n, k) in linears.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        cublas_us[n, k, rows] = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for (w,) in copies(weight)])
        print(f"{name} {n}x{k} rows {rows}: cuBLAS {cublas_us[n, k, rows]:.1f} us = "
              f"{n * k * 2 / cublas_us[n, k, rows] / 1e6:.2f} TB/s")
        for bits in bits_list:
            stored, scales = (weight, None) if bits == 0 else quantize_symmetric(weight, bits, group_size)
            nbytes = stored.numel() * stored.element_size()
            # Scales cloned with each copy too: group scales are 1/16 of int4 weights' bytes, read from HBM as well.
            stored_copies = copies(stored, scales)
            expected = reference.linear(x.float(), reference.dequantize(stored, scales, bits, torch.float32)
                                        if bits else weight.float())
            grouped = bits != 0 and group_size > 0
            timed = []
            for config in candidates(rows, bits):
                error = relative_error(gemv(x, stored, None, scales, bits, config), expected)
                us = graph_us([lambda w=w, s=s, config=config: gemv(x, w, None, s, bits, config)
                               for w, s in stored_copies])
                timed.append({"shape": name, "n": n, "k": k, "bits": bits, "grouped": grouped,
                              "group_size": group_size, "rows": rows, "config": config, "us": us,
                              "tb_s": nbytes / us / 1e6, "error": error})
            timings += timed
            best = min(timed, key=lambda item: item["us"])
            default_us = graph_us([lambda w=w, s=s: gemv(x, w, None, s, bits) for w, s in stored_copies])
            chosen = default_config(rows, n, k, bits, half2_ok=rows == 1, grouped=grouped)
            print(f"  bits {bits}: best {best['us']:.1f} us = {best['tb_s']:.2f} TB/s "
                  f"{tuple(best['config'])} (rel err {best['error']:.1e}); current choice "
                  f"{tuple(chosen)} {default_us:.1f} us = {nbytes / default_us / 1e6:.2f} TB/s")
            del stored_copies


def time_mma(rows_list: list[int], bits_list: list[int], linears: dict[str, tuple[int, int]],
             timings: list[dict]) -> None:
    """Times every candidate launch config of the mma GEMM on `linears` (the up projection
    with its SwiGLU epilogue) at each of `rows_list` rows; bits 0 is fp16 (16 in the table)."""
    torch.manual_seed(0)
    for bits, (name, (n, k)) in itertools.product(bits_list, linears.items()):
        swiglu = name == "up"
        if not weight_only_mma.fits(n, k):
            continue
        weight = torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
        values, scales = (weight, None) if bits == 0 else quantize_symmetric(weight, bits)
        stored_copies = copies(values if bits == 0 else weight_only_mma.shuffle(values, bits), scales)
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            times = {}
            for config in mma_candidates(bits or 16):
                times[config] = graph_us([lambda w=w, s=s, config=config: weight_only_mma.gemm(
                    x, w, None, s, bits, config, swiglu=swiglu) for w, s in stored_copies])
                timings.append({"shape": name, "n": n, "k": k, "bits": bits or 16, "swiglu": swiglu, "rows": rows,
                                "config": config, "us": times[config]})
            current = weight_only_mma.launch_config(n, k, bits or 16, swiglu)
            best = sorted(times, key=times.get)[:3]
            print(f"bits {bits or 16} {name} {n}x{k} rows {rows}: current {current} {times.get(current, 0):.1f} us; "
                  "best " + ", ".join(f"{config} {times[config]:.1f}" for config in best), flush=True)
        del stored_copies


def gemv_entries(timings: list[dict], cublas_us: dict[tuple[int, int, int], float]) -> list[dict]:
    """Table entries of the fastest config per (n, k, bits, grouped, rows) among `timings`
    (dicts with those fields, "config" a GemvConfig, "us" and "error", those above MAX_ERROR
    left out): at one row on quantized weights one with the half2 path allowed and one
    without; on fp16 weights marked "cublas" where `cublas_us[(n, k, rows)]` beat it."""
    timed: dict[tuple, list[dict]] = {}
    for timing in (timing for timing in timings if timing["error"] <= MAX_ERROR):
        timed.setdefault(tuple(timing[name] for name in ("n", "k", "bits", "grouped", "rows")), []).append(timing)
    entries = []
    for (n, k, bits, grouped, rows), group in timed.items():
        variants = {False: [timing for timing in group if not timing["config"].half2]}
        if rows == 1 and bits:
            variants[True] = group
        for half2, found in variants.items():
            if not found:
                continue
            best = min(found, key=lambda timing: timing["us"])
            cublas = bits == 0 and cublas_us.get((n, k, rows), float("inf")) < best["us"]
            entries.append({"n": n, "k": k, "bits": bits, "grouped": grouped, "half2": half2, "rows": rows,
                            "choice": choice_of(best["config"], cublas)})
    return entries


def mma_entries(timings: list[dict]) -> list[dict]:
    """Table entries of the mma GEMM's config of least time summed over the rows timed, per
    (n, k, bits, swiglu) among `timings` (dicts with those fields, "rows", "config" (warps,
    chunks a load, pipelined) and "us"); a config not timed at every row count is left out."""
    totals: dict[tuple, dict[tuple, list[float]]] = {}
    for timing in timings:
        key = tuple(timing[name] for name in ("n", "k", "bits", "swiglu"))
        totals.setdefault(key, {}).setdefault(tuple(timing["config"]), []).append(timing["us"])
    entries = []
    for (n, k, bits, swiglu), by_config in totals.items():
        most = max(len(times) for times in by_config.values())
        warps, unroll, pipe = min((config for config, times in by_config.items() if len(times) == most),
                                  key=lambda config: sum(by_config[config]))
        entries.append({"n": n, "k": k, "bits": bits, "swiglu": swiglu,
                        "choice": {"warps": warps, "unroll": unroll, "pipe": pipe}})
    return entries


def _order(entry: dict) -> tuple:
    return entry.get("n", 0), entry.get("k", 0), launch_configs.entry_key(entry), entry.get("rows", 0)


def merge(table: dict, kernel: str, arch: str, entries: list[dict], provenance: str) -> dict:
    """A copy of `table` with `entries` under `kernel` and `arch`, each replacing the entry of
    the same key and rows, and `provenance` added to that architecture's provenance lines."""
    merged = copy.deepcopy(table)
    new = {(launch_configs.entry_key(entry), entry.get("rows")): entry for entry in entries}
    section = merged.setdefault(kernel, {}).get(arch, [])
    kept = [entry for entry in section if (launch_configs.entry_key(entry), entry.get("rows")) not in new]
    merged[kernel][arch] = sorted(kept + list(new.values()), key=_order)
    merged.setdefault("provenance", {}).setdefault(kernel, {}).setdefault(arch, []).append(provenance)
    return merged


def _format_section(section: dict[str, list[dict]]) -> str:
    archs = []
    for arch, entries in section.items():
        lines = ",\n".join(f"   {json.dumps(entry)}" for entry in entries)
        archs.append(f"  {json.dumps(arch)}: [\n{lines}\n  ]")
    return "{\n" + ",\n".join(archs) + "\n }"


def format_table(table: dict) -> str:
    """`table` as JSON with one line per kernel entry (readable diffs of the tuned choices)."""
    parts = []
    for name, value in table.items():
        kernel = name not in ("about", "provenance") and isinstance(value, dict)
        text = _format_section(value) if kernel else json.dumps(value, indent=1).replace("\n", "\n ")
        parts.append(f" {json.dumps(name)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_table(path: Path, kernel: str, arch: str, entries: list[dict], provenance: str) -> None:
    """Merges `entries` of `kernel` on `arch` into the launch table at `path` (see `merge`)."""
    path.write_text(format_table(merge(json.loads(path.read_text()), kernel, arch, entries, provenance)))


def main() -> None:
    """Times the candidates of the kernel asked for; with --write, merges the fastest into the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int, nargs="+")
    parser.add_argument("--bits", type=int, nargs="+", default=[0, 8, 4], help="weight kinds to time (0: fp16)")
    parser.add_argument("--group_size", type=int, default=0,
                        help="one scale per this many input channels of quantized weights (default 0: per channel)")
    parser.add_argument("--world_size", type=int, default=1, help="time one rank's share of the linears")
    parser.add_argument("--mma", action="store_true", help="time the tensor-core GEMM's launch configs instead")
    parser.add_argument("--json", type=str, default=None, help="every timing, as JSON")
    parser.add_argument("--write", type=Path, default=None, help="merge the fastest choices into this launch "
                        "table (glm_engine/kernels/launch_configs.json)")
    args = parser.parse_args()
    if args.mma and args.group_size:
        parser.error("the mma GEMM takes one scale per output channel: no --group_size")
    linears, timings, cublas_us = shapes(args.world_size), [], {}
    if args.mma:
        time_mma(args.rows, args.bits, linears, timings)
        kernel, entries = "weight_only_mma", mma_entries(timings)
    else:
        for rows in args.rows:
            time_gemv(rows, args.bits, args.group_size, linears, timings, cublas_us)
        kernel, entries = "gemv", gemv_entries(timings, cublas_us)
    if args.json:
        Path(args.json).write_text(json.dumps(timings, indent=1))
    if args.write:
        arch = launch_configs.architecture(torch.device("cuda"))
        provenance = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                      f"{datetime.date.today()}: "
                      f"benchmarks/tune_gemv.py {' '.join(sys.argv[1:])}")
        write_table(args.write, kernel, arch, entries, provenance)
        print(f"{len(entries)} {kernel} entries for {arch} merged into {args.write}")


if __name__ == "__main__":
    main()
