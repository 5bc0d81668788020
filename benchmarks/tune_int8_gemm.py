"""On a GPU: times SmoothQuant's prompt-sized int8 GEMM both ways the engine can run it
(glm_engine/kernels/int8_gemm.py) on ChatGLM2-6B's four decoder linears (one rank's share
with --world_size) at each ROWS: torch._int_mm (cuBLAS) plus the scaling kernel, and the
Triton GEMM with the scaling in its epilogue over its block configs. Beside them, the same
shapes on FP8 (torch._scaled_mm with per-row and per-channel scales, as kernels/fp8.py)
and fp16 (torch linear) for reference. The activation quantizer, the same for both int8
ways, is left out. A fused config whose output differs from _int_mm's (to the bit) is
never chosen.

Prints a table (us and TOPS a call); --write FILE (glm_engine/kernels/launch_configs.json)
merges, per shape, the way (and the fused config) of least time summed over the ROWS
timed under this GPU's architecture; the run is added to the file's provenance.
Usage: tune_int8_gemm.py [ROWS...] [--world_size W] [--json FILE] [--write FILE]"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.kernels import int8_gemm, launch_configs  # noqa: E402
from tune_gemv import shapes, write_table  # noqa: E402


def fused_candidates() -> list[dict]:
    """Block configs worth timing on Hopper's int8 tensor cores (shared memory a stage:
    (block_m + block_n) x block_k bytes)."""
    configs = []
    for (block_m, block_n), block_k, stages in itertools.product(
            [(128, 128), (128, 256), (256, 128), (64, 128)], [64, 128], [3, 4]):
        if (block_m + block_n) * block_k * stages <= 200_000:
            warps = 4 if block_m * block_n <= 64 * 128 else 8
            configs.append({"fused": True, "block_m": block_m, "block_n": block_n, "block_k": block_k,
                            "group_m": 8, "num_warps": warps, "num_stages": stages})
    return configs


def time_us(call) -> float:
    """Median microseconds of `call` over 5 runs of 10 back-to-back calls, after a warm-up."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            call()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) * 1e3 / 10)
    return statistics.median(runs)


def time_shape(rows: int, n: int, k: int, has_bias: bool) -> dict:
    """Timings of one (rows, n, k), with a bias when `has_bias`: 'int_mm', 'fp8', 'fp16' and
    'fused' [(config, us)]."""
    values = torch.randint(-127, 128, (rows, k), dtype=torch.int8, device="cuda")
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    row_scales = torch.rand(rows, 1, device="cuda") / 100
    weight_scales = torch.rand(n, device="cuda") / 100
    bias = torch.randn(n, dtype=torch.float16, device="cuda") if has_bias else None

    def unfused() -> torch.Tensor:
        return int8_gemm.scale_sums(torch._int_mm(values, weight.t()), row_scales, weight_scales, bias,
                                    torch.float16)

    expected = unfused()
    fused = []
    for config in fused_candidates():
        try:
            out = int8_gemm.fused_gemm(values, weight, row_scales, weight_scales, bias, torch.float16, config)
        except Exception as error:  # a config this GPU cannot run (shared memory, registers): not a candidate
            print(f"  {config}: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
            continue
        if torch.equal(out, expected):
            fused.append((config, time_us(lambda: int8_gemm.fused_gemm(
                values, weight, row_scales, weight_scales, bias, torch.float16, config))))
    fp8_values, fp8_weight = values.to(torch.float8_e4m3fn), weight.to(torch.float8_e4m3fn)
    dense_x, dense_w = values.half(), weight.half()
    return {"rows": rows, "n": n, "k": k, "int_mm": time_us(unfused), "fused": fused,
            "fp8": time_us(lambda: torch._scaled_mm(fp8_values, fp8_weight.t(), scale_a=row_scales,
                                                    scale_b=weight_scales.view(1, -1), out_dtype=torch.float16)),
            "fp16": time_us(lambda: torch.nn.functional.linear(dense_x, dense_w, bias))}


def entries(timings: list[dict]) -> list[dict]:
    """Per (n, k): the fused config of least time summed over the rows timed (among those
    that ran at every one), where that sum beats _int_mm's; else {"fused": false}."""
    chosen = []
    for n, k in sorted({(timing["n"], timing["k"]) for timing in timings}):
        runs = [timing for timing in timings if (timing["n"], timing["k"]) == (n, k)]
        totals: dict[str, list[float]] = {}
        for run in runs:
            for config, us in run["fused"]:
                totals.setdefault(json.dumps(config, sort_keys=True), []).append(us)
        complete = {config: sum(times) for config, times in totals.items() if len(times) == len(runs)}
        best = min(complete, key=complete.get, default=None)
        fused = best is not None and complete[best] < sum(run["int_mm"] for run in runs)
        chosen.append({"n": n, "k": k, "choice": json.loads(best) if fused else {"fused": False}})
    return chosen


def report(timings: list[dict]) -> None:
    print(f"{'rows':>5} {'n':>6} {'k':>6} | {'int_mm+scale':>12} {'fused best':>10} {'fp8':>8} {'fp16':>8} us"
          " | TOPS int_mm / fused / fp8")
    for run in timings:
        best = min((us for _, us in run["fused"]), default=float("nan"))
        ops = 2 * run["rows"] * run["n"] * run["k"] / 1e6  # tera-ops per second from us: ops / us / 1e6
        print(f"{run['rows']:>5} {run['n']:>6} {run['k']:>6} | {run['int_mm']:>12.1f} {best:>10.1f} "
              f"{run['fp8']:>8.1f} {run['fp16']:>8.1f}    | {ops / run['int_mm']:.0f} / {ops / best:.0f} / "
              f"{ops / run['fp8']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--world_size", type=int, default=1, help="time one rank's share of the linears")
    parser.add_argument("--json", type=Path, default=None, help="every timing, as JSON")
    parser.add_argument("--write", type=Path, default=None, help="merge the chosen ways into this launch table "
                        "(glm_engine/kernels/launch_configs.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("times GPU kernels: run it on a CUDA GPU")
    timings = [time_shape(rows, n, k, name == "qkv")  # ChatGLM2's QKV projection alone has a bias
               for rows in args.rows for name, (n, k) in shapes(args.world_size).items()]
    report(timings)
    if args.json:
        args.json.write_text(json.dumps(timings, indent=1))
    if args.write:
        arch = launch_configs.architecture(torch.device("cuda"))
        provenance = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                      f"{datetime.date.today()}: benchmarks/tune_int8_gemm.py {' '.join(sys.argv[1:])}")
        chosen = entries(timings)
        write_table(args.write, "int8_gemm", arch, chosen, provenance)
        print(f"{len(chosen)} int8_gemm entries for {arch} merged into {args.write}: "
              f"{sum(entry['choice']['fused'] for entry in chosen)} fused")


if __name__ == "__main__":
    main()
