"""The paged KV cache's block allocator: a free list over the pool's blocks, with a
reference count per block. Sequences take blocks as they grow and give them back
when they finish or are preempted; beams of one request share the blocks they have
in common (share), and a beam about to write into a block another beam still reads
gets its own copy first (copy_on_write).

With prefix caching, a full block whose K/V are computed is registered under its
content: its tokens and the content of everything before it (the content id of the
block before, a serial number never reused, so equal keys mean equal token chains
and no hash can collide). A later sequence whose tokens start with the same chain
takes those blocks instead of computing them (TensorRT-LLM's KV-cache reuse, vLLM's
automatic prefix caching). A freed block keeps its content while it waits, and free
blocks without content are handed out first, then the cached ones least recently
freed first."""

from __future__ import annotations

from collections import OrderedDict

ContentKey = tuple[int, tuple[int, ...]]  # (content id of the block before, 0 for the first; the block's tokens)


class BlockManager:
    """Hands out the ids 0 .. num_blocks - 1 of the KV pool's blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Popped from the end: low ids first, so small workloads stay in few blocks.
        self._free = list(range(num_blocks - 1, -1, -1))
        self._references = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free blocks keeping their content, oldest first
        self._block_of: dict[ContentKey, tuple[int, int]] = {}  # content -> (block, content id)
        self._key_of: dict[int, ContentKey] = {}  # registered block -> its content
        self._next_content_id = 1
        self.queried_tokens = 0  # prompt tokens looked up in the cache at admission
        self.hit_tokens = 0  # of those, the ones found there
        self.evicted_blocks = 0  # cached blocks handed out for new content

    @property
    def free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def cached_blocks(self) -> int:
        """Blocks registered under their content (held or free)."""
        return len(self._key_of)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evicted_blocks += 1
        self._references[block] = 1
        return block

    def grow(self, block_table: list[int], tokens: int) -> bool:
        """Appends blocks to `block_table` until it holds `tokens` tokens; False (and
        nothing taken) when the pool has too few free blocks."""
        missing = self.blocks_for(tokens) - len(block_table)
        if missing > self.free_blocks:
            return False
        for _ in range(max(0, missing)):
            block_table.append(self._take())
        return True

    def shrink(self, block_table: list[int], tokens: int) -> None:
        """Gives back the table's last blocks beyond those that hold `tokens` tokens (blocks
        a speculative draft took for tokens that were rejected)."""
        keep = self.blocks_for(tokens)
        if len(block_table) > keep:
            tail = block_table[keep:]
            del block_table[keep:]
            self.release(tail)

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
        table holds it; a cached one keeps its content until it is needed) and empties it.
        The table's last blocks are freed first, so they are evicted before its first ones,
        which more sequences share."""
        for block in reversed(block_table):
            self._references[block] -= 1
            if self._references[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        block_table.clear()

    def cached_prefix(self, tokens: list[int], max_blocks: int) -> tuple[list[int], list[int]]:
        """(blocks, content ids) of the longest chain of registered full blocks that `tokens`
        starts with, at most `max_blocks` of them; nothing is taken yet (see take_cached)."""
        blocks, content_ids, parent, size = [], [], 0, self.block_size
        for start in range(0, min(max_blocks, len(tokens) // size) * size, size):
            found = self._block_of.get((parent, tuple(tokens[start:start + size])))
            if found is None:
                break
            blocks.append(found[0])
            content_ids.append(parent := found[1])
        return blocks, content_ids

    def taken_from_free(self, blocks: list[int]) -> int:
        """How many of `blocks` are free now (taking them lowers free_blocks)."""
        return sum(self._references[block] == 0 for block in blocks)

    def take_cached(self, block_table: list[int], blocks: list[int]) -> None:
        """Appends the cached `blocks` (cached_prefix's) to the empty `block_table`, holding each."""
        for block in blocks:
            if self._references[block] == 0:
                del self._evictable[block]
            self._references[block] += 1
        block_table += blocks

    def register(self, block: int, parent: int, tokens: list[int]) -> int:
        """Registers the full `block` holding `tokens` after the chain of content id `parent`;
        returns the chain's content id through it. Content already registered keeps its
        block (this one stays private) and its id."""
        key = (parent, tuple(tokens))
        found = self._block_of.get(key)
        if found is not None:
            return found[1]
        content_id, self._next_content_id = self._next_content_id, self._next_content_id + 1
        self._block_of[key] = (block, content_id)
        self._key_of[block] = key
        return content_id
