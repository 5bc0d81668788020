"""The paged KV cache's block allocator: a free list over the pool's blocks.
Sequences take blocks as they grow and give them all back when they finish or
are preempted."""

from __future__ import annotations


class BlockManager:
    """Hands out the ids 0 .. num_blocks - 1 of the KV pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: low ids first, so small workloads stay in few blocks.
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def grow(self, block_table: list[int], tokens: int) -> bool:
        """Appends blocks to `block_table` until it holds `tokens` tokens; False (and
        nothing taken) when the pool has too few free blocks."""
        missing = self.blocks_for(tokens) - len(block_table)
        if missing > len(self._free):
            return False
        for _ in range(max(0, missing)):
            block_table.append(self._free.pop())
        return True

    def release(self, block_table: list[int]) -> None:
        """Gives every block of `block_table` back and empties it."""
        self._free.extend(reversed(block_table))
        block_table.clear()
