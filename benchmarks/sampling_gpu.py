"""On the GPU: what choosing the tokens of one decode step costs at 256 rows of the
6B vocabulary (65024), per part, in milliseconds (CUDA events, median of 20 after
warm-up; host work inside the window counts): the greedy argmax, the draw without
sorting (kernels/draw_tokens.py) and its PyTorch reference, torch.sort (what the
top-k/top-p filter cost before the draw kernel), the penalties, and
runtime/sampling.sample_rows as the sampler (runtime/sampler.py) calls it. Checks that the kernel draws
the reference's tokens. Usage: PYTHONPATH=. python3 benchmarks/sampling_gpu.py"""

from __future__ import annotations

import statistics

import torch

from glm_engine.kernels import reference
from glm_engine.kernels.draw_tokens import draw_tokens
from glm_engine.runtime.penalties import TokenHistory, apply_penalties
from glm_engine.runtime.sampling import SamplingConfig, row_keys, sample_rows

ROWS, VOCAB = 256, 65024


def millis(run, repeats: int = 20) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, device=device) * 2
    keys = row_keys(list(range(ROWS)), [5] * ROWS).to(device)
    filters = {"no filter": (0, 1.0), "top-p 0.9": (0, 0.9), "top-k 50": (50, 1.0), "top-k 50 top-p 0.9": (50, 0.9)}
    history = TokenHistory(ROWS, VOCAB, device)
    for slot in range(ROWS):
        history.take(list(range(slot, slot + 600)), list(range(slot, slot + 50)))
    slots = torch.arange(ROWS, device=device)
    ones, zeros = torch.full((ROWS,), 1.1, device=device), torch.zeros(ROWS, device=device)
    parts = {"greedy argmax": lambda: logits.argmax(dim=-1),
             "torch.sort (the filter's sort before)": lambda: torch.sort(logits, dim=-1, descending=True),
             "repetition penalty (apply_penalties)": lambda: apply_penalties(logits, history, slots, ones, zeros,
                                                                             zeros)}
    print(f"{torch.cuda.get_device_name()}: {ROWS} rows x {VOCAB}")
    for name, (k, p) in filters.items():
        top_k = torch.full((ROWS,), k, dtype=torch.int32, device=device)
        top_p = torch.full((ROWS,), p, dtype=torch.float64, device=device)
        same = torch.equal(draw_tokens(logits, keys, top_k, top_p), reference.draw_tokens(logits, keys, top_k, top_p))
        print(f"{name}: kernel draws = reference draws: {same}")
        parts[f"draw kernel, {name}"] = lambda top_k=top_k, top_p=top_p: draw_tokens(logits, keys, top_k, top_p)
        parts[f"draw reference, {name}"] = lambda top_k=top_k, top_p=top_p: reference.draw_tokens(
            logits, keys, top_k, top_p)
        sampling = SamplingConfig(max_new_tokens=100, top_k=k, temperature=0.8, top_p=p)
        parts[f"sample_rows T 0.8, {name}"] = lambda sampling=sampling: sample_rows(
            logits, [sampling] * ROWS, list(range(ROWS)), [5] * ROWS)
    for name, run in parts.items():
        print(f"{name:<44} {millis(run):8.3f} ms")


if __name__ == "__main__":
    main()
