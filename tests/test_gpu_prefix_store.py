"""The prefix store: matching, verification, pinning, private blocks, eviction, epochs (unit and
stateful tests against a plain model)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from gpu_prefix.errors import InvalidParamsError
from gpu_prefix.hashing import PUBLIC_SALT, BlockKeys, block_hashes, extend_chain, scope_salt
from gpu_prefix.pool import KVPool, KVShape
from keying import xxh3_128
from tests.support.prefix_store import BS, SHAPE, chain_of, fill, make_store, store_prompt


class TestBlockHashing:
    def test_hashes_chain_so_equal_blocks_after_different_prefixes_differ(self):
        a = chain_of([1, 2, 3, 4])
        b = chain_of([9, 9, 3, 4])
        assert a[1][1] == b[1][1] and a[1][0] != b[1][0]

    def test_epoch_adapter_and_salt_each_change_every_hash(self):
        base = chain_of([1, 2, 3, 4])
        assert chain_of([1, 2, 3, 4], epoch=2)[0][0] != base[0][0]
        assert chain_of([1, 2, 3, 4], salt=b"b")[0][0] != base[0][0]
        other_adapter = block_hashes([1, 2], BlockKeys(model_epoch=1, adapter="lora", salt=b"a"),
                                     block_size=BS)
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

    def test_views_are_the_pool_itself_one_per_run_of_consecutive_blocks(self):
        pool = KVPool(KVShape(num_layers=2, kv_heads=2, head_dim=3), budget_bytes=10**6,
                      block_size=4)
        views = pool.view([5, 6, 2])
        assert [v.shape[3] for v in views] == [8, 4]
        views[0].fill_(7.0)
        assert bool((pool.tensor[:, :, :, 20:28, :] == 7.0).all())  # written through: no copy
        assert views[1].data_ptr() == pool.tensor[:, :, :, 8:12, :].data_ptr()

    def test_allocation_extends_a_run_when_the_next_block_is_free(self):
        pool = KVPool(SHAPE, budget_bytes=10 * SHAPE.bytes_per_token() * BS, block_size=BS)
        first = [pool.allocate() for _ in range(4)]
        assert first == [0, 1, 2, 3]  # a fresh pool hands out consecutive blocks, lowest first
        pool.free(1)
        assert pool.allocate(after=3) == 4  # 4 follows 3 and is free
        assert pool.allocate() == 1  # otherwise the lowest free block
        assert pool.allocate(after=9) == 5  # past the end: the lowest free block
        pool.check_valid()

    def test_a_block_freed_twice_is_an_error(self):
        pool = KVPool(SHAPE, budget_bytes=4 * SHAPE.bytes_per_token() * BS, block_size=BS)
        b = pool.allocate()
        pool.free(b)
        with pytest.raises(RuntimeError, match="freed twice"):
            pool.free(b)

    def test_extend_chain_hashes_only_new_blocks_and_matches_block_hashes(self):
        keys = BlockKeys(model_epoch=1, salt=b"a")
        tokens = [1, 2, 3, 4, 5, 6, 7]
        chain = extend_chain([], tokens[:4], keys, block_size=BS, upto=1)
        first = chain[0]
        extend_chain(chain, tokens, keys, block_size=BS, upto=3)
        assert chain[0] is first and chain == block_hashes(tokens, keys, block_size=BS)
        with pytest.raises(InvalidParamsError, match="upto"):
            extend_chain(chain, tokens, keys, block_size=BS, upto=4)


class TestMatch:
    def test_a_stored_prefix_is_matched_block_by_block(self):
        store = make_store()
        store_prompt(store, [1, 2, 3, 4, 5])
        lease = store.open()
        m = store.match(lease, chain_of([1, 2, 3, 9]))
        assert m.num_tokens == 2 and len(m.block_ids) == 1
        store.release(lease)
        store.check_valid()

    def test_a_match_continues_the_chain_a_lease_already_holds(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4, 5, 6])
        lease = store.open()
        assert store.match(lease, chain[:1]).num_tokens == 2
        more = store.match(lease, chain)
        assert more.num_tokens == 4 and len(lease.pinned) == 3
        assert lease.table == [store.block_id_of(h) for h, _, _ in chain]
        store.release(lease)
        store.check_valid()

    def test_a_hash_collision_is_a_miss_never_another_prefix(self):
        def weak(b: bytes) -> bytes:
            return b"\x00"  # every block collides
        store = make_store()
        store_prompt(store, [1, 2], hash_fn=weak)
        lease = store.open()
        assert store.match(lease, chain_of([7, 7], hash_fn=weak)).num_tokens == 0
        store.release(lease)
        assert store.stats().collisions_total == 1
        store.check_valid()

    def test_a_colliding_first_block_from_another_salt_is_not_matched(self):
        def weak(b: bytes) -> bytes:
            return b"\x00"
        store = make_store()
        store_prompt(store, [1, 2], hash_fn=weak, salt=b"tenant-a")
        lease = store.open()
        assert store.match(lease, chain_of([1, 2], hash_fn=weak, salt=b"tenant-b")).num_tokens == 0
        store.release(lease)

    def test_a_lease_that_shares_nothing_never_matches_nor_indexes(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        lease = store.open(indexing=False)
        assert store.match(lease, chain).num_tokens == 0
        assert store.allocate(lease) is not None
        assert store.adopt(lease, chain[0]) is False
        assert lease.pinned == [] and len(lease.private) == 1
        store.release(lease)
        assert store.stats().inserted_blocks_total == 2
        store.check_valid()


class TestPrivateBlocks:
    def test_a_block_is_matchable_only_once_its_writer_adopts_it(self):
        store = make_store()
        chain = chain_of([1, 2, 3, 4])
        writer = store.open()
        store.allocate(writer)
        store.allocate(writer)
        reader = store.open()
        assert store.match(reader, chain).num_tokens == 0  # written but not indexed yet
        store.release(reader)
        assert store.adopt(writer, chain[0]) and store.adopt(writer, chain[1])
        reader = store.open()
        assert store.match(reader, chain).num_tokens == 4
        assert reader.table == writer.table  # shared, not copied
        store.release(reader)
        store.release(writer)
        store.check_valid()

    def test_private_blocks_are_freed_when_their_holder_ends(self):
        store = make_store()
        writer = store.open()
        store.allocate(writer)
        store.allocate(writer)
        store.release(writer)  # e.g. the request was cancelled or preempted
        assert store.pool.num_used == 0
        store.check_valid()

    def test_an_indexed_block_already_stored_by_another_request_keeps_the_rest_private(self):
        store = make_store()
        chain = chain_of([1, 2, 3, 4])
        a, b = store.open(), store.open()
        for lease in (a, b):
            store.allocate(lease)
            store.allocate(lease)
        assert store.adopt(a, chain[0])
        assert store.adopt(b, chain[0]) is False  # the same block, stored first by a
        assert store.adopt(b, chain[1]) is False and not b.indexing
        assert store.stats().collisions_total == 0  # equal content is no collision
        assert len(b.private) == 2 and store.block_id_of(chain[0][0]) == a.table[0]
        store.release(b)
        store.release(a)
        store.check_valid()

    def test_a_colliding_hash_is_never_indexed_over_another_block(self):
        def weak(b: bytes) -> bytes:
            return b"\x00"
        store = make_store()
        store_prompt(store, [1, 2], hash_fn=weak)
        lease = store.open()
        store.allocate(lease)
        assert store.adopt(lease, chain_of([7, 7], hash_fn=weak)[0]) is False
        assert store.stats().collisions_total == 1
        store.release(lease)
        store.check_valid()

    def test_allocation_fails_only_when_every_block_is_held(self):
        store = make_store(blocks=4)
        store_prompt(store, [1, 1, 2, 2])  # two cached blocks: evictable
        lease = store.open()
        got = [store.allocate(lease) for _ in range(4)]
        assert None not in got and store.stats().evicted_blocks_total == 2
        assert store.allocate(lease) is None  # all four private now: nothing to take
        assert store.held_blocks() == 4
        store.release(lease)
        store.check_valid()


class TestEviction:
    def test_unpinned_leaves_go_least_recently_used_first(self):
        store = make_store(blocks=4)
        store_prompt(store, [1, 1, 2, 2])  # two blocks
        store_prompt(store, [3, 3])
        store_prompt(store, [4, 4])
        lease = store.open()
        store.match(lease, chain_of([3, 3]))  # touch [3,3]
        store.release(lease)
        store_prompt(store, [5, 5])  # pool full: evicts the LRU leaf, [1,1,2,2]'s tail
        cached = store.cached_hashes()
        assert chain_of([1, 1, 2, 2])[1][0] not in cached
        assert chain_of([1, 1])[0][0] in cached and chain_of([3, 3])[0][0] in cached
        store.check_valid()

    def test_pinned_and_private_blocks_survive_any_load(self):
        store = make_store(blocks=10)
        pinned_chain = chain_of([9, 9, 8, 8])
        lease = store.open()
        fill(store, lease, pinned_chain)
        store.allocate(lease)  # and a private block after them
        ids = list(lease.table)
        for i in range(200):
            other = store.open()
            chain = chain_of([i % 7, i % 5, i % 3, i, i + 1, i + 2])
            store.match(other, chain)
            for item in chain[len(other.table):]:
                if store.allocate(other) is None:
                    break
                store.adopt(other, item)
            store.release(other)
            store.evict(100)
        assert lease.table == ids
        assert [store.block_id_of(h) for h, _, _ in pinned_chain] == ids[:2]
        store.release(lease)
        store.check_valid()


class TestEpochs:
    def test_dropping_an_epoch_frees_unpinned_blocks_and_keeps_pinned_ones_until_release(self):
        store = make_store()
        store_prompt(store, [1, 1, 2, 2], epoch=1)
        pinned = chain_of([3, 3, 4, 4], epoch=1)
        lease = store.open()
        fill(store, lease, pinned)
        store_prompt(store, [5, 5], epoch=2)
        freed = store.drop_epoch(1)
        assert freed == 2
        assert store.pool.num_used == 3
        probe = store.open()
        assert store.match(probe, pinned).num_tokens == 0  # retired: never matched again
        store.release(probe)
        store.check_valid()
        store.release(lease)
        assert store.pool.num_used == 1
        store.check_valid()

    def test_adoptions_of_a_dropped_epoch_are_refused(self):
        store = make_store()
        store.drop_epoch(1)
        store_prompt(store, [1, 1], epoch=1)
        assert store.pool.num_used == 0
        store.check_valid()


class TestCheckValid:
    def test_it_detects_a_refcount_that_drifted(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        store._index[chain[0][0]].refs = 1  # a pin nobody holds
        with pytest.raises(AssertionError, match="refcount"):
            store.check_valid()

    def test_it_detects_a_held_block_on_the_free_list(self):
        store = make_store()
        lease = store.open()
        b = store.allocate(lease)
        store.pool._is_free[b] = True
        store.pool._num_free += 1
        with pytest.raises(AssertionError):
            store.check_valid()

    def test_it_detects_a_chain_that_crosses_epochs(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        store._index[chain[1][0]].epoch = 2
        with pytest.raises(AssertionError, match="epochs"):
            store.check_valid()


# -- stateful test against a plain model ------------------------------------------------------

TOKENS = st.lists(st.integers(0, 2), min_size=0, max_size=10)


class StoreMachine(RuleBasedStateMachine):
    """Drives a small store and a plain model of what must hold side by side.

    The pool tensor carries, in every slot of a block, a number naming the exact prefix (epoch,
    salt, tokens) it was written for; a match must only ever return blocks whose number is the
    requested prefix's, and a held block's number must never change.
    """

    hash_fn = staticmethod(xxh3_128)
    strong = True
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.store = make_store(blocks=8)
        self.identity: dict[tuple, float] = {}
        self.live: dict[int, tuple] = {}  # lease id -> (lease, epoch, salt, tokens)
        self.dropped: set[int] = set()

    def ident(self, epoch, salt, tokens) -> float:
        key = (epoch, salt, tuple(tokens))
        return self.identity.setdefault(key, float(len(self.identity) + 1))

    def content(self, block_id: int) -> float:
        t = self.store.pool.tensor
        vals = t[0, :, 0, block_id * BS : (block_id + 1) * BS, 0]
        assert bool((vals == vals[0, 0]).all()), "a block's slots disagree"
        return float(vals[0, 0])

    @rule(target=leases, tokens=TOKENS, epoch=st.sampled_from([1, 2]),
          salt=st.sampled_from([b"a", b"b"]),
          private=st.booleans())
    def request(self, tokens, epoch, salt, private):
        chain = chain_of(tokens, epoch=epoch, salt=salt, hash_fn=self.hash_fn)
        lease = self.store.open(indexing=not private)
        m = self.store.match(lease, chain)
        for i, b in enumerate(m.block_ids):
            assert self.content(b) == self.ident(
                epoch, salt, tokens[: (i + 1) * BS]), "matched someone else's KV"
        assert epoch not in self.dropped or m.num_tokens == 0, "matched a dropped epoch"
        if self.strong and not private:
            # Every block of this chain pinned by a live lease must be found.
            pinned = self.store.pinned_hashes()
            expect = 0
            for h, _, _ in chain:
                if h in pinned and epoch not in self.dropped:
                    expect += 1
                else:
                    break
            assert len(m.block_ids) >= expect, "a pinned prefix was not matched"
        for j in range(len(lease.table), len(chain)):
            held = self.store.held_blocks()
            b = self.store.allocate(lease)
            if b is None:
                assert held == self.store.pool.num_blocks, (
                    "allocation failed with a block free or evictable")
                break
            self.store.pool.tensor[:, :, :, b * BS : (b + 1) * BS, :] = self.ident(
                epoch, salt, tokens[: (j + 1) * BS])
            self.store.adopt(lease, chain[j])
        self.live[lease.lease_id] = (lease, epoch, salt, tokens)
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease):
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
    def held_blocks_keep_their_kv(self):
        for lease, epoch, salt, tokens in self.live.values():
            for i, b in enumerate(lease.table):
                assert self.content(b) == self.ident(
                    epoch, salt, tokens[: (i + 1) * BS]), "a held block changed"
            for i, h in enumerate(lease.pinned):
                assert self.store.block_id_of(h) == lease.table[i], "a pinned block was evicted"

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
TestWeakHashStoreStateful.settings = settings(max_examples=150, stateful_step_count=40,
                                              deadline=None)
