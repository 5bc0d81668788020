"""On a GPU: where one decode step's time goes. Generates from random prompts twice
under the profiler, with 1 and with N new tokens; the kernels of the second run less
those of the first, divided by N - 1, are one decode step's kernels (the prefill
cancels out). Kernels are grouped by name and launch grid (a GEMV's grid tells its
shape apart); prints microseconds per step for each, their sum, and the step's wall
time (timed outside the profiler), whose excess over the sum is launch gaps. With
programmatic dependent launch (Hopper) a kernel's time starts when it is scheduled,
its wait for the kernel ahead included: kernels overlap, per-kernel times include
waiting, and the excess undercounts the gaps.
Usage: profile_decode.py ENGINE_DIR [--batch_size 1] [--input_len 1024]
[--output_len 64] [--json FILE]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_engine.text.prompts import random_prompts  # noqa: E402
from glm_engine.runtime.sampling import SamplingConfig  # noqa: E402
from model import load_session  # noqa: E402


def kernel_time(run) -> tuple[Counter, Counter]:
    """(microseconds, launches) per (kernel name, grid) of one call of `run`."""
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        profiler.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    micros, launches = Counter(), Counter()
    for event in events:
        if event.get("cat") == "kernel":
            key = (event["name"][:60], str(event.get("args", {}).get("grid", "")))
            micros[key] += event["dur"]
            launches[key] += 1
    return micros, launches


def wall_us(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--input_len", type=int, default=1024)
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    session = load_session(args.engine_dir, "cuda")
    prompts = random_prompts([args.input_len] * args.batch_size, 60000, seed=0)
    runs = {n: (lambda n=n: session.generate(prompts, SamplingConfig(max_new_tokens=n, end_id=-1)))
            for n in (1, args.output_len)}
    with torch.inference_mode():
        for run in runs.values():
            run()  # compiles, warms
        (short, short_launches), (long, launches) = kernel_time(runs[1]), kernel_time(runs[args.output_len])
        steps = args.output_len - 1
        step_wall = (wall_us(runs[args.output_len]) - wall_us(runs[1])) / steps
    per_step = {key: (long[key] - short.get(key, 0)) / steps for key in long}
    calls = {key: (launches[key] - short_launches.get(key, 0)) / steps for key in long}
    rows = sorted((item for item in per_step.items() if calls[item[0]] > 0.5), key=lambda item: -item[1])
    total = sum(us for _, us in rows)
    print(f"{args.engine_dir} batch {args.batch_size}, {args.input_len} in, {args.output_len} out: "
          f"decode step {step_wall:.1f} us wall, kernels {total:.1f} us, launches {sum(calls[k] for k, _ in rows):.0f}")
    print(f"{'kernel':60} {'grid':16} {'calls':>6} {'us/step':>8} {'share':>6}")
    for (name, grid), us in rows:
        print(f"{name:60} {grid:16} {calls[(name, grid)]:6.1f} {us:8.1f} {us / step_wall:6.1%}")
    gaps = step_wall - total
    print(f"{'launch gaps (wall - kernels; under PDL kernels overlap)':77} {gaps:15.1f} {gaps / step_wall:6.1%}")
    if args.json:
        args.json.write_text(json.dumps({"step_wall_us": step_wall, "kernels_us": total, "kernels": [
            {"name": name, "grid": grid, "calls": calls[(name, grid)], "us": us} for (name, grid), us in rows]},
            indent=1))


if __name__ == "__main__":
    main()
