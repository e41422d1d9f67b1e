"""Chained block hashes for prefix reuse, and the scope salt that keeps tenants apart.

Block ``i`` hashes its parent's hash, its token ids and the extra keys (model epoch, adapter,
scope salt, KV storage dtype) through ``keying.hash_block_tokens``, so equal hashes mean equal
prefixes under the same weights, adapter and scope, up to ``xxh3_128`` collisions; the store
verifies token ids,
parent link and extra keys on every match, so a collision is a miss, never another's KV.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpu_prefix.errors import InvalidParamsError
from keying import BlockHash, frame, hash_block_tokens, xxh3_128

HashFn = Callable[[bytes], bytes]

#: Salt of blocks configured as public (shared by every tenant).
PUBLIC_SALT = b"public"

DEFAULT_SALT_SECRET = b"provable-llm-cache/scope-salt/v1"


def scope_salt(tenant: str, *, secret: bytes = DEFAULT_SALT_SECRET) -> bytes:
    """The per-tenant salt, derived server-side from the authenticated tenant id.

    Keyed so a client that knows a tenant id still cannot compute another tenant's block hashes
    offline; framed so ``"a:b"`` style ids cannot alias.
    """
    if not isinstance(tenant, str) or not tenant:
        raise InvalidParamsError("tenant", "a scope salt needs a non-empty tenant id",
                                 "pass the authenticated tenant")
    return hashlib.blake2b(frame(["scope-salt/v1", tenant]), digest_size=16,
                           key=secret[:64]).digest()


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockKeys:
    """What besides the tokens decides a block: weights epoch, adapter, scope, and how its K/V
    are stored (``kv_dtype``: ``"full"`` precision or ``"int8"``), so blocks of one storage never
    match requests of the other.

    ``public_tokens`` leading tokens (rounded down to whole blocks) are hashed with the public
    salt instead of ``salt``; the engine sets it only when the prompt starts with a prefix the
    operator configured as public.
    """

    model_epoch: int
    adapter: str = ""
    salt: bytes = PUBLIC_SALT
    public_tokens: int = 0
    kv_dtype: str = "full"

    def extra_keys(self, block_index: int, block_size: int) -> tuple[object, ...]:
        public = (block_index + 1) * block_size <= self.public_tokens
        return (self.model_epoch, self.adapter, PUBLIC_SALT if public else self.salt, self.kv_dtype)


def block_hashes(
    tokens: Sequence[int],
    keys: BlockKeys,
    *,
    block_size: int,
    hash_fn: HashFn = xxh3_128,
) -> list[tuple[BlockHash, tuple[int, ...], tuple[object, ...]]]:
    """``(hash, tokens, extra_keys)`` for every full block of ``tokens``, chained from the root."""
    return extend_chain([], tokens, keys, block_size=block_size, upto=len(tokens) // block_size,
                        hash_fn=hash_fn)


def extend_chain(
    chain: list[tuple[BlockHash, tuple[int, ...], tuple[object, ...]]],
    tokens: Sequence[int],
    keys: BlockKeys,
    *,
    block_size: int,
    upto: int,
    hash_fn: HashFn = xxh3_128,
) -> list[tuple[BlockHash, tuple[int, ...], tuple[object, ...]]]:
    """Extend ``chain`` (the first blocks of ``tokens``) in place to ``upto`` blocks; returns it.
    A running request hashes each block once, as it fills."""
    if block_size < 1:
        raise InvalidParamsError("block_size", f"must be at least 1, got {block_size}", "use 16")
    if upto * block_size > len(tokens):
        raise InvalidParamsError("upto",
                                 f"{upto} blocks need {upto * block_size} tokens, got "
                                 f"{len(tokens)}",
                                 "hash only whole blocks")
    parent: BlockHash | None = chain[-1][0] if chain else None
    for i in range(len(chain), upto):
        chunk = tuple(map(int, tokens[i * block_size : (i + 1) * block_size]))
        extra = keys.extra_keys(i, block_size)
        parent = hash_block_tokens(hash_fn, parent, chunk, extra)
        chain.append((parent, chunk, extra))
    return chain
