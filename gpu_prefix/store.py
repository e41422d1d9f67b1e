"""The prefix KV store: an index of chained blocks over a ``KVPool``, with pins, LRU eviction of
unpinned leaves, and epochs.

Every block a running request uses is held by its ``Lease``, in the order of its block table:
first the indexed blocks it pins (a chain from the root: matched from the cache, or its own
blocks, indexed once filled), then its private blocks (not indexed: its partial last block, its
blocks after a chain broke, or all of them for a request that shares nothing). Accounting:

- a pool block is free, indexed (pinned by some leases or not), or private to exactly one lease;
- indexed blocks pinned by no lease are a cache: they may fill the whole pool and are evicted on
  demand, leaves first, least recently used first; pinned and private blocks are never evicted;
- a block enters the index only once its KV is written (``adopt``), so no request can match a
  block whose memory is still being filled.

How many requests run, and when one is preempted to free its blocks, is the scheduler's call
(``gpu_prefix.scheduler``); this store only ever refuses, it never takes a held block.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from gpu_prefix.pool import KVPool
from keying import BlockHash

#: One element of a block chain: ``(hash, token ids, extra keys)``; ``extra_keys[0]`` is the
#: model epoch. ``gpu_prefix.hashing.block_hashes`` builds these.
ChainItem = tuple[BlockHash, tuple[int, ...], tuple[object, ...]]


class _Block:
    __slots__ = ("block_id", "block_hash", "parent", "tokens", "extra", "epoch", "refs",
                 "children", "stamp", "retired")

    def __init__(self, block_id: int, item: ChainItem, parent: BlockHash | None,
                 stamp: int) -> None:
        self.block_id = block_id
        self.block_hash, self.tokens, self.extra = item
        self.parent = parent
        self.epoch = item[2][0] if item[2] else None
        self.refs = 0
        self.children = 0
        self.stamp = stamp
        self.retired = False


@dataclass(frozen=True, kw_only=True, slots=True)
class MatchResult:
    """Blocks a match added to a lease's table, in order, and how many tokens they hold."""

    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreStats:
    """Gauges and counters of the store (exported as Prometheus metrics by the service)."""

    num_blocks: int
    block_size: int
    used_blocks: int
    free_blocks: int
    pinned_blocks: int
    private_blocks: int
    cached_blocks: int
    held_blocks: int
    usage: float
    leases: int
    hit_tokens_total: int
    query_tokens_total: int
    inserted_blocks_total: int
    evicted_blocks_total: int
    collisions_total: int
    capacity_bytes: int
    used_bytes: int


class Lease:
    """The blocks one request holds, in block-table order. Release exactly once."""

    __slots__ = ("lease_id", "pinned", "table", "indexing", "released")

    def __init__(self, lease_id: int, *, indexing: bool) -> None:
        self.lease_id = lease_id
        self.pinned: list[BlockHash] = []  # hashes of table[: len(pinned)]
        self.table: list[int] = []  # pool block ids; table[len(pinned):] are private
        self.indexing = indexing  # False once its chain broke: the rest stays private
        self.released = False

    @property
    def private(self) -> list[int]:
        return self.table[len(self.pinned) :]


