"""Paged KV block manager with reference counts and automatic prefix caching (pure Python, no torch).

Design after vLLM v1's ``KVCacheManager`` / ``BlockPool`` and nano-vllm's ``BlockManager``:

* The KV cache is ``num_blocks`` physical blocks of ``block_size`` token slots each. A request owns an
  ordered block table; token position ``p`` lives in block ``table[p // block_size]``.
* Every block has a reference count. Blocks with count 0 sit in an LRU free queue (oldest freed
  first out). A free block may still hold cached prefix content: it stays findable until the moment
  it is handed out again, when its cache entry is evicted.
* Only FULL PROMPT blocks are cached. The cache key of prompt block ``i`` is
  ``(parent_node_id, tuple(tokens of block i))`` where ``parent_node_id`` names the exact prefix of
  blocks ``0..i-1`` (0 for the empty prefix). Node ids come from a counter and are never reused, so
  two keys are equal only if the whole token prefix is equal: lookups are exact, with no hash
  collisions. A node id whose entry was evicted simply becomes unreachable.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # type hints only: keeps this module import-light
    from cluster.request import Request

_ROOT = 0  # node id of the empty prefix

CacheKey = tuple[int, tuple[int, ...]]


class BlockManager:
    """Allocates KV blocks to requests; ref-counted, LRU-evicting, prefix-caching.

    Args:
        num_blocks: number of physical KV blocks (>= 1).
        block_size: token slots per block (>= 1).
        enable_prefix_caching: reuse the KV of identical full prompt blocks across requests.

    Raises:
        ValueError: ``num_blocks`` or ``block_size`` is below 1.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # LRU free queue: front = least recently freed = next handed out
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # prefix cache: key -> block, and per cached block its (key, node id)
        self._cache: dict[CacheKey, int] = {}
        self._block_entry: dict[int, tuple[CacheKey, int]] = {}
        self._next_node_id = _ROOT + 1
        # per request: block table, prompt blocks processed by the cache, node ids of its prefix chain
        self._tables: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self._prefix_nodes: dict[str, list[int]] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, including evictable blocks that still hold cached content."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by at least one request, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered in the prefix cache (in use or evictable)."""
        return len(self._cache)

    def get_block_table(self, request_id: str) -> list[int]:
        """The request's block table (physical block ids in position order); ``[]`` if it has none.

        The returned list is the live table: copy it before keeping it across calls.
        """
        return self._tables.get(request_id, [])

    def _block_key(self, parent: int, token_ids: list[int], i: int) -> CacheKey:
        bs = self.block_size
        return (parent, tuple(token_ids[i * bs:(i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest chain of cached blocks matching the start of the request's prompt.

        At most ``(num_prompt_tokens - 1) // block_size`` blocks are considered, so the last prompt
        token is always computed (its logits are needed to sample). Ref counts are not changed; pass
        the blocks to :meth:`allocate_slots` in the same scheduling step. Adds the number of
        candidate blocks to ``prefix_cache_queries`` and the number found to ``prefix_cache_hits``.

        Returns:
            (block ids in order, number of tokens they cover = len(blocks) * block_size).
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_prompt_tokens - 1) // self.block_size
        blocks: list[int] = []
        parent = _ROOT
        prompt = request.prompt_token_ids
        for i in range(max_blocks):
            block = self._cache.get(self._block_key(parent, prompt, i))
            if block is None:
                break
            blocks.append(block)
            parent = self._block_entry[block][1]
        self.prefix_cache_queries += max_blocks
        self.prefix_cache_hits += len(blocks)
        return blocks, len(blocks) * self.block_size

    # ------------------------------------------------------------------ allocation
    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Optional[list[int]] = None
    ) -> Optional[list[int]]:
        """Grow the request's table to cover ``request.num_computed_tokens + num_new_tokens`` positions.

        On a request's first allocation, ``computed_blocks`` (from :meth:`get_computed_blocks`) open
        its table: their ref counts go up and evictable ones leave the free queue. The caller sets
        ``request.num_computed_tokens`` to the tokens they cover before calling.

        Returns:
            The newly allocated block ids (possibly empty), or ``None`` when there are not enough free
            blocks; then nothing changed (the scheduler's single "preempt" signal).

        Raises:
            ValueError: ``num_new_tokens`` < 0; ``computed_blocks`` given for a request that already
                has a table, or naming a block that is not in the prefix cache.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        rid = request.request_id
        table = self._tables.get(rid)
        computed = list(computed_blocks or ())
        if computed:
            if table:
                raise ValueError(f"request {rid!r}: computed_blocks are only accepted on first allocation")
            missing = [b for b in computed if b not in self._block_entry]
            if missing:
                raise ValueError(f"request {rid!r}: computed blocks {missing} are not in the prefix cache")
        have = len(table) if table else len(computed)
        total_tokens = request.num_computed_tokens + num_new_tokens
        need = max(0, -(-total_tokens // self.block_size) - have)
        num_revived = sum(1 for b in computed if self._ref_counts[b] == 0)
        if need > len(self._free) - num_revived:
            return None
        if table is None:
            table = self._tables[rid] = []
            self._num_cached_blocks[rid] = len(computed)
            self._prefix_nodes[rid] = [self._block_entry[b][1] for b in computed]
        for b in computed:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1
            table.append(b)
        new_blocks = [self._pop_free() for _ in range(need)]
        table.extend(new_blocks)
        return new_blocks

    def _pop_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        entry = self._block_entry.pop(block, None)
        if entry is not None:  # evict its cached content now that it is reused
            del self._cache[entry[0]]
        self._ref_counts[block] = 1
        return block

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so tail blocks are evicted first) and drop its
        table. Blocks reaching ref count 0 join the free queue; cached ones stay findable until reused.
        A request without a table is ignored."""
        rid = request.request_id
        table = self._tables.pop(rid, None)
        self._num_cached_blocks.pop(rid, None)
        self._prefix_nodes.pop(rid, None)
        if not table:
            return
        for b in reversed(table):
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None

    # ------------------------------------------------------------------ prefix cache
    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's prompt blocks that became full and computed in the prefix cache.

        Call after ``request.num_computed_tokens`` advanced. Block ``i`` qualifies when it lies
        entirely within the prompt and ``num_computed_tokens >= (i + 1) * block_size``. If an equal
        prefix is already cached in another block, this block stays private (no duplicate entry).
        """
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables.get(rid)
        if not table:
            return
        n_full = min(request.num_prompt_tokens, request.num_computed_tokens) // self.block_size
        n_full = min(n_full, len(table))
        start = self._num_cached_blocks[rid]
        if n_full <= start:
            return
        nodes = self._prefix_nodes[rid]
        prompt = request.prompt_token_ids
        for i in range(start, n_full):
            key = self._block_key(nodes[-1] if nodes else _ROOT, prompt, i)
            hit = self._cache.get(key)
            if hit is not None:
                nodes.append(self._block_entry[hit][1])
                continue
            block = table[i]
            if block in self._block_entry:  # cannot happen for a fresh block; stay safe
                nodes.append(self._block_entry[block][1])
                continue
            node = self._next_node_id
            self._next_node_id += 1
            self._cache[key] = block
            self._block_entry[block] = (key, node)
            nodes.append(node)
        self._num_cached_blocks[rid] = n_full

    def reset_prefix_cache(self) -> None:
        """Forget all cached content. Blocks in use stay allocated; their tables are untouched."""
        self._cache.clear()
        self._block_entry.clear()

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Assert the internal invariants; meant for tests and an idle engine.

        Raises:
            AssertionError: a leaked block (ref 0 but not free, or free with ref > 0), a negative ref
                count, a block whose ref count differs from its occurrences in block tables, a block
                twice in one table, free + used != num_blocks, or an inconsistent prefix cache.
        """
        refs = self._ref_counts
        assert len(refs) == self.num_blocks, f"{len(refs)} ref counts for {self.num_blocks} blocks"
        owners: Counter[int] = Counter()
        for rid, table in self._tables.items():
            dup = [b for b, c in Counter(table).items() if c > 1]
            assert not dup, f"request {rid!r}: blocks {dup} appear more than once in its block table"
            owners.update(table)
        used = 0
        for b, ref in enumerate(refs):
            assert ref >= 0, f"block {b}: negative ref count {ref}"
            in_free = b in self._free
            if ref == 0:
                assert in_free, f"block {b} leaked: ref count 0 but not in the free queue"
            else:
                used += 1
                assert not in_free, f"block {b}: in the free queue with ref count {ref}"
            assert owners.get(b, 0) == ref, (
                f"block {b}: ref count {ref} but referenced by {owners.get(b, 0)} block-table entries"
            )
        bad = [b for b in self._free if not 0 <= b < self.num_blocks]
        assert not bad, f"free queue holds unknown blocks {bad}"
        assert used + len(self._free) == self.num_blocks, (
            f"free ({len(self._free)}) + used ({used}) != num_blocks ({self.num_blocks})"
        )
        assert len(self._cache) == len(self._block_entry), (
            f"prefix cache has {len(self._cache)} keys but {len(self._block_entry)} cached blocks"
        )
        for key, b in self._cache.items():
            entry = self._block_entry.get(b)
            assert entry is not None and entry[0] == key, f"prefix cache entry of block {b} is inconsistent"
