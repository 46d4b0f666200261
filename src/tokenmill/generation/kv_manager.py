"""Per-request block tables over the block pool, and the prefix-cache lookups."""

from __future__ import annotations

from tokenmill.generation.block_pool import ROOT_HASH, BlockPool, KVBlock, chain_hash
from tokenmill.generation.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, prefer_warm: bool = False
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching, prefer_warm)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[int]] = {}
        #: per request, the registered block holding each of its full blocks' content, with
        #: that block's generation then: it may be another request's block, evicted since
        self._canonical: dict[str, list[tuple[KVBlock, int]]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def usage(self) -> float:
        return self.pool.usage()

    def _block_hashes(self, req: Request, num_full: int) -> list[int]:
        hashes = self._hashes.setdefault(req.request_id, [])
        bs, ids = self.block_size, req.all_token_ids
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(chain_hash(parent, tuple(ids[i * bs : (i + 1) * bs])))
        return hashes

    def find_cached_prefix(self, req: Request) -> list[KVBlock]:
        """The longest run of cached blocks matching the start of ``req``'s tokens.

        At least one token is always left to compute, since the next token's logits
        come from computing the last one.
        """
        if not self.enable_prefix_caching:
            return []
        bs, ids = self.block_size, req.all_token_ids
        num_full = (req.num_tokens - 1) // bs
        found: list[KVBlock] = []
        parent = None
        for i, h in enumerate(self._block_hashes(req, num_full)):
            block = self.pool.lookup(h, tuple(ids[i * bs : (i + 1) * bs]), parent)
            if block is None:
                break
            found.append(block)
            parent = block
        return found

    def allocate_slots(self, req: Request, num_new_tokens: int, cached: list[KVBlock] | None = None) -> bool:
        """Give ``req`` room for ``num_new_tokens`` more tokens (after ``cached`` prefix
        blocks when it is newly scheduled). Returns False, changing nothing, when the pool
        has too few free blocks."""
        cached = cached or []
        blocks = self._blocks.setdefault(req.request_id, [])
        computed = req.num_computed_tokens + len(cached) * self.block_size
        need = cdiv(computed + num_new_tokens, self.block_size) - len(blocks) - len(cached)
        # Cached blocks nobody holds sit in the free queue; taking them shrinks it.
        reclaimed = sum(1 for b in cached if b.ref_cnt == 0)
        if need > self.pool.num_free - reclaimed:
            if not blocks:
                del self._blocks[req.request_id]
            return False
        if cached:
            self.pool.touch(cached)
            blocks.extend(cached)
            self._canonical[req.request_id] = [(b, b.generation) for b in cached]
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = req.num_computed_tokens // bs
        canonical = self._canonical.setdefault(req.request_id, [])
        if len(canonical) >= num_full:
            return
        hashes = self._block_hashes(req, num_full)
        blocks = self._blocks[req.request_id]
        ids = req.all_token_ids
        for i in range(len(canonical), num_full):
            parent = None
            if i:
                parent, generation = canonical[i - 1]
                if parent.generation != generation:
                    # The parent was another request's block and has been reused since: its
                    # identity no longer stands for this prefix, so nothing may chain onto it.
                    break
            tokens = tuple(ids[i * bs : (i + 1) * bs])
            self.pool.register(blocks[i], hashes[i], tokens, parent)
            same = self.pool.lookup(hashes[i], tokens, parent)
            if same is None:
                break
            canonical.append((same, same.generation))

    def free(self, req: Request) -> None:
        blocks = self._blocks.pop(req.request_id, [])
        self._canonical.pop(req.request_id, None)
        self.pool.free(blocks[::-1])

    def forget(self, req: Request) -> None:
        """Drop everything kept for a finished request (its hashes too)."""
        self.free(req)
        self._hashes.pop(req.request_id, None)
