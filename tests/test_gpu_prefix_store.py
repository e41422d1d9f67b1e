"""The prefix store: matching, verification, pinning, eviction, epochs, admission (unit and
stateful tests against a plain model)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError
from gpu_prefix.hashing import PUBLIC_SALT, BlockKeys, block_hashes, scope_salt
from gpu_prefix.pool import KVPool, KVShape
from gpu_prefix.store import PrefixStore
from keying import xxh3_128

SHAPE = KVShape(num_layers=1, kv_heads=1, head_dim=1)
BS = 2


def make_store(blocks: int = 8, **kwargs) -> PrefixStore:
    pool = KVPool(SHAPE, budget_bytes=blocks * SHAPE.bytes_per_token() * BS, block_size=BS)
    return PrefixStore(pool, **kwargs)


def chain_of(tokens, *, epoch=1, salt=b"a", hash_fn=xxh3_128, public_tokens=0):
    keys = BlockKeys(model_epoch=epoch, salt=salt, public_tokens=public_tokens)
    return block_hashes(tokens, keys, block_size=BS, hash_fn=hash_fn)


def store_prompt(store: PrefixStore, tokens, **kw):
    """Admit, match, insert, release: leaves the prompt's blocks cached."""
    chain = chain_of(tokens, **kw)
    lease = store.acquire(len(tokens), timeout=0)
    m = store.match(lease, chain)
    store.insert(lease, chain, len(m.block_ids))
    store.commit(lease)
    store.release(lease)
    return chain


class TestBlockHashing:
    def test_hashes_chain_so_equal_blocks_after_different_prefixes_differ(self):
        a = chain_of([1, 2, 3, 4])
        b = chain_of([9, 9, 3, 4])
        assert a[1][1] == b[1][1] and a[1][0] != b[1][0]

    def test_epoch_adapter_and_salt_each_change_every_hash(self):
        base = chain_of([1, 2, 3, 4])
        assert chain_of([1, 2, 3, 4], epoch=2)[0][0] != base[0][0]
        assert chain_of([1, 2, 3, 4], salt=b"b")[0][0] != base[0][0]
        other_adapter = block_hashes([1, 2], BlockKeys(model_epoch=1, adapter="lora", salt=b"a"), block_size=BS)
        assert other_adapter[0][0] != base[0][0]

    def test_only_whole_blocks_are_hashed(self):
        assert len(chain_of([1, 2, 3])) == 1

    def test_public_tokens_use_the_public_salt_for_whole_blocks_only(self):
        chain = chain_of([1, 2, 3, 4, 5, 6], public_tokens=3)
        assert [c[2][2] for c in chain] == [PUBLIC_SALT, b"a", b"a"]

    def test_scope_salt_is_per_tenant_and_keyed(self):
        assert scope_salt("t1") != scope_salt("t2")
        assert scope_salt("t1", secret=b"x") != scope_salt("t1", secret=b"y")
        with pytest.raises(InvalidParamsError, match="tenant"):
            scope_salt("")


class TestPool:
    def test_budget_smaller_than_one_block_is_refused_with_the_size_needed(self):
        with pytest.raises(InvalidParamsError, match="at least 16 bytes"):
            KVPool(SHAPE, budget_bytes=4, block_size=BS)

    def test_pool_is_sized_from_the_budget_and_never_grows(self):
        pool = KVPool(SHAPE, budget_bytes=100, block_size=BS)
        assert pool.num_blocks == 6 and pool.capacity_bytes <= 100
        for _ in range(6):
            pool.allocate()
        with pytest.raises(MemoryError):
            pool.allocate()
        pool.check_valid()

    def test_read_and_write_move_whole_blocks_in_runs(self):
        pool = KVPool(KVShape(num_layers=2, kv_heads=2, head_dim=3), budget_bytes=10**6, block_size=4)
        src = torch.randn(2, 2, 2, 12, 3)
        pool.write([5, 6, 2], src, 0)
        dst = torch.zeros(2, 2, 2, 12, 3)
        pool.read([5, 6, 2], dst, 0)
        assert torch.equal(dst, src)


class TestMatch:
    def test_a_stored_prefix_is_matched_block_by_block(self):
        store = make_store()
        store_prompt(store, [1, 2, 3, 4, 5])
        lease = store.acquire(8, timeout=0)
        m = store.match(lease, chain_of([1, 2, 3, 9]))
        assert m.num_tokens == 2 and len(m.block_ids) == 1
        store.release(lease)
        store.check_valid()

    def test_a_hash_collision_is_a_miss_never_another_prefix(self):
        def weak(b: bytes) -> bytes:
            return b"\x00"  # every block collides
        store = make_store()
        store_prompt(store, [1, 2], hash_fn=weak)
        lease = store.acquire(2, timeout=0)
        assert store.match(lease, chain_of([7, 7], hash_fn=weak)).num_tokens == 0
        store.release(lease)
        assert store.stats().collisions_total == 1
        store.check_valid()

    def test_a_colliding_first_block_from_another_salt_is_not_matched(self):
        def weak(b: bytes) -> bytes:
            return b"\x00"
        store = make_store()
        store_prompt(store, [1, 2], hash_fn=weak, salt=b"tenant-a")
        lease = store.acquire(2, timeout=0)
        assert store.match(lease, chain_of([1, 2], hash_fn=weak, salt=b"tenant-b")).num_tokens == 0
        store.release(lease)


