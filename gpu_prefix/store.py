"""The prefix KV store: an index of chained blocks over a ``KVPool``, with pins, LRU eviction of
unpinned leaves, epochs, and admission control.

Accounting, in blocks of the pool:

- ``limit = floor(high_watermark * num_blocks)``. Each admitted request (a ``Lease``) reserves the
  blocks of its prompt (capped at ``limit``) and may pin at most that many. Admission keeps the
  sum of reservations at or under ``limit``, so pinned blocks never exceed it and at least
  ``num_blocks - limit`` blocks are always free or evictable: inserting never needs a pinned
  block, and eviction never fails for a request that was admitted.
- Requests that do not fit wait in a bounded FIFO queue; past the bound, or past their wait
  timeout, they are refused with ``AdmissionRefusedError`` (retryable).
- Unpinned blocks are a cache: they may fill the whole pool and are evicted on demand, leaves
  first, least recently used first.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keying import BlockHash

from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError, PoolExhaustedError
from gpu_prefix.pool import KVPool

#: One element of a block chain: ``(hash, token ids, extra keys)``; ``extra_keys[0]`` is the
#: model epoch. ``gpu_prefix.hashing.block_hashes`` builds these.
ChainItem = tuple[BlockHash, tuple[int, ...], tuple[object, ...]]


class _Block:
    __slots__ = (
        "block_id", "block_hash", "parent", "tokens", "extra", "epoch", "refs", "children", "stamp", "retired", "ready"
    )

    def __init__(self, block_id: int, item: ChainItem, parent: BlockHash | None, stamp: int) -> None:
        self.block_id = block_id
        self.block_hash, self.tokens, self.extra = item
        self.parent = parent
        self.epoch = item[2][0] if item[2] else None
        self.refs = 0
        self.children = 0
        self.stamp = stamp
        self.retired = False
        # NOTE: a block is indexed before its KV is copied in (outside the lock); until its
        # writer commits, no other request may match it, or it would read unwritten memory.
        self.ready = False


@dataclass(frozen=True, kw_only=True, slots=True)
class MatchResult:
    """The cached prefix of a request: pool block ids in order, and how many tokens they hold."""

    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class InsertResult:
    """Blocks stored for a request, in chain order; ``fresh[i]`` says the caller must fill
    ``block_ids[i]`` (False: another request stored the same block first)."""

    block_ids: tuple[int, ...]
    fresh: tuple[bool, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreStats:
    """Gauges and counters of the store (exported as Prometheus metrics by the service)."""

    num_blocks: int
    block_size: int
    used_blocks: int
    pinned_blocks: int
    reserved_blocks: int
    limit_blocks: int
    usage: float
    running: int
    queued: int
    admitted_total: int
    refused_total: int
    hit_tokens_total: int
    query_tokens_total: int
    inserted_blocks_total: int
    evicted_blocks_total: int
    collisions_total: int
    capacity_bytes: int
    used_bytes: int


class Lease:
    """One request's admission: its reservation and the blocks it pins. Release exactly once."""

    __slots__ = ("lease_id", "reserved", "pinned", "released")

    def __init__(self, lease_id: int, reserved: int) -> None:
        self.lease_id = lease_id
        self.reserved = reserved
        self.pinned: list[BlockHash] = []
        self.released = False

    @property
    def room(self) -> int:
        return self.reserved - len(self.pinned)


