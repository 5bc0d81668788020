"""The paged KV cache's block allocator: a free list over the pool's blocks, with a
reference count per block. Sequences take blocks as they grow and give them back
when they finish or are preempted; beams of one request share the blocks they have
in common (share), and a beam about to write into a block another beam still reads
gets its own copy first (copy_on_write)."""

from __future__ import annotations


class BlockManager:
    """Hands out the ids 0 .. num_blocks - 1 of the KV pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end: low ids first, so small workloads stay in few blocks.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._references = [0] * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def _take(self) -> int:
        block = self._free.pop()
        self._references[block] = 1
        return block

    def grow(self, block_table: list[int], tokens: int) -> bool:
        """Appends blocks to `block_table` until it holds `tokens` tokens; False (and
        nothing taken) when the pool has too few free blocks."""
        missing = self.blocks_for(tokens) - len(block_table)
        if missing > len(self._free):
            return False
        for _ in range(max(0, missing)):
            block_table.append(self._take())
        return True

    def share(self, block_table: list[int]) -> list[int]:
        """A second table over the same blocks (a beam forking from another)."""
        for block in block_table:
            self._references[block] += 1
        return list(block_table)

    def is_shared(self, block_table: list[int], position: int) -> bool:
        """Whether another table also holds the block of `position`."""
        return self._references[block_table[position // self.block_size]] > 1

    def copy_on_write(self, block_table: list[int], position: int) -> tuple[int, int]:
        """Before writing the token at `position` into a shared block: the table takes a
        fresh block instead and (source, copy) is returned, for the caller to copy the K/V.
        Needs one free block (callers check free_blocks)."""
        index = position // self.block_size
        block = block_table[index]
        self._references[block] -= 1
        block_table[index] = self._take()
        return block, block_table[index]

    def release(self, block_table: list[int]) -> None:
        """Gives back this table's hold on each of its blocks (a block is free once no
        table holds it) and empties it."""
        for block in reversed(block_table):
            self._references[block] -= 1
            if self._references[block] == 0:
                self._free.append(block)
        block_table.clear()