class TestFilling:
    def test_a_block_being_filled_is_not_matched_by_another_request(self):
        store = make_store()
        chain = chain_of([1, 2, 3, 4])
        writer = store.acquire(4, timeout=0)
        store.insert(writer, chain, 0)
        reader = store.acquire(4, timeout=0)
        assert store.match(reader, chain).num_tokens == 0
        store.release(reader)
        store.commit(writer)
        reader = store.acquire(4, timeout=0)
        assert store.match(reader, chain).num_tokens == 4
        store.release(reader)
        store.release(writer)
        store.check_valid()

    def test_blocks_never_filled_are_freed_when_their_writer_ends(self):
        store = make_store()
        writer = store.acquire(4, timeout=0)
        store.insert(writer, chain_of([1, 2, 3, 4]), 0)
        store.release(writer)  # e.g. the forward pass raised
        assert store.pool.num_used == 0
        store.check_valid()


class TestEviction:
    def test_unpinned_leaves_go_least_recently_used_first(self):
        store = make_store(blocks=4, high_watermark=1.0)
        store_prompt(store, [1, 1, 2, 2])  # two blocks
        store_prompt(store, [3, 3])
        store_prompt(store, [4, 4])
        lease = store.acquire(2, timeout=0)
        store.match(lease, chain_of([3, 3]))  # touch [3,3]
        store.release(lease)
        store_prompt(store, [5, 5])  # pool full: evicts the LRU leaf, [1,1,2,2]'s tail
        cached = store.cached_hashes()
        assert chain_of([1, 1, 2, 2])[1][0] not in cached
        assert chain_of([1, 1])[0][0] in cached and chain_of([3, 3])[0][0] in cached
        store.check_valid()

    def test_pinned_blocks_survive_any_load(self):
        store = make_store(blocks=10, high_watermark=0.5)
        pinned_chain = chain_of([9, 9, 8, 8])
        lease = store.acquire(4, timeout=0)
        store.insert(lease, pinned_chain, 0)
        store.commit(lease)
        ids = [store.block_id_of(h) for h, _, _ in pinned_chain]
        for i in range(200):
            store_prompt(store, [i % 7, i % 5, i % 3, i, i + 1, i + 2])
            store.evict(100)
        assert [store.block_id_of(h) for h, _, _ in pinned_chain] == ids
        store.release(lease)
        store.check_valid()


class TestEpochs:
    def test_dropping_an_epoch_frees_unpinned_blocks_and_keeps_pinned_ones_until_release(self):
        store = make_store()
        store_prompt(store, [1, 1, 2, 2], epoch=1)
        pinned = chain_of([3, 3, 4, 4], epoch=1)
        lease = store.acquire(4, timeout=0)
        store.insert(lease, pinned, 0)
        store.commit(lease)
        store_prompt(store, [5, 5], epoch=2)
        freed = store.drop_epoch(1)
        assert freed == 2
        assert store.pool.num_used == 3
        probe = store.acquire(4, timeout=0)
        assert store.match(probe, pinned).num_tokens == 0  # retired: never matched again
        store.release(probe)
        store.check_valid()
        store.release(lease)
        assert store.pool.num_used == 1
        store.check_valid()

    def test_inserts_of_a_dropped_epoch_are_refused(self):
        store = make_store()
        store.drop_epoch(1)
        store_prompt(store, [1, 1], epoch=1)
        assert store.pool.num_used == 0


class TestAdmission:
    def test_requests_past_the_high_watermark_queue_then_are_admitted_when_room_frees(self):
        store = make_store(blocks=10, high_watermark=0.8, max_queue=4)
        first = store.acquire(14, timeout=0)  # 7 of the 8 allowed blocks
        got = []
        t = threading.Thread(target=lambda: got.append(store.acquire(4, timeout=5)))
        t.start()
        deadline = time.monotonic() + 5
        while store.stats().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert store.stats().queued == 1 and not got
        store.release(first)
        t.join(5)
        assert got and store.stats().queued == 0
        store.release(got[0])
        store.check_valid()

    def test_a_full_queue_refuses_with_a_retryable_error(self):
        store = make_store(blocks=10, max_queue=0)
        lease = store.acquire(16, timeout=0)
        with pytest.raises(AdmissionRefusedError, match="retry") as info:
            store.acquire(2, timeout=0)
        assert info.value.retryable and info.value.retry_after_s > 0
        assert store.stats().refused_total == 1
        store.release(lease)

    def test_a_wait_that_times_out_is_refused(self):
        store = make_store(blocks=10, max_queue=2)
        lease = store.acquire(16, timeout=0)
        with pytest.raises(AdmissionRefusedError, match="waited"):
            store.acquire(2, timeout=0.05)
        store.release(lease)

    def test_a_prompt_larger_than_the_pool_is_admitted_with_a_capped_reservation(self):
        store = make_store(blocks=10)
        lease = store.acquire(1000, timeout=0)
        assert lease.reserved == store.limit
        chain = chain_of(list(range(100)))
        stored = store.insert(lease, chain, 0)
        assert len(stored.block_ids) == store.limit
        store.release(lease)
        store.check_valid()

    def test_max_running_bounds_requests_in_flight(self):
        store = make_store(blocks=10, max_running=1, max_queue=0)
        lease = store.acquire(0, timeout=0)
        with pytest.raises(AdmissionRefusedError):
            store.acquire(0, timeout=0)
        store.release(lease)