class PrefixStore:
    """Thread-safe block index over a pool. Tensor copies happen outside its lock, on blocks the
    caller's lease pins (a pinned block is never freed or reused)."""

    def __init__(
        self,
        pool: KVPool,
        *,
        high_watermark: float = 0.8,
        max_queue: int = 64,
        max_running: int = 8,
        queue_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 < high_watermark <= 1.0:
            raise InvalidParamsError("high_watermark", f"must be in (0, 1], got {high_watermark}", "use 0.8")
        if max_queue < 0 or max_running < 1:
            raise InvalidParamsError("max_queue/max_running", "max_queue >= 0 and max_running >= 1", "use 64 and 8")
        self.pool = pool
        self.block_size = pool.block_size
        self.high_watermark = high_watermark
        self.limit = max(1, int(high_watermark * pool.num_blocks))
        self.max_queue = max_queue
        self.max_running = max_running
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._index: dict[BlockHash, _Block] = {}
        self._heap: list[tuple[int, BlockHash]] = []
        self._tick = itertools.count(1)
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, Lease] = {}
        self._reserved = 0
        self._waiting: deque[int] = deque()
        self._retired_epochs: set[object] = set()
        self._admitted = self._refused = self._hit_tokens = self._query_tokens = 0
        self._inserted = self._evicted = self._collisions = 0

    # -- admission ---------------------------------------------------------------------------

    def acquire(self, prompt_tokens: int, *, timeout: float | None = None) -> Lease:
        """Admit a request whose prompt has ``prompt_tokens`` tokens, waiting in the queue if the
        pool is above its high watermark. Raises ``AdmissionRefusedError`` (retryable) when the
        queue is full or the wait times out."""
        need = min(max(0, prompt_tokens) // self.block_size, self.limit)
        wait_s = self.queue_timeout_s if timeout is None else timeout
        with self._cond:
            if not self._waiting and self._fits(need):
                return self._admit(need)
            if len(self._waiting) >= self.max_queue:
                self._refused += 1
                raise AdmissionRefusedError(
                    f"KV pool above its high watermark ({self._reserved}/{self.limit} blocks reserved, "
                    f"{len(self._leases)} running) and the wait queue is full ({self.max_queue}); retry later",
                    retry_after_s=1.0,
                )
            ticket = next(self._lease_ids)
            self._waiting.append(ticket)
            deadline = self._clock() + wait_s
            try:
                while not (self._waiting[0] == ticket and self._fits(need)):
                    left = deadline - self._clock()
                    if left <= 0:
                        self._refused += 1
                        raise AdmissionRefusedError(
                            f"waited {wait_s:.1f} s for KV pool room ({need} blocks) without getting it; retry later",
                            retry_after_s=1.0,
                        )
                    self._cond.wait(timeout=left)
                return self._admit(need)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def _fits(self, need: int) -> bool:
        return len(self._leases) < self.max_running and self._reserved + need <= self.limit

    def _admit(self, need: int) -> Lease:
        lease = Lease(next(self._lease_ids), need)
        self._leases[lease.lease_id] = lease
        self._reserved += need
        self._admitted += 1
        return lease

    def release(self, lease: Lease) -> None:
        """Unpin the lease's blocks and return its reservation; wakes queued requests."""
        with self._cond:
            if lease.released:
                raise RuntimeError(f"lease {lease.lease_id} released twice")
            lease.released = True
            # Children before parents, so a retired parent is freed after its last child.
            for h in reversed(lease.pinned):
                block = self._index[h]
                block.refs -= 1
                if block.refs == 0:
                    if not block.ready and block.children == 0:
                        self._remove(block)  # inserted but never filled: nobody may use it
                    elif block.retired:
                        self._free_retired_chain(block)
                    elif block.children == 0:
                        heapq.heappush(self._heap, (block.stamp, h))
            lease.pinned.clear()
            self._reserved -= lease.reserved
            del self._leases[lease.lease_id]
            self._cond.notify_all()

    # -- matching and inserting --------------------------------------------------------------

    def match(self, lease: Lease, chain: Sequence[ChainItem]) -> MatchResult:
        """Pin and return the longest cached prefix of ``chain`` (at most the lease's room).

        Every block is verified against the request: stored token ids, parent link and extra
        keys must be equal, so a hash collision ends the match instead of returning other KV.
        """
        with self._cond:
            self._check_lease(lease)
            ids: list[int] = []
            parent: BlockHash | None = None
            for item in chain[: lease.room]:
                block = self._index.get(item[0])
                if block is None or block.retired or not block.ready:
                    break
                if block.tokens != item[1] or block.parent != parent or block.extra != item[2]:
                    self._collisions += 1
                    break
                block.refs += 1
                block.stamp = next(self._tick)
                lease.pinned.append(item[0])
                ids.append(block.block_id)
                parent = item[0]
            self._query_tokens += len(chain) * self.block_size
            self._hit_tokens += len(ids) * self.block_size
            return MatchResult(block_ids=tuple(ids), num_tokens=len(ids) * self.block_size)

    def insert(self, lease: Lease, chain: Sequence[ChainItem], start: int) -> InsertResult:
        """Store ``chain[start:]`` after the ``start`` blocks this lease matched (or inserted);
        returns the stored blocks' pool ids, pinned by the lease; the caller fills the fresh ones.

        Stops early, storing a shorter prefix, at the lease's reservation, at a hash already
        held by a different block (a collision: not cached), or at a retired epoch.
        """
        ids: list[int] = []
        fresh: list[bool] = []
        with self._cond:
            self._check_lease(lease)
            parent = chain[start - 1][0] if start > 0 else None
            if parent is not None and parent not in lease.pinned:
                raise RuntimeError("insert must continue a chain this lease pinned")
            for item in chain[start:]:
                if lease.room <= 0:
                    break
                h, tokens, extra = item
                if extra and extra[0] in self._retired_epochs:
                    break
                existing = self._index.get(h)
                if existing is not None:
                    if existing.retired or not existing.ready:
                        break
                    if existing.tokens != tokens or existing.parent != parent or existing.extra != extra:
                        self._collisions += 1
                        break
                    # Another request stored it meanwhile: share it.
                    existing.refs += 1
                    existing.stamp = next(self._tick)
                    lease.pinned.append(h)
                    parent = h
                    ids.append(existing.block_id)
                    fresh.append(False)
                    continue
                try:
                    block_id = self._allocate()
                except PoolExhaustedError:
                    break
                block = _Block(block_id, item, parent, next(self._tick))
                block.refs = 1
                self._index[h] = block
                if parent is not None:
                    self._index[parent].children += 1
                lease.pinned.append(h)
                self._inserted += 1
                ids.append(block_id)
                fresh.append(True)
                parent = h
        return InsertResult(block_ids=tuple(ids), fresh=tuple(fresh))

    def commit(self, lease: Lease) -> None:
        """Mark the lease's blocks filled: from now on other requests may match them."""
        with self._cond:
            self._check_lease(lease)
            for h in lease.pinned:
                self._index[h].ready = True

    def _allocate(self) -> int:
        if self.pool.num_free == 0:
            self._evict_one()
        return self.pool.allocate()

    def _evict_one(self) -> None:
        while self._heap:
            stamp, h = heapq.heappop(self._heap)
            block = self._index.get(h)
            if block is None or block.stamp != stamp or block.refs or block.children or block.retired:
                continue  # stale entry
            self._remove(block)
            self._evicted += 1
            return
        raise PoolExhaustedError(
            f"all {self.pool.num_blocks} KV blocks are pinned or interior; admission should prevent this"
        )

    def _remove(self, block: _Block) -> None:
        del self._index[block.block_hash]
        self.pool.free(block.block_id)
        if block.parent is not None:
            parent = self._index[block.parent]
            parent.children -= 1
            if parent.children == 0 and parent.refs == 0 and not parent.retired and parent.ready:
                heapq.heappush(self._heap, (parent.stamp, block.parent))
        if len(self._heap) > 4 * self.pool.num_blocks + 64:
            self._heap = [(s, h) for s, h in self._heap if h in self._index and self._index[h].stamp == s]
            heapq.heapify(self._heap)

    def evict(self, n_blocks: int) -> int:
        """Evict up to ``n_blocks`` unpinned leaves, least recently used first; returns how many."""
        done = 0
        with self._cond:
            while done < n_blocks:
                try:
                    self._evict_one()
                except PoolExhaustedError:
                    break
                done += 1
        return done

    # -- epochs -----------------------------------------------------------------------------

    def drop_epoch(self, epoch: object) -> int:
        """Drop every block of ``epoch`` now, except pinned ones, which go when their last request
        releases them. Later inserts of that epoch are refused. Returns the blocks freed now."""
        with self._cond:
            self._retired_epochs.add(epoch)
            doomed = [b for b in self._index.values() if b.epoch == epoch]
            for b in doomed:
                b.retired = True
            freed = 0
            # Deepest first: a block's children are freed before it.
            for b in sorted(doomed, key=self._depth, reverse=True):
                if b.refs == 0 and b.children == 0 and b.block_hash in self._index:
                    self._remove(b)
                    freed += 1
            return freed

    def drop_epochs_except(self, keep: object) -> int:
        """Drop every epoch but ``keep`` (a rollout to ``keep``)."""
        with self._cond:
            epochs = {b.epoch for b in self._index.values()} - {keep}
            return sum(self.drop_epoch(e) for e in epochs)

    def _depth(self, block: _Block) -> int:
        d = 0
        while block.parent is not None:
            block = self._index[block.parent]
            d += 1
        return d

    def _free_retired_chain(self, block: _Block) -> None:
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
        with self._cond:
            pinned = sum(1 for b in self._index.values() if b.refs > 0)
            used = self.pool.num_used
            return StoreStats(
                num_blocks=self.pool.num_blocks,
                block_size=self.block_size,
                used_blocks=used,
                pinned_blocks=pinned,
                reserved_blocks=self._reserved,
                limit_blocks=self.limit,
                usage=used / self.pool.num_blocks,
                running=len(self._leases),
                queued=len(self._waiting),
                admitted_total=self._admitted,
                refused_total=self._refused,
                hit_tokens_total=self._hit_tokens,
                query_tokens_total=self._query_tokens,
                inserted_blocks_total=self._inserted,
                evicted_blocks_total=self._evicted,
                collisions_total=self._collisions,
                capacity_bytes=self.pool.capacity_bytes,
                used_bytes=used * self.pool.block_bytes,
            )

    def cached_hashes(self) -> set[BlockHash]:
        with self._cond:
            return {h for h, b in self._index.items() if not b.retired}

    def pinned_hashes(self) -> set[BlockHash]:
        with self._cond:
            return {h for h, b in self._index.items() if b.refs > 0}

    def block_id_of(self, h: BlockHash) -> int | None:
        with self._cond:
            b = self._index.get(h)
            return None if b is None else b.block_id

    def check_valid(self) -> None:
        """Assert every invariant: refcounts, free list, parent links, byte accounting."""
        with self._cond:
            self.pool.check_valid()
            ids = [b.block_id for b in self._index.values()]
            assert len(ids) == len(set(ids)), "two blocks share a pool slot"
            assert len(ids) == self.pool.num_used, "indexed blocks and used pool slots differ"
            assert all(not self.pool._is_free[i] for i in ids), "an indexed block sits on the free list"
            refs: dict[BlockHash, int] = {}
            for lease in self._leases.values():
                assert not lease.released, "a released lease is still active"
                assert len(lease.pinned) <= lease.reserved, "a lease pins more than it reserved"
                assert len(set(lease.pinned)) == len(lease.pinned), "a lease pins a block twice"
                for h in lease.pinned:
                    refs[h] = refs.get(h, 0) + 1
            children: dict[BlockHash, int] = {}
            for h, b in self._index.items():
                assert b.block_hash == h, "index key and block hash differ"
                assert b.refs == refs.get(h, 0), f"refcount {b.refs} != pins {refs.get(h, 0)}"
                assert len(b.tokens) == self.block_size, "a block holds a partial block of tokens"
                if b.parent is not None:
                    assert b.parent in self._index, "a block's parent is missing"
                    parent = self._index[b.parent]
                    assert parent.refs >= b.refs, "a pinned block's parent is pinned less"
                    assert parent.epoch == b.epoch, "a chain crosses epochs"
                    children[b.parent] = children.get(b.parent, 0) + 1
                if b.retired:
                    assert b.refs > 0 or b.children > 0, "a retired unpinned leaf was not freed"
                if not b.ready:
                    assert b.refs > 0, "an unfilled block outlived its writer"
                if b.epoch in self._retired_epochs:
                    assert b.retired, "a block of a dropped epoch is still matchable"
            for h, b in self._index.items():
                assert b.children == children.get(h, 0), "child count drifted"
            assert all(h in self._index for h in refs), "a lease pins a block not in the index"
            assert self._reserved == sum(l.reserved for l in self._leases.values()), "reservations drifted"
            assert self._reserved <= self.limit, "reservations exceed the high watermark"
            assert sum(1 for b in self._index.values() if b.refs > 0) <= self.limit, "pins exceed the limit"
            assert len(self._leases) <= self.max_running, "more requests running than allowed"
            assert len(self._waiting) <= self.max_queue, "queue longer than its bound"
            assert self.pool.num_used * self.pool.block_bytes <= self.pool.capacity_bytes, "bytes over budget"
            heap = set(self._heap)
            for h, b in self._index.items():
                if b.refs == 0 and b.children == 0 and not b.retired and b.ready:
                    assert (b.stamp, h) in heap, "an evictable leaf is missing from the LRU heap"
