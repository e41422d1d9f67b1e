"""Edges of the prefix store and block hashing that the main suite does not reach: a block that
another request indexed first, a colliding hash at adopt and at match, the statistics' exact
figures, eviction order at the margins, epochs dropped under pins, ``check_valid()`` itself,
and each refusal of the hashing parameters.

Written from a mutation run (``make mutation``, README).
"""

from __future__ import annotations

import pytest

from gpu_prefix.errors import InvalidParamsError
from gpu_prefix.hashing import PUBLIC_SALT, BlockKeys, block_hashes, extend_chain, scope_salt
from keying import BlockHash, hash_block_tokens, xxh3_128
from tests.support.prefix_store import BS, chain_of, fill, make_store, store_prompt


class TestTwoRequestsFillingTheSameBlock:
    def test_the_second_keeps_its_block_private_and_shares_nothing(self):
        store = make_store()
        chain = chain_of([1, 2, 3, 4])
        first, second = store.open(), store.open()
        assert store.match(first, chain).num_tokens == 0
        assert store.match(second, chain).num_tokens == 0
        assert fill(store, first, chain) == [True, True]
        assert fill(store, second, chain[:1]) == [False]
        assert second.indexing is False
        assert second.private == second.table and len(second.private) == 1
        assert store.block_id_of(chain[0][0]) == first.table[0] != second.table[0]
        s = store.stats()
        assert (s.collisions_total, s.inserted_blocks_total, s.private_blocks) == (0, 2, 1)
        store.check_valid()
        # its chain broke: later blocks stay private too
        assert store.allocate(second) is not None
        assert store.adopt(second, chain[1]) is False
        store.release(second)
        store.release(first)
        store.check_valid()
        assert store.stats().used_blocks == 2

    def test_a_colliding_hash_at_adopt_is_counted_and_not_indexed(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        forged = (chain[0][0], (7, 7), chain[0][2])  # same hash, other tokens
        lease = store.open()
        assert store.allocate(lease) is not None
        assert store.adopt(lease, forged) is False
        assert store.stats().collisions_total == 1
        store.release(lease)
        store.check_valid()

    def test_each_colliding_hash_at_adopt_is_counted_one_differing_in_its_parent_too(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        # the second block's hash, tokens and extra keys, adopted as a root block
        for _ in range(2):
            lease = store.open()
            assert store.allocate(lease) is not None
            assert store.adopt(lease, chain[1]) is False
            store.release(lease)
        assert store.stats().collisions_total == 2
        store.check_valid()

    def test_each_colliding_hash_at_match_is_counted(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        h, _, extra = chain[0]
        for _ in range(2):
            lease = store.open()
            assert store.match(lease, [(h, (9, 9), extra)]).num_tokens == 0
            store.release(lease)
        assert store.stats().collisions_total == 2

    @pytest.mark.parametrize("field", ["tokens", "extra"])
    def test_a_colliding_hash_at_match_ends_the_match_and_is_counted(self, field):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        h, tokens, extra = chain[0]
        forged = (h, (9, 9), extra) if field == "tokens" else (h, tokens, (2, "", b"a", "full"))
        lease = store.open()
        result = store.match(lease, [forged, chain[1]])
        assert (result.block_ids, result.num_tokens) == ((), 0)
        assert store.stats().collisions_total == 1
        store.release(lease)

    def test_a_block_under_another_parent_does_not_match(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        # the second block's hash and tokens, presented as a root block
        lease = store.open()
        assert store.match(lease, [chain[1]]).num_tokens == 0
        assert store.stats().collisions_total == 1
        store.release(lease)


class TestMatching:
    def test_a_match_pins_each_block_and_counts_hit_and_query_tokens(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        before = store.stats()
        lease = store.open()
        result = store.match(lease, chain_of([1, 2, 3, 4, 5, 6]))
        assert result.num_tokens == 4 and len(result.block_ids) == 2
        assert list(result.block_ids) == lease.table
        assert store.pinned_hashes() == {chain[0][0], chain[1][0]}
        s = store.stats()
        assert (s.hit_tokens_total - before.hit_tokens_total,
                s.query_tokens_total - before.query_tokens_total) == (4, 6)
        assert (s.pinned_blocks, s.cached_blocks) == (2, 0)
        store.release(lease)
        assert store.pinned_hashes() == set()
        assert store.stats().cached_blocks == 2

    def test_a_fresh_store_has_queried_and_hit_no_tokens(self):
        s = make_store().stats()
        assert (s.query_tokens_total, s.hit_tokens_total) == (0, 0)

    def test_a_continued_match_counts_only_the_blocks_it_queries_and_hits_add_up(self):
        store = make_store()
        store_prompt(store, [1, 2])  # queries 1 block
        lease = store.open()
        four = chain_of([1, 2, 3, 4])
        assert store.match(lease, four).num_tokens == 2  # queries 2 blocks, hits 1
        fill(store, lease, four)
        assert store.match(lease, chain_of([1, 2, 3, 4, 5, 6])).num_tokens == 0  # queries 1
        second = store.open()
        assert store.match(second, four).num_tokens == 4  # queries 2, hits 2
        s = store.stats()
        assert (s.query_tokens_total, s.hit_tokens_total) == (12, 6)
        store.release(lease)
        store.release(second)

    def test_block_id_of_an_unknown_hash_is_none(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        assert store.block_id_of(chain_of([3, 4])[0][0]) is None
        assert store.block_id_of(chain[0][0]) is not None

    def test_a_block_without_extra_keys_is_indexed_and_matches(self):
        store = make_store()
        item = (BlockHash(b"\x05" * 16), (1, 2), ())
        lease = store.open()
        store.allocate(lease)
        assert store.adopt(lease, item) is True
        store.release(lease)
        other = store.open()
        assert store.match(other, [item]).num_tokens == 2
        store.release(other)
        store.check_valid()

    def test_a_lease_holding_a_private_block_does_not_match(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        lease = store.open()
        store.allocate(lease)
        assert store.match(lease, chain).num_tokens == 0
        store.release(lease)

    def test_a_lease_that_shares_nothing_neither_matches_nor_indexes(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        lease = store.open(indexing=False)
        assert store.match(lease, chain).num_tokens == 0
        store.allocate(lease)
        assert store.adopt(lease, chain[0]) is False
        store.release(lease)
        store.check_valid()

    def test_a_second_match_continues_the_chain_it_holds(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        lease = store.open()
        assert store.match(lease, chain[:1]).num_tokens == 2
        assert store.match(lease, chain).block_ids == (store.block_id_of(chain[1][0]),)
        with pytest.raises(RuntimeError, match=r"^match must continue the chain this lease holds$"):
            store.match(lease, chain_of([5, 6, 7, 8]))
        store.release(lease)

    def test_adopt_without_a_private_block_is_a_bug_of_the_caller(self):
        store = make_store()
        lease = store.open()
        with pytest.raises(RuntimeError,
                           match=r"^adopt needs a private block holding the item's KV$"):
            store.adopt(lease, chain_of([1, 2])[0])
        store.release(lease)


class TestLeases:
    def test_a_lease_released_twice_is_refused(self):
        store = make_store()
        lease = store.open()
        store.release(lease)
        with pytest.raises(RuntimeError, match=f"lease {lease.lease_id} released twice"):
            store.release(lease)

    @pytest.mark.parametrize("call", ["match", "allocate", "adopt"])
    def test_a_released_lease_cannot_be_used(self, call):
        store = make_store()
        lease = store.open()
        store.release(lease)
        args = {"match": (chain_of([1, 2]),), "allocate": (), "adopt": (chain_of([1, 2])[0],)}
        with pytest.raises(RuntimeError, match=r"is not active"):
            getattr(store, call)(lease, *args[call])

    def test_a_lease_of_another_store_is_refused(self):
        lease = make_store().open()
        with pytest.raises(RuntimeError, match=f"^lease {lease.lease_id} is not active$"):
            make_store().allocate(lease)

    def test_a_lease_s_next_block_follows_its_last_even_when_a_lower_one_is_free(self):
        store = make_store(blocks=8)
        early, lease = store.open(), store.open()
        for _ in range(3):
            store.allocate(early)
        first = store.allocate(lease)
        store.release(early)  # frees the three blocks below `first`
        assert store.allocate(lease) == first + 1
        store.release(lease)

    def test_allocation_places_a_lease_s_blocks_next_to_each_other(self):
        store = make_store()
        lease = store.open()
        ids = [store.allocate(lease) for _ in range(3)]
        assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
        assert store.held_blocks() == 3
        store.release(lease)
        assert store.held_blocks() == 0


class TestStatistics:
    def test_the_figures_add_up_to_the_pool(self):
        store = make_store(blocks=4)
        store_prompt(store, [1, 2, 3, 4])
        lease = store.open()
        store.allocate(lease)
        s = store.stats()
        assert (s.num_blocks, s.block_size, s.used_blocks, s.free_blocks) == (4, BS, 3, 1)
        assert (s.private_blocks, s.cached_blocks, s.held_blocks, s.leases) == (1, 2, 1, 1)
        assert s.usage == 0.75
        assert s.used_bytes == 3 * store.pool.block_bytes
        assert s.capacity_bytes == store.pool.capacity_bytes
        store.release(lease)


class TestEviction:
    def test_eviction_takes_leaves_least_recently_used_first_and_counts(self):
        store = make_store(blocks=8)
        a = store_prompt(store, [1, 2, 3, 4])
        b = store_prompt(store, [5, 6])
        lease = store.open()
        store.match(lease, a)  # a is now more recent than b
        store.release(lease)
        assert store.evict(1) == 1
        assert b[0][0] not in store.cached_hashes()
        assert store.evict(1) == 1  # a's leaf, then its root
        assert store.cached_hashes() == {a[0][0]}
        assert store.evict(5) == 1
        assert store.stats().evicted_blocks_total == 3
        store.check_valid()

    def test_a_block_with_two_children_stays_until_both_are_evicted(self):
        store = make_store(blocks=8)
        a = store_prompt(store, [1, 2, 3, 4])
        b = store_prompt(store, [1, 2, 5, 6])
        assert a[0] == b[0]
        store.check_valid()
        assert store.evict(1) == 1  # a's leaf, the least recently used
        assert store.cached_hashes() == {b[0][0], b[1][0]}
        assert store.evict(1) == 1  # b's leaf: the shared root had another child until now
        assert store.cached_hashes() == {b[0][0]}
        store.check_valid()

    def test_evict_returns_how_many_it_evicted_and_stops_there(self):
        store = make_store(blocks=8)
        for tokens in ([1, 2], [3, 4], [5, 6]):
            store_prompt(store, tokens)
        assert store.evict(2) == 2
        assert len(store.cached_hashes()) == 1

    @pytest.mark.parametrize(("repeats", "heap_after"), [(71, 72), (72, 1)])
    def test_the_lru_heap_is_compacted_when_a_removal_leaves_it_over_its_bound(
            self, repeats, heap_after):
        # the bound is 4 entries per pool block plus 64: 72 for a pool of 2
        store = make_store(blocks=2)
        store_prompt(store, [1, 2])
        b = store_prompt(store, [3, 4])
        for _ in range(repeats):  # each pin and release pushes b's leaf again
            lease = store.open()
            store.match(lease, b)
            store.release(lease)
        assert store.evict(1) == 1  # the older leaf; b's entries are left
        assert len(store._heap) == heap_after
        store.check_valid()

    def test_a_full_pool_evicts_a_cached_leaf_to_allocate(self):
        store = make_store(blocks=2)
        chain = store_prompt(store, [1, 2, 3, 4])
        lease = store.open()
        assert store.allocate(lease) is not None
        assert store.cached_hashes() == {chain[0][0]}
        assert store.allocate(lease) is not None
        assert store.cached_hashes() == set()
        assert store.allocate(lease) is None  # every block is held now
        store.release(lease)
        store.check_valid()

    def test_many_stale_heap_entries_are_compacted(self):
        store = make_store(blocks=2)
        chain = store_prompt(store, [1, 2])
        for _ in range(4 * 2 + 70):  # each pin and release pushes the leaf again
            lease = store.open()
            store.match(lease, chain)
            store.release(lease)
        other = store.open()
        store.allocate(other)
        store.allocate(other)  # evicts the leaf: the heap is compacted on removal
        assert len(store._heap) <= 4 * store.pool.num_blocks + 64
        store.release(other)
        store.check_valid()


class TestEpochs:
    def test_a_dropped_epoch_frees_unpinned_blocks_now_and_pinned_ones_at_release(self):
        store = make_store()
        cached = store_prompt(store, [1, 2, 3, 4], epoch=1)
        pinned = chain_of([5, 6, 7, 8], epoch=1)
        lease = store.open()
        fill(store, lease, pinned)
        keep = store_prompt(store, [1, 2], epoch=2)
        assert store.drop_epoch(1) == 2
        assert store.cached_hashes() == {keep[0][0]}
        assert store.pinned_hashes() == {pinned[0][0], pinned[1][0]}
        store.check_valid()
        store.release(lease)
        assert store.stats().used_blocks == 1
        assert store.match(store.open(), cached).num_tokens == 0
        store.check_valid()

    def test_a_dropped_epoch_refuses_later_adoption(self):
        store = make_store()
        store.drop_epoch(3)
        lease = store.open()
        store.allocate(lease)
        assert store.adopt(lease, chain_of([1, 2], epoch=3)[0]) is False
        assert store.stats().collisions_total == 0
        store.release(lease)

    def test_drop_epochs_except_keeps_only_the_one_named(self):
        store = make_store()
        store_prompt(store, [1, 2], epoch=1)
        store_prompt(store, [3, 4], epoch=2)
        keep = store_prompt(store, [5, 6], epoch=3)
        assert store.drop_epochs_except(3) == 2
        assert store.cached_hashes() == {keep[0][0]}


def _corrupt_pool_slot(store, lease, held, other):
    store.pool.allocate()  # a used slot nothing holds


def _free_a_held_block(store, lease, held, other):
    store.pool.allocate()
    store.pool.free(lease.private[0])  # as many used slots, but a held block among the free


def _pin_twice(store, lease, held, other):
    lease.table.insert(len(lease.pinned), lease.table[0])
    lease.pinned.append(lease.pinned[0])


def _unchain(store, lease, held, other):
    lease.pinned[:2] = lease.pinned[1::-1]
    lease.table[:2] = lease.table[1::-1]


def _rekey(store, lease, held, other):
    store._index[BlockHash(b"\x01" * 16)] = store._index.pop(other[1][0])


#: A corruption of a store (``held``: a two-block chain ``lease`` pins, then one private block;
#: ``other``: a two-block chain nobody holds) and what check_valid() says about it.
CORRUPTIONS = [
    (lambda st, le, h, o: setattr(st._index[h[0][0]], "block_id", le.private[0]),
     "a pool block is indexed twice, private twice, or both"),
    (_corrupt_pool_slot, "indexed + private blocks and used pool slots differ"),
    (_free_a_held_block, "a held block sits on the free list"),
    (lambda st, le, h, o: setattr(le, "released", True), "a released lease is still active"),
    (_pin_twice, "a lease pins a block twice"),
    (lambda st, le, h, o: le.pinned.__setitem__(1, BlockHash(b"\x00" * 16)),
     "a lease pins a block not in the index"),
    (lambda st, le, h, o: le.table.__setitem__(0, le.table[1]),
     "a table entry is not its pinned block"),
    (_unchain, "a lease's pinned blocks are not one chain"),
    (_rekey, "index key and block hash differ"),
    (lambda st, le, h, o: setattr(st._index[h[0][0]], "refs", 2), "refcount 2 != pins 1"),
    (lambda st, le, h, o: setattr(st._index[o[0][0]], "tokens", (5,)),
     "a block holds a partial block of tokens"),
    (lambda st, le, h, o: setattr(st._index[o[1][0]], "parent", BlockHash(b"\x02" * 16)),
     "a block's parent is missing"),
    (lambda st, le, h, o: setattr(st._index[o[1][0]], "epoch", 9), "a chain crosses epochs"),
    (lambda st, le, h, o: setattr(st._index[o[1][0]], "retired", True),
     "a retired unpinned leaf was not freed"),
    (lambda st, le, h, o: st._retired_epochs.add(1),
     "a block of a dropped epoch is still matchable"),
]


class TestCheckValid:
    @pytest.mark.parametrize(("corrupt", "message"), CORRUPTIONS)
    def test_it_names_each_corruption(self, corrupt, message):
        store = make_store(blocks=8)
        held = store_prompt(store, [1, 2, 3, 4])
        other = store_prompt(store, [5, 6, 7, 8])
        lease = store.open()
        assert store.match(lease, held).num_tokens == 4
        store.allocate(lease)
        store.check_valid()
        corrupt(store, lease, held, other)
        with pytest.raises(AssertionError) as err:
            store.check_valid()
        assert str(err.value) == message

    def test_it_detects_a_refcount_that_drifted(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        store._index[chain[0][0]].refs = 1
        with pytest.raises(AssertionError, match=r"^refcount 1 != pins 0$"):
            store.check_valid()

    def test_it_detects_a_private_count_that_drifted(self):
        store = make_store()
        lease = store.open()
        store.allocate(lease)
        store._private = 0
        with pytest.raises(AssertionError, match=r"^private block count drifted$"):
            store.check_valid()

    def test_it_detects_a_block_missing_from_the_lru_heap(self):
        store = make_store()
        store_prompt(store, [1, 2])
        store._heap.clear()
        with pytest.raises(AssertionError,
                           match=r"^an evictable leaf is missing from the LRU heap$"):
            store.check_valid()

    def test_it_detects_a_lease_table_shorter_than_its_pins(self):
        store = make_store()
        chain = store_prompt(store, [1, 2])
        lease = store.open()
        store.match(lease, chain)
        lease.table.clear()
        with pytest.raises(AssertionError, match=r"^a lease's table lost its pinned blocks$"):
            store.check_valid()

    def test_it_detects_a_child_count_that_drifted(self):
        store = make_store()
        chain = store_prompt(store, [1, 2, 3, 4])
        store._index[chain[0][0]].children = 0
        with pytest.raises(AssertionError, match=r"^child count drifted$"):
            store.check_valid()

    def test_it_detects_a_pinned_count_that_drifted(self):
        store = make_store()
        store_prompt(store, [1, 2])
        store._pinned = 1
        with pytest.raises(AssertionError, match=r"^pinned block count drifted$"):
            store.check_valid()


class TestBlockHashing:
    def test_each_block_chains_its_parent_tokens_and_extra_keys(self):
        chain = chain_of([1, 2, 3, 4])
        keys = BlockKeys(model_epoch=1, salt=b"a")
        first = hash_block_tokens(xxh3_128, None, (1, 2), keys.extra_keys(0, BS))
        second = hash_block_tokens(xxh3_128, first, (3, 4), keys.extra_keys(1, BS))
        assert chain == [(first, (1, 2), (1, "", b"a", "full")),
                         (second, (3, 4), (1, "", b"a", "full"))]

    def test_public_salt_covers_whole_blocks_inside_the_public_prefix(self):
        keys = BlockKeys(model_epoch=1, salt=b"a", public_tokens=4)
        assert [keys.extra_keys(i, BS)[2] for i in range(3)] == [PUBLIC_SALT, PUBLIC_SALT, b"a"]

    def test_extending_a_chain_gives_the_chain_hashed_at_once(self):
        keys = BlockKeys(model_epoch=1)
        tokens = [1, 2, 3, 4, 5, 6]
        chain = extend_chain([], tokens, keys, block_size=BS, upto=1)
        assert extend_chain(chain, tokens, keys, block_size=BS, upto=3) == block_hashes(
            tokens, keys, block_size=BS)

    def test_a_block_size_below_one_is_refused_by_name(self):
        with pytest.raises(InvalidParamsError,
                           match=r"^block_size: must be at least 1, got 0; use 16$") as err:
            extend_chain([], [1], BlockKeys(model_epoch=1), block_size=0, upto=0)
        assert err.value.field == "block_size"

    def test_a_block_of_one_token_is_a_valid_block_size(self):
        keys = BlockKeys(model_epoch=1)
        chain = extend_chain([], [7, 8], keys, block_size=1, upto=2)
        assert [tokens for _, tokens, _ in chain] == [(7,), (8,)]
        assert block_hashes([7, 8], keys, block_size=1) == chain

    def test_more_blocks_than_tokens_is_refused_by_name(self):
        with pytest.raises(InvalidParamsError, match=(
                r"^upto: 2 blocks need 4 tokens, got 3; hash only whole blocks$")) as err:
            extend_chain([], [1, 2, 3], BlockKeys(model_epoch=1), block_size=BS, upto=2)
        assert err.value.field == "upto"
        assert extend_chain([], [1, 2, 3, 4], BlockKeys(model_epoch=1), block_size=BS, upto=2)

    def test_scope_salt_is_the_keyed_digest_of_the_framed_tenant(self):
        import hashlib

        from keying import frame

        secret = bytes(range(70))
        assert scope_salt("t1", secret=secret) == hashlib.blake2b(
            frame(["scope-salt/v1", "t1"]), digest_size=16, key=secret[:64]).digest()

    def test_scope_salt_is_sixteen_bytes_keyed_by_at_most_64_bytes_of_secret(self):
        salt = scope_salt("t1")
        assert isinstance(salt, bytes) and len(salt) == 16
        assert scope_salt("t1", secret=b"s" * 64) == scope_salt("t1", secret=b"s" * 64 + b"x")

    def test_an_empty_or_non_string_tenant_is_refused_by_name(self):
        for tenant in ("", None, 5):
            with pytest.raises(InvalidParamsError, match=(
                    r"^tenant: a scope salt needs a non-empty tenant id; pass the authenticated "
                    r"tenant$")) as err:
                scope_salt(tenant)  # type: ignore[arg-type]
            assert err.value.field == "tenant"

    def test_block_hashes_are_block_hash_values(self):
        assert isinstance(chain_of([1, 2])[0][0], bytes)
        assert BlockHash is not None
