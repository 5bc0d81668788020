"""On a GPU: the weight-streaming floor of a batch-1 decode step of each engine given:
the bytes a step reads (every weight of the engine files but the embedding table, whose
one row a step reads) over the card's device copy rate, measured here (read and write of
2 GiB). Usage: decode_floor.py ENGINE_DIR [ENGINE_DIR ...]"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import torch


def copy_rate() -> float:
    """Bytes per second that a device-to-device copy of 2 GiB reads and writes."""
    source = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 20 / (time.perf_counter() - start)


def streamed_bytes(engine_dir: Path) -> int:
    """Bytes of every tensor in the rank files except the embedding table."""
    total = 0
    for path in sorted(engine_dir.glob("rank*.safetensors")):
        with path.open("rb") as stream:
            header = json.loads(stream.read(struct.unpack("<Q", stream.read(8))[0]))
        total += sum(spec["data_offsets"][1] - spec["data_offsets"][0] for name, spec in header.items()
                     if name != "__metadata__" and "word_embeddings" not in name)
    return total


def main() -> None:
    rate = copy_rate()
    print(f"device copy rate {rate / 1e12:.3f} TB/s")
    for engine_dir in map(Path, sys.argv[1:]):
        step = streamed_bytes(engine_dir) / rate
        print(f"{engine_dir}: {streamed_bytes(engine_dir) / 1e9:.3f} GB a step, floor {step * 1e3:.3f} ms "
              f"({1 / step:.1f} tok/s)")


if __name__ == "__main__":
    main()
