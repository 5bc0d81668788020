"""Tensor-parallel processes: the launcher's environment (torchrun's variables, or
Open MPI's from `mpirun -n N`), torch.distributed started over it (NCCL on GPUs,
gloo on the CPU), and the two collectives a rank's network calls: the all-reduce
after each row-parallel layer and the gather of the vocabulary-parallel logits.

Every rank runs the same scheduler on the same inputs: the gathered logits are
equal on all ranks, so each picks the same tokens with no per-step broadcast of a
plan (a step's only traffic is the network's own collectives). What is not the
same everywhere is agreed once: the seed that unseeded requests draw from."""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from glm_engine import GlmEngineError

DEFAULT_MASTER_PORT = "29500"  # torchrun's default


@dataclass(frozen=True)
class Launch:
    """Where this process sits among the ranks (one rank, world size 1, when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


def _integer_variable(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise GlmEngineError(f"environment variable {name}={value!r} is not an integer; start the ranks with "
                             "torchrun or mpirun") from None


def launch_from_environment() -> Launch:
    """The launch as torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) or
    mpirun (OMPI_COMM_WORLD_*) describe it. Under mpirun, MASTER_ADDR defaults to this
    host only when every rank runs on it; MASTER_PORT defaults to 29500."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        world_size = _integer_variable("WORLD_SIZE")
        if "LOCAL_RANK" not in os.environ:
            raise GlmEngineError("RANK and WORLD_SIZE are set but LOCAL_RANK is not; start the ranks with torchrun")
        local_world_size = _integer_variable("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world_size
        launch = Launch(_integer_variable("RANK"), world_size, _integer_variable("LOCAL_RANK"), local_world_size)
    elif "OMPI_COMM_WORLD_SIZE" in os.environ:
        world_size = _integer_variable("OMPI_COMM_WORLD_SIZE")
        local_world_size = _integer_variable("OMPI_COMM_WORLD_LOCAL_SIZE")
        launch = Launch(_integer_variable("OMPI_COMM_WORLD_RANK"), world_size,
                        _integer_variable("OMPI_COMM_WORLD_LOCAL_RANK"), local_world_size)
        if world_size > 1 and "MASTER_ADDR" not in os.environ:
            if local_world_size != world_size:
                raise GlmEngineError("mpirun across hosts: set MASTER_ADDR (and MASTER_PORT) to rank 0's host "
                                     "for every rank, e.g. mpirun -x MASTER_ADDR=host0 ...")
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    else:
        return Launch()
    if not (0 <= launch.rank < launch.world_size and 0 <= launch.local_rank < launch.local_world_size
            <= launch.world_size):
        raise GlmEngineError(f"inconsistent launch environment: {launch}; start the ranks with torchrun or mpirun")
    return launch


def rank_device(launch: Launch, name: str | None) -> str | None:
    """The device of this rank: GPU LOCAL_RANK when several ranks share a host's GPUs."""
    if launch.world_size == 1:
        return name
    if name == "cpu":
        return name
    if name not in (None, "cuda"):
        raise GlmEngineError(f"--device {name}: under torchrun/mpirun each rank takes the GPU numbered by its local "
                             "rank; pass --device cuda (or cpu), not a GPU number")
    if not torch.cuda.is_available():
        if name == "cuda":
            raise GlmEngineError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
        return "cpu"
    if launch.local_world_size > torch.cuda.device_count():
        raise GlmEngineError(f"{launch.local_world_size} ranks on this host but only {torch.cuda.device_count()} "
                             "GPU(s): start at most one rank per GPU")
    return f"cuda:{launch.local_rank}"


def usable_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset or a cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def share_cores(launch: Launch, device: torch.device) -> None:
    """Sizes this rank's host thread pool when the launcher did not (torchrun sets
    OMP_NUM_THREADS=1; mpirun leaves it unset). A GPU rank's host work is many small ops,
    fastest on one thread: TP2 serving on an H200 host ran at 9,377 output tok/s with 1
    thread per rank, 5,500 with all of them (7,041 with half the cores each, on a second host
    of that kind); one GPU likewise, once other processes share the cores (serve.py's engine
    beside its HTTP side and clients). A CPU rank computes on half its share of the cores:
    torch's threads meet at the end of every op, so one thread that another process holds off
    its core stalls the others. Measured on a 2-core host (decode of a tiny and of a
    150M-parameter float32 engine), two threads were no faster than one on an idle host
    (decode reads every weight once per token: memory-bound) and several to tens of times
    slower beside one busy process; half the cores leaves the other half to the engine's
    neighbours (serve.py's HTTP side, other users)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    if device.type == "cuda":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(max(1, usable_cores() // (2 * launch.local_world_size)))


class TensorParallel:
    """The collectives of one rank's network; at world size 1 they return their input."""

    def __init__(self, launch: Launch, device: torch.device, vocab_size: int) -> None:
        self.rank, self.world_size, self.vocab_size = launch.rank, launch.world_size, vocab_size
        self.device = device
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # synchronize() and the like act on this rank's GPU, not GPU 0
        share_cores(launch, device)
        if self.world_size > 1:
            import torch.distributed as dist

            self.dist = dist
            backend = "nccl" if device.type == "cuda" else "gloo"
            if not dist.is_initialized():
                dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                        device_id=device if device.type == "cuda" else None)
                # gloo's group is destroyed at exit (left to the interpreter's end, a rank that exits
                # first can abort in its threads' teardown); NCCL's is not: destroy_process_group hung
                # on the H200 hosts once decode graphs had captured NCCL kernels.
                if backend == "gloo":
                    atexit.register(dist.destroy_process_group)
            self.all_reduce(torch.zeros(1, device=device))  # connects the ranks before any graph capture

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a row-parallel layer's partial outputs, in place."""
        if self.world_size > 1:
            self.dist.all_reduce(partial)
        return partial

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] from each rank's [N, vocab / world size] (padding dropped)."""
        if self.world_size == 1:
            return logits
        gathered = torch.empty((self.world_size, *logits.shape), dtype=logits.dtype, device=logits.device)
        if logits.device.type == "cuda":
            self.dist.all_gather_into_tensor(gathered, logits.contiguous())
        else:
            self.dist.all_gather(list(gathered.unbind(0)), logits.contiguous())
        return gathered.permute(1, 0, 2).reshape(logits.shape[0], -1)[:, :self.vocab_size]

    def rank0_value(self, value: int) -> int:
        """Rank 0's `value` on every rank: for inputs that are not the same everywhere
        (a clock, a random draw), which the ranks must agree on to plan the same steps."""
        if self.world_size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.broadcast(shared, src=0)
        return int(shared.item())

    def rank0_object(self, value: Any) -> Any:
        """Rank 0's picklable `value` on every rank (what only rank 0 was told, such as a
        server's requests, so that every rank plans the same steps)."""
        if self.world_size == 1:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def minimum(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank (e.g. KV pool blocks sized from
        each GPU's free memory: a pool of another size would schedule other steps)."""
        if self.world_size == 1:
            return value
        shared = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(shared, op=self.dist.ReduceOp.MIN)
        return int(shared.item())

    def shared_seed(self) -> int:
        """A random 63-bit seed, rank 0's on every rank."""
        return self.rank0_value(random.SystemRandom().getrandbits(63))
