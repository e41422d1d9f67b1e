"""INT8 KV pool blocks: quantization error bounds, dtype in the block hash, and an INT8 engine
that stays close to full precision on random-tiny."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_prefix.capacity import block_bytes_for
from gpu_prefix.engine import GenerationParams
from gpu_prefix.hashing import BlockKeys, block_hashes
from gpu_prefix.kvquant import QMAX, QuantizedKV
from gpu_prefix.pool import KVPool, KVShape
from gpu_prefix.store import PrefixStore

BS = 4
H, D = 2, 8
EPS = 1e-6  # float32 rounding of the dequantized product


def storage(num_blocks: int = 6) -> QuantizedKV:
    return QuantizedKV(num_layers=1, kv_heads=H, head_dim=D, num_blocks=num_blocks, block_size=BS,
                       dtype=torch.float32, device=torch.device("cpu"))


def kv(gen: torch.Generator, n: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Channel magnitudes differ by up to 100x (keys' outlier channels).
    chan = torch.logspace(-1, 1, D)[None, None, :]
    k = torch.randn((H, n, D), generator=gen) * chan * spread
    v = torch.randn((H, n, D), generator=gen) * spread
    return k, v


class TestQuantizeRoundTrip:
    @settings(max_examples=30, deadline=None)
    @given(seed=st.integers(0, 2**31 - 1), blocks=st.integers(1, 3))
    def test_a_block_written_whole_is_within_half_a_step_per_channel_and_per_token(
        self, seed, blocks):
        gen = torch.Generator().manual_seed(seed)
        q = storage()
        k, v = kv(gen, blocks * BS)
        slots = torch.arange(BS, BS + blocks * BS)  # blocks 1..blocks
        q.write(0, slots, k, v)
        k2, v2 = q.read(0, slots)
        k_amax = k.reshape(H, blocks, BS, D).abs().amax(dim=2).repeat_interleave(BS, dim=1)
        assert bool(((k - k2).abs() <= k_amax / (2 * QMAX) + EPS).all())
        v_amax = v.abs().amax(dim=-1, keepdim=True)
        assert bool(((v - v2).abs() <= v_amax / (2 * QMAX) + EPS).all())

    @settings(max_examples=30, deadline=None)
    @given(seed=st.integers(0, 2**31 - 1), growth=st.floats(1.0, 50.0))
    def test_a_block_filled_token_by_token_stays_under_twice_the_channel_step(self, seed, growth):
        # Each later token may be larger than all before: the block's scale grows and its
        # earlier codes are requantized; the error stays under 2 * amax / 127 per channel.
        gen = torch.Generator().manual_seed(seed)
        q = storage()
        ks, vs = [], []
        for i in range(BS):
            k, v = kv(gen, 1, spread=growth**i)
            q.write(0, torch.tensor([2 * BS + i]), k, v)
            ks.append(k)
            vs.append(v)
        k, v = torch.cat(ks, dim=1), torch.cat(vs, dim=1)
        k2, v2 = q.read(0, torch.arange(2 * BS, 3 * BS))
        k_amax = k.abs().amax(dim=1, keepdim=True)
        assert bool(((k - k2).abs() < 2 * k_amax / QMAX + EPS).all())
        assert bool(((v - v2).abs() <= v.abs().amax(dim=-1, keepdim=True) / (2 * QMAX) + EPS).all())

    def test_a_reused_block_does_not_inherit_its_former_owners_scale(self):
        gen = torch.Generator().manual_seed(3)
        q = storage()
        slots = torch.arange(0, BS)
        big_k, big_v = kv(gen, BS, spread=1000.0)
        q.write(0, slots, big_k, big_v)
        small_k, small_v = kv(gen, 1, spread=0.01)
        q.write(0, slots[:1], small_k, small_v)  # the block's first slot: a new owner
        k2, _ = q.read(0, slots[:1])
        assert bool(((small_k - k2).abs() <= small_k.abs() / (2 * QMAX) + EPS).all())

    def test_zero_inputs_read_back_as_zeros(self):
        q = storage()
        slots = torch.arange(0, BS)
        q.write(0, slots, torch.zeros((H, BS, D)), torch.zeros((H, BS, D)))
        k2, v2 = q.read(0, slots)
        assert not bool(k2.any()) and not bool(v2.any())


class TestInt8NeverSharesWithFullPrecision:
    def test_the_kv_dtype_is_in_every_block_hash(self):
        tokens = list(range(3 * BS))
        full = block_hashes(tokens, BlockKeys(model_epoch=1, salt=b"a"), block_size=BS)
        int8 = block_hashes(tokens, BlockKeys(model_epoch=1, salt=b"a", kv_dtype="int8"),
                            block_size=BS)
        assert not {h for h, _, _ in full} & {h for h, _, _ in int8}

    def test_a_store_holding_int8_blocks_matches_none_of_them_for_full_precision_keys(self):
        pool = KVPool(KVShape(num_layers=1, kv_heads=H, head_dim=D), budget_bytes=1 << 16,
                      block_size=BS,
                      kv_dtype="int8")
        store = PrefixStore(pool)
        tokens = list(range(3 * BS))
        lease = store.open()
        for item in block_hashes(tokens, BlockKeys(model_epoch=1, salt=b"a", kv_dtype="int8"),
                                 block_size=BS):
            store.allocate(lease)
            store.adopt(lease, item)
        store.release(lease)
        probe = store.open()
        full = block_hashes(tokens, BlockKeys(model_epoch=1, salt=b"a"), block_size=BS)
        assert len(store.match(probe, full).block_ids) == 0
        store.release(probe)
        again = store.open()
        int8 = block_hashes(tokens, BlockKeys(model_epoch=1, salt=b"a", kv_dtype="int8"),
                            block_size=BS)
        assert len(store.match(again, int8).block_ids) == 3
        store.release(again)
        store.check_valid()


class TestInt8Pool:
    def test_the_pool_bytes_per_block_are_what_capacity_computes_and_fit_the_budget(self):
        shape = KVShape(num_layers=3, kv_heads=H, head_dim=D, dtype=torch.float16)
        pool = KVPool(shape, budget_bytes=100_000, block_size=BS, kv_dtype="int8")
        assert pool.block_bytes == block_bytes_for(layers=3, kv_heads=H, head_dim=D, block_size=BS,
                                                   kv_dtype="int8", scale_bytes=2)
        assert pool.quant is not None and pool.quant.nbytes == pool.capacity_bytes <= 100_000
        pool.check_valid()

    def test_a_pool_with_some_layers_in_full_precision_sizes_and_keys_its_blocks_by_them(self):
        shape = KVShape(num_layers=3, kv_heads=H, head_dim=D, dtype=torch.float16)
        pool = KVPool(shape, budget_bytes=100_000, block_size=BS, kv_dtype="int8",
                      full_layers=frozenset({1}))
        int8_layer = block_bytes_for(layers=1, kv_heads=H, head_dim=D, block_size=BS,
                                     kv_dtype="int8",
                                     scale_bytes=2)
        full_layer = block_bytes_for(layers=1, kv_heads=H, head_dim=D, block_size=BS,
                                     kv_dtype="float16")
        assert pool.block_bytes == 2 * int8_layer + full_layer
        assert pool.quant is not None and pool.quant.nbytes == pool.capacity_bytes <= 100_000
        assert pool.kv_key == "int8+full:1"
        assert KVPool(shape, budget_bytes=100_000, block_size=BS, kv_dtype="int8").kv_key == "int8"
        pool.check_valid()

    def test_a_full_precision_layer_reads_back_exactly_and_an_int8_layer_within_its_bound(self):
        q = QuantizedKV(num_layers=2, kv_heads=H, head_dim=D, num_blocks=2, block_size=BS,
                        dtype=torch.float32,
                        device=torch.device("cpu"), full_layers=frozenset({0}))
        k, v = kv(torch.Generator().manual_seed(3), 2 * BS)
        slots = torch.arange(2 * BS)
        for layer in (0, 1):
            q.write(layer, slots, k, v)
        k0, v0 = q.read(0, slots)
        assert torch.equal(k0, k) and torch.equal(v0, v)
        k1, _ = q.read(1, slots)
        assert not torch.equal(k1, k) and bool(((k1 - k).abs() <= k.abs().amax() / 254 + EPS).all())

    def test_block_hashes_of_different_full_precision_layer_sets_never_match(self):
        tokens = list(range(3 * BS))
        hashes = [{h for h, _, _ in block_hashes(tokens,
                                                 BlockKeys(model_epoch=1, salt=b"a", kv_dtype=key),
                                                 block_size=BS)}
                  for key in ("full", "int8", "int8+full:0", "int8+full:0,1")]
        assert all(a.isdisjoint(b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])

    def test_full_precision_layers_only_in_an_int8_pool(self):
        with pytest.raises(Exception, match="full_layers"):
            KVPool(KVShape(num_layers=2, kv_heads=H, head_dim=D), budget_bytes=1 << 16,
                   full_layers=frozenset({0}))

    def test_an_unknown_kv_dtype_is_refused_by_name(self):
        with pytest.raises(Exception, match="kv_dtype"):
            KVPool(KVShape(num_layers=1, kv_heads=H, head_dim=D), budget_bytes=1 << 16,
                   kv_dtype="int4")


def prompt_of(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class TestInt8Engine:
    def test_teacher_forced_distributions_stay_close_to_full_precision_on_random_tiny(
        self, make_engine):
        fp, q = make_engine(), make_engine(kv_dtype="int8")
        try:
            prompt = prompt_of(40, 1, fp.vocab_size)
            completion = list(fp.generate(prompt,
                                          GenerationParams(max_tokens=60, min_tokens=60)).token_ids)
            a = torch.log_softmax(fp.teacher_forced_logits(prompt, completion), dim=-1)
            b = torch.log_softmax(q.teacher_forced_logits(prompt, completion), dim=-1)
            kld = (a.exp() * (a - b)).sum(dim=-1)
            assert float(kld.mean()) < 1e-4
            assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.95
            # and they are not the same numbers: the INT8 path really quantizes
            assert float(kld.max()) > 0
        finally:
            fp.close()
            q.close()

    def test_int8_blocks_are_shared_between_int8_requests_and_read_back_identically(
        self, make_engine):
        q = make_engine(kv_dtype="int8")
        try:
            salt = q.scope_salt_for("t")
            prompt = prompt_of(50, 2, q.vocab_size)
            first, cached0 = q.next_token_logits(prompt, scope_salt=salt)
            second, cached1 = q.next_token_logits(prompt, scope_salt=salt)
            assert cached0 == 0 and cached1 == 48
            assert torch.allclose(first, second, atol=1e-5)
            q.store.check_valid()
        finally:
            q.close()

    def test_batched_int8_greedy_equals_int8_greedy_alone(self, make_engine):
        import threading

        solo, batched = make_engine(kv_dtype="int8"), make_engine(
            kv_dtype="int8", max_batch_tokens=40)
        try:
            prompts = [prompt_of(20 + 7 * i, 10 + i, solo.vocab_size) for i in range(3)]
            params = GenerationParams(max_tokens=30, min_tokens=30, scope_salt=b"s")
            alone = [solo.generate(p, params).token_ids for p in prompts]
            out: dict[int, tuple[int, ...]] = {}
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(i,
                                                                           batched.generate(
                                                                               prompts[i],
                                                                               params).token_ids))
                       for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [out[i] for i in range(3)] == alone
        finally:
            solo.close()
            batched.close()
