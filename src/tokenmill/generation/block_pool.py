"""The pool of fixed-size KV cache blocks, with reference counts and a prefix cache.

A full block that has been computed is registered under a chained hash of its tokens
(the hash of its parent block and its own tokens), so a later request with the same
prefix finds it again. A lookup checks the block's tokens and its parent's identity,
so a hash collision can never hand out the wrong keys and values.

Free blocks wait in least-recently-used order. A freed block that holds cached
content stays findable until it is handed out again; blocks with nothing cached are
handed out first. Blocks never handed out come next, before the cached ones, unless the
pool prefers warm blocks (``prefer_warm``, the CPU engine's choice): the first write to
a never-used block is a page fault on each of its pages, and on the project's VM that
costs about 2 ms per MB, a tenth of a 64-sequence batch's time when every batch moved on
to fresh blocks; recycling the least recently used cached block instead keeps the
memory a batch writes warm, and the cache grows into new memory only when all of the
touched memory is in use.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# Parent hash of a request's first block.
ROOT_HASH = 0x746F6B656E6D696C


def chain_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    #: set while the block is registered in the prefix cache
    block_hash: int | None = None
    tokens: tuple[int, ...] | None = None
    parent_id: int | None = None
    parent_generation: int = 0
    #: bumped whenever the block is reused for new content, so stale children can't match it
    generation: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, prefer_warm: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.prefer_warm = prefer_warm
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        #: blocks handed out before and free again: uncached ones first, then cached, LRU
        self._free: OrderedDict[int, None] = OrderedDict()
        #: blocks never handed out, popped from the end (so in ascending order)
        self._fresh: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached: dict[int, KVBlock] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out (cached ones with no user included)."""
        return len(self._free) + len(self._fresh)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def _take(self) -> int:
        if self._free:
            first = next(iter(self._free))
            if self.prefer_warm or not self._fresh or self.blocks[first].block_hash is None:
                return self._free.popitem(last=False)[0]
        return self._fresh.pop()

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free")
        out = []
        for _ in range(n):
            block = self.blocks[self._take()]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = block.tokens = block.parent_id = None
        block.generation += 1

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference to blocks found in the prefix cache."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block. Pass a request's blocks last first, so its
        tail is evicted before the prefix that other requests are likelier to share."""
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"KV block {b.block_id} freed more often than taken")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = None
                if b.block_hash is None:
                    self._free.move_to_end(b.block_id, last=False)  # nothing worth keeping

    def lookup(self, block_hash: int, tokens: tuple[int, ...], parent: KVBlock | None) -> KVBlock | None:
        block = self._cached.get(block_hash)
        if block is None or block.tokens != tokens:
            return None
        if parent is None:
            return block if block.parent_id is None else None
        if block.parent_id != parent.block_id or block.parent_generation != parent.generation:
            return None
        return block

    def register(
        self, block: KVBlock, block_hash: int, tokens: tuple[int, ...], parent: KVBlock | None
    ) -> None:
        """Make a computed full block findable; a block with the same content already
        registered wins, and this one stays private to its request."""
        if not self.enable_caching or block.block_hash is not None:
            return
        held = self._cached.get(block_hash)
        if held is not None:
            stale = (
                held.parent_id is not None
                and self.blocks[held.parent_id].generation != held.parent_generation
            )
            if not stale:
                return  # the same content is cached already (or a live collision keeps its place)
            # Its parent was reused, so nothing can reach it any more: the live chain takes the slot.
            held.block_hash = held.tokens = held.parent_id = None
        block.block_hash, block.tokens = block_hash, tokens
        block.parent_id = parent.block_id if parent is not None else None
        block.parent_generation = parent.generation if parent is not None else 0
        self._cached[block_hash] = block

    def reset_cache(self) -> None:
        """Forget every cached block that no request holds."""
        for block_id in list(self._free):
            self._evict(self.blocks[block_id])