# -- stateful test against a plain model ------------------------------------------------------

TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=10)


class StoreMachine(RuleBasedStateMachine):
    """Drives a small store and a plain model of what must hold side by side.

    The pool tensor carries, in every slot of a block, a number naming the exact prefix (epoch,
    salt, tokens) it was written for; a match must only ever return blocks whose number is the
    requested prefix's, and a pinned block's number must never change.
    """

    hash_fn = staticmethod(xxh3_128)
    strong = True
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.store = make_store(blocks=8, high_watermark=0.75, max_queue=0, max_running=3)
        self.identity: dict[tuple, float] = {}
        self.live: dict[int, tuple] = {}  # lease id -> (lease, chain, matched+inserted count)
        self.dropped: set[int] = set()

    def ident(self, epoch, salt, tokens) -> float:
        key = (epoch, salt, tuple(tokens))
        return self.identity.setdefault(key, float(len(self.identity) + 1))

    def content(self, block_id: int) -> float:
        t = self.store.pool.tensor
        vals = t[0, :, 0, block_id * BS : (block_id + 1) * BS, 0]
        assert bool((vals == vals[0, 0]).all()), "a block's slots disagree"
        return float(vals[0, 0])

    @rule(target=leases, tokens=TOKENS, epoch=st.sampled_from([1, 2]), salt=st.sampled_from([b"a", b"b"]))
    def request(self, tokens, epoch, salt):
        chain = chain_of(tokens, epoch=epoch, salt=salt, hash_fn=self.hash_fn)
        s = self.store.stats()
        need = min(len(tokens) // BS, self.store.limit)
        fits = s.reserved_blocks + need <= self.store.limit and s.running < self.store.max_running
        try:
            lease = self.store.acquire(len(tokens), timeout=0)
        except AdmissionRefusedError:
            assert not fits, "refused although it fit under the watermark"
            return None
        assert fits, "admitted past the watermark"
        m = self.store.match(lease, chain)
        for i, b in enumerate(m.block_ids):
            assert self.content(b) == self.ident(epoch, salt, tokens[: (i + 1) * BS]), "matched someone else's KV"
        assert epoch not in self.dropped or m.num_tokens == 0, "matched a dropped epoch"
        if self.strong:
            # Every block of this chain pinned by a live lease must be found.
            pinned = self.store.pinned_hashes()
            expect = 0
            for h, _, _ in chain[: lease.reserved]:
                if h in pinned and epoch not in self.dropped:
                    expect += 1
                else:
                    break
            assert len(m.block_ids) >= expect, "a pinned prefix was not matched"
        ins = self.store.insert(lease, chain, len(m.block_ids))
        for i, (b, fresh) in enumerate(zip(ins.block_ids, ins.fresh, strict=True)):
            j = len(m.block_ids) + i
            val = self.ident(epoch, salt, tokens[: (j + 1) * BS])
            if fresh:
                self.store.pool.tensor[:, :, :, b * BS : (b + 1) * BS, :] = val
            assert self.content(b) == val
        self.store.commit(lease)
        self.live[lease.lease_id] = (lease, chain, len(m.block_ids) + len(ins.block_ids), epoch, salt, tokens)
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease):
        if lease is None:
            return
        self.store.release(lease)
        del self.live[lease.lease_id]

    @rule(n=st.integers(1, 8))
    def evict(self, n):
        self.store.evict(n)

    @rule(epoch=st.sampled_from([1, 2]))
    def drop_epoch(self, epoch):
        self.store.drop_epoch(epoch)
        self.dropped.add(epoch)

    @invariant()
    def valid(self):
        self.store.check_valid()

    @invariant()
    def pinned_blocks_keep_their_kv(self):
        for lease, chain, n, epoch, salt, tokens in self.live.values():
            for i, (h, _, _) in enumerate(chain[:n]):
                b = self.store.block_id_of(h)
                assert b is not None, "a pinned block was evicted"
                assert self.content(b) == self.ident(epoch, salt, tokens[: (i + 1) * BS])

    @invariant()
    def never_over_budget(self):
        assert self.store.pool.num_used <= self.store.pool.num_blocks


class WeakHashStoreMachine(StoreMachine):
    """The same machine with a one-byte hash: collisions everywhere, still never wrong KV."""

    hash_fn = staticmethod(lambda b: xxh3_128(b)[:1])
    strong = False


TestStoreStateful = StoreMachine.TestCase
TestStoreStateful.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestWeakHashStoreStateful = WeakHashStoreMachine.TestCase
TestWeakHashStoreStateful.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
