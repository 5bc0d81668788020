"""Under torchrun on N GPUs: the all-reduce of a decode step, captured in a CUDA graph
as the engine captures it. For rows of 4096 halfs (1 to 256 rows), the microseconds
per all-reduce when a graph replays 56 of them back to back (a ChatGLM2-6B step has
two per layer), through NCCL (what the engine uses) and, where this torch has it,
torch's symmetric-memory one-shot all-reduce (peer-to-peer loads over NVLink; no
multicast; float32 with casts from and to float16, and bfloat16). Rank 0 prints one
line per size and method.
Then, as in a decode step, each all-reduce after a row-parallel GEMV of TP2's
dense_4h_to_h size (4096 x 6848 halfs, weights alternating so that L2 cannot hold
them): what an all-reduce adds to a step is that pair's time minus the GEMV's.
(A Triton one-shot kernel of our own was measured the same way; it was not faster
in a step: docs/PERFORMANCE.md, "Kernel choices".)
Usage: torchrun --nproc_per_node N benchmarks/allreduce_gpu.py"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

COUNT, HIDDEN, ROWS = 56, 4096, (1, 8, 32, 64, 256)


def time_graph(run, iterations: int = 50) -> float:
    """Microseconds per all-reduce of a graph that runs `run` COUNT times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(COUNT):
            run()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iterations / COUNT


def symm_mem_rows(symm, x: torch.Tensor, expected: torch.Tensor, rows: int, device: torch.device) -> dict:
    """torch's symmetric-memory one-shot all-reduce (float32 and bfloat16 only in torch
    2.11): in float32 with the casts a float16 engine would add, and in bfloat16."""
    group = dist.group.WORLD.group_name
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        try:
            buffer = symm.empty(rows, HIDDEN, dtype=dtype, device=device)
            symm.rendezvous(buffer, group)

            def run() -> torch.Tensor:
                buffer.copy_(x)  # float16 in, as from a row-parallel layer
                return torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", group).to(torch.float16)

            error = (run().float() - expected).abs().max().item()
            results[f"symm_mem one_shot {str(dtype)[6:]} + casts (max err {error:.1e})"] = time_graph(run)
        except Exception as failure:  # noqa: BLE001 - report what this torch cannot do
            results[f"symm_mem {str(dtype)[6:]}: {str(failure).splitlines()[0][:70]}"] = float("nan")
    return results


def interleaved(rows: int, device: torch.device, symm) -> dict:
    """Microseconds per (GEMV + all-reduce) pair, as in a decode step: GEMV alone, then
    with each all-reduce method after it."""
    weights = [torch.randn(HIDDEN, 6848, dtype=torch.float16, device=device) / 100 for _ in range(2)]
    inputs = torch.randn(rows, 6848, dtype=torch.float16, device=device) / 100
    outputs = [torch.empty(rows, HIDDEN, dtype=torch.float16, device=device) for _ in range(COUNT)]
    state = {"i": 0}

    def gemv() -> torch.Tensor:
        i = state["i"] = (state["i"] + 1) % COUNT
        return torch.matmul(inputs, weights[i % 2].t(), out=outputs[i])

    group = dist.group.WORLD.group_name
    methods = {"GEMV alone": lambda: gemv(), "GEMV + nccl": lambda: dist.all_reduce(gemv())}
    if symm is not None:
        staged = symm.empty(rows * HIDDEN, dtype=torch.float32, device=device)
        symm.rendezvous(staged, group)

        def torch_one_shot() -> torch.Tensor:
            out = gemv()
            staged.copy_(out.view(-1))
            return out.copy_(torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", group).view_as(out))

        methods["GEMV + symm_mem one_shot float32"] = torch_one_shot
    return {f"interleaved: {name}": time_graph(run) for name, run in methods.items()}


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    dist.all_reduce(torch.zeros(1, device=device))
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # NVLink multicast stays off (device README)
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm = symm_mem
    except ImportError:
        pass
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, dtype=torch.float16, device=device)
        expected = x.float() * world  # every rank draws the same values (same seed)
        results = {"nccl": time_graph(lambda: dist.all_reduce(x))}
        x.copy_(expected.half() / world)
        if symm is not None:
            results.update(symm_mem_rows(symm, x, expected, rows, device))
        if rows in (1, 8):
            results.update(interleaved(rows, device, symm))
        if rank == 0:
            for method, micros in results.items():
                print(f"world {world} rows {rows:4d} ({rows * HIDDEN * 2 / 1024:7.1f} KiB): {method:<48} "
                      f"{micros:7.2f} us per all-reduce")
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
