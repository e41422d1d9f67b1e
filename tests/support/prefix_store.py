"""A tiny prefix store and the steps a request takes on it, shared by the store's test suites."""

from __future__ import annotations

from typing import Any

from gpu_prefix.hashing import BlockKeys, block_hashes
from gpu_prefix.pool import KVPool, KVShape
from gpu_prefix.store import Lease, PrefixStore
from keying import BlockHash, xxh3_128

SHAPE = KVShape(num_layers=1, kv_heads=1, head_dim=1)
BS = 2

#: One block of a chain, as block_hashes gives it: (hash, token ids, extra keys).
Chain = list[tuple[BlockHash, tuple[int, ...], tuple[object, ...]]]


def make_store(blocks: int = 8) -> PrefixStore:
    pool = KVPool(SHAPE, budget_bytes=blocks * SHAPE.bytes_per_token() * BS, block_size=BS)
    return PrefixStore(pool)


def chain_of(tokens: list[int], *, epoch: int = 1, salt: bytes = b"a", hash_fn: Any = xxh3_128,
             public_tokens: int = 0) -> Chain:
    keys = BlockKeys(model_epoch=epoch, salt=salt, public_tokens=public_tokens)
    return block_hashes(tokens, keys, block_size=BS, hash_fn=hash_fn)


def fill(store: PrefixStore, lease: Lease, chain: Chain) -> list[bool]:
    """Compute the rest of ``chain`` for ``lease``: a private block each, then index it. Returns
    what each ``adopt`` answered (False: kept private)."""
    adopted = []
    for item in chain[len(lease.table):]:
        assert store.allocate(lease) is not None
        adopted.append(store.adopt(lease, item))
    return adopted


def store_prompt(store: PrefixStore, tokens: list[int], **kw: Any) -> Chain:
    """Open, match, fill, release: leaves the prompt's blocks cached."""
    chain = chain_of(tokens, **kw)
    lease = store.open()
    store.match(lease, chain)
    fill(store, lease, chain)
    store.release(lease)
    return chain