class PrefixStore:
    """Thread-safe block index over a pool."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._lock = threading.RLock()
        self._index: dict[BlockHash, _Block] = {}
        self._heap: list[tuple[int, BlockHash]] = []
        self._tick = itertools.count(1)
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, Lease] = {}
        self._pinned = 0  # indexed blocks with refs > 0
        self._private = 0
        self._retired_epochs: set[object] = set()
        self._hit_tokens = self._query_tokens = 0
        self._inserted = self._evicted = self._collisions = 0

    # -- leases ------------------------------------------------------------------------------

    def open(self, *, indexing: bool = True) -> Lease:
        """A new, empty lease; ``indexing=False`` keeps all its blocks private (a request that
        shares nothing: it neither matches nor stores)."""
        with self._lock:
            lease = Lease(next(self._lease_ids), indexing=indexing)
            self._leases[lease.lease_id] = lease
            return lease

    def release(self, lease: Lease) -> None:
        """Unpin the lease's indexed blocks (they stay cached) and free its private ones."""
        with self._lock:
            if lease.released:
                raise RuntimeError(f"lease {lease.lease_id} released twice")
            lease.released = True
            for b in reversed(lease.private):
                self.pool.free(b)
                self._private -= 1
            # Children before parents, so a retired parent is freed after its last child.
            for h in reversed(lease.pinned):
                self._unpin(self._index[h])
            lease.pinned.clear()
            lease.table.clear()
            del self._leases[lease.lease_id]

    def held_blocks(self) -> int:
        """Blocks that running requests hold (pinned or private): what eviction cannot free."""
        with self._lock:
            return self._pinned + self._private

    def _unpin(self, block: _Block) -> None:
        block.refs -= 1
        if block.refs:
            return
        self._pinned -= 1
        if block.retired:
            self._free_retired_chain(block)
        elif block.children == 0:
            heapq.heappush(self._heap, (block.stamp, block.block_hash))

    def _pin(self, block: _Block, lease: Lease) -> None:
        if block.refs == 0:
            self._pinned += 1
        block.refs += 1
        block.stamp = next(self._tick)
        lease.pinned.append(block.block_hash)
        lease.table.append(block.block_id)

    # -- matching, allocating, indexing ------------------------------------------------------

    def match(self, lease: Lease, chain: Sequence[ChainItem]) -> MatchResult:
        """Extend the lease's indexed prefix with the longest cached continuation in ``chain``
        (the request's whole chain from the root), pinning what it matches.

        Every block is verified against the request: stored token ids, parent link and extra
        keys must be equal, so a hash collision ends the match instead of returning other KV.
        Only a lease with no private block can match (its table must continue its chain).
        """
        with self._lock:
            self._check_lease(lease)
            if lease.private or not lease.indexing:
                return MatchResult(block_ids=(), num_tokens=0)
            start = len(lease.pinned)
            if lease.pinned and chain[start - 1][0] != lease.pinned[-1]:
                raise RuntimeError("match must continue the chain this lease holds")
            ids: list[int] = []
            parent: BlockHash | None = lease.pinned[-1] if lease.pinned else None
            for item in chain[start:]:
                block = self._index.get(item[0])
                if block is None or block.retired:
                    break
                if block.tokens != item[1] or block.parent != parent or block.extra != item[2]:
                    self._collisions += 1
                    break
                self._pin(block, lease)
                ids.append(block.block_id)
                parent = item[0]
            self._query_tokens += (len(chain) - start) * self.block_size
            self._hit_tokens += len(ids) * self.block_size
            return MatchResult(block_ids=tuple(ids), num_tokens=len(ids) * self.block_size)

    def allocate(self, lease: Lease) -> int | None:
        """A private block appended to the lease's table: a free one (next to the lease's last
        block when possible), else one freed by evicting an unpinned leaf. ``None`` when every
        block is held: the caller must free some (preempt a request), never take a held one."""
        with self._lock:
            self._check_lease(lease)
            if self.pool.num_free == 0 and not self._evict_one():
                return None
            b = self.pool.allocate(after=lease.table[-1] if lease.table else None)
            lease.table.append(b)
            self._private += 1
            return b

    def adopt(self, lease: Lease, item: ChainItem) -> bool:
        """Index the lease's first private block (its KV now written) as ``item``, the next
        block of its chain; it stays pinned by the lease. Returns False, and keeps every later
        block of this lease private, when the chain cannot continue in the index: the epoch was
        dropped, another request indexed the same block first, or a colliding hash holds it."""
        with self._lock:
            self._check_lease(lease)
            if not lease.indexing:
                return False
            pos = len(lease.pinned)
            if pos >= len(lease.table):
                raise RuntimeError("adopt needs a private block holding the item's KV")
            h, tokens, extra = item
            parent = lease.pinned[-1] if lease.pinned else None
            existing = self._index.get(h)
            if (extra and extra[0] in self._retired_epochs) or existing is not None:
                if existing is not None and (
                    existing.tokens != tokens or existing.parent != parent
                    or existing.extra != extra
                ):
                    self._collisions += 1
                lease.indexing = False
                return False
            block = _Block(lease.table[pos], item, parent, next(self._tick))
            block.refs = 1
            self._index[h] = block
            if parent is not None:
                self._index[parent].children += 1
            lease.pinned.append(h)
            self._private -= 1
            self._pinned += 1
            self._inserted += 1
            return True

    def _evict_one(self) -> bool:
        while self._heap:
            stamp, h = heapq.heappop(self._heap)
            block = self._index.get(h)
            if (block is None or block.stamp != stamp or block.refs or block.children
                    or block.retired):
                continue  # stale entry
            self._remove(block)
            self._evicted += 1
            return True
        return False

    def _remove(self, block: _Block) -> None:
        del self._index[block.block_hash]
        self.pool.free(block.block_id)
        if block.parent is not None:
            parent = self._index[block.parent]
            parent.children -= 1
            if parent.children == 0 and parent.refs == 0 and not parent.retired:
                heapq.heappush(self._heap, (parent.stamp, block.parent))
        if len(self._heap) > 4 * self.pool.num_blocks + 64:
            self._heap = [
                (s, h) for s, h in self._heap if h in self._index and self._index[h].stamp == s]
            heapq.heapify(self._heap)

    def evict(self, n_blocks: int) -> int:
        """Evict up to ``n_blocks`` unpinned leaves, least recently used first; returns how many."""
        done = 0
        with self._lock:
            while done < n_blocks and self._evict_one():
                done += 1
        return done

    # -- epochs -----------------------------------------------------------------------------

    def drop_epoch(self, epoch: object) -> int:
        """Drop every block of ``epoch`` now, except pinned ones (and their ancestors), which go
        when their last request releases them. Later adoptions of that epoch are refused.
        Returns the blocks freed now."""
        with self._lock:
            self._retired_epochs.add(epoch)
            doomed = [b for b in self._index.values() if b.epoch == epoch]
            for b in doomed:
                b.retired = True
            used = self.pool.num_used
            for b in doomed:
                if b.block_hash in self._index:
                    self._free_retired_chain(b)
            return used - self.pool.num_used

    def drop_epochs_except(self, keep: object) -> int:
        """Drop every epoch but ``keep`` (a rollout to ``keep``)."""
        with self._lock:
            epochs = {b.epoch for b in self._index.values()} - {keep}
            return sum(self.drop_epoch(e) for e in epochs)

    def _free_retired_chain(self, block: _Block) -> None:
        """Free ``block`` if it is a retired unpinned leaf, then its parents while they are too."""
        while block.retired and block.refs == 0 and block.children == 0:
            parent = self._index.get(block.parent) if block.parent is not None else None
            self._remove(block)
            if parent is None:
                return
            block = parent

    # -- views -------------------------------------------------------------------------------

    def _check_lease(self, lease: Lease) -> None:
        if lease.released or self._leases.get(lease.lease_id) is not lease:
            raise RuntimeError(f"lease {lease.lease_id} is not active")

    def stats(self) -> StoreStats:
        with self._lock:
            used = self.pool.num_used
            return StoreStats(
                num_blocks=self.pool.num_blocks,
                block_size=self.block_size,
                used_blocks=used,
                free_blocks=self.pool.num_free,
                pinned_blocks=self._pinned,
                private_blocks=self._private,
                cached_blocks=len(self._index) - self._pinned,
                held_blocks=self._pinned + self._private,
                usage=used / self.pool.num_blocks,
                leases=len(self._leases),
                hit_tokens_total=self._hit_tokens,
                query_tokens_total=self._query_tokens,
                inserted_blocks_total=self._inserted,
                evicted_blocks_total=self._evicted,
                collisions_total=self._collisions,
                capacity_bytes=self.pool.capacity_bytes,
                used_bytes=used * self.pool.block_bytes,
            )

    def cached_hashes(self) -> set[BlockHash]:
        with self._lock:
            return {h for h, b in self._index.items() if not b.retired}

    def pinned_hashes(self) -> set[BlockHash]:
        with self._lock:
            return {h for h, b in self._index.items() if b.refs > 0}

    def block_id_of(self, h: BlockHash) -> int | None:
        with self._lock:
            b = self._index.get(h)
            return None if b is None else b.block_id

    def check_valid(self) -> None:
        """Assert every invariant: refcounts, private blocks, free list, parent links, epochs,
        the LRU heap and byte accounting."""
        with self._lock:
            self.pool.check_valid()
            indexed = [b.block_id for b in self._index.values()]
            private = [b for lease in self._leases.values() for b in lease.private]
            held = indexed + private
            assert len(held) == len(
                set(held)), "a pool block is indexed twice, private twice, or both"
            assert len(
                held) == self.pool.num_used, "indexed + private blocks and used pool slots differ"
            assert all(
                not self.pool._is_free[i] for i in held), "a held block sits on the free list"
            assert len(private) == self._private, "private block count drifted"
            refs: dict[BlockHash, int] = {}
            for lease in self._leases.values():
                assert not lease.released, "a released lease is still active"
                assert len(set(lease.pinned)) == len(lease.pinned), "a lease pins a block twice"
                assert len(lease.table) >= len(
                    lease.pinned), "a lease's table lost its pinned blocks"
                parent = None
                for i, h in enumerate(lease.pinned):
                    assert h in self._index, "a lease pins a block not in the index"
                    block = self._index[h]
                    assert block.block_id == lease.table[i], "a table entry is not its pinned block"
                    assert block.parent == parent, "a lease's pinned blocks are not one chain"
                    parent = h
                    refs[h] = refs.get(h, 0) + 1
            children: dict[BlockHash, int] = {}
            pinned = 0
            for h, b in self._index.items():
                assert b.block_hash == h, "index key and block hash differ"
                assert b.refs == refs.get(h, 0), f"refcount {b.refs} != pins {refs.get(h, 0)}"
                pinned += b.refs > 0
                assert len(b.tokens) == self.block_size, "a block holds a partial block of tokens"
                if b.parent is not None:
                    assert b.parent in self._index, "a block's parent is missing"
                    parent_block = self._index[b.parent]
                    assert parent_block.refs >= b.refs, "a pinned block's parent is pinned less"
                    assert parent_block.epoch == b.epoch, "a chain crosses epochs"
                    children[b.parent] = children.get(b.parent, 0) + 1
                if b.retired:
                    assert b.refs > 0 or b.children > 0, "a retired unpinned leaf was not freed"
                if b.epoch in self._retired_epochs:
                    assert b.retired, "a block of a dropped epoch is still matchable"
            assert pinned == self._pinned, "pinned block count drifted"
            for h, b in self._index.items():
                assert b.children == children.get(h, 0), "child count drifted"
            assert self.pool.num_used * self.pool.block_bytes <= self.pool.capacity_bytes, (
                "bytes over budget")
            heap = set(self._heap)
            for h, b in self._index.items():
                if b.refs == 0 and b.children == 0 and not b.retired:
                    assert (b.stamp, h) in heap, "an evictable leaf is missing from the LRU heap"
