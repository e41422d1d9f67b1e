"""Canonical, type-tagged, length-framed encoding of key material, and the digests over it.

msgpack tags every value with its type and prefixes every string, byte string, array and map
with its length, so two different tuples of fields can never encode to the same bytes: the
``("org_1", "2345")`` / ``("org_12345", "")`` class of collision is impossible by construction.
Maps are written with their keys sorted, so the encoding does not depend on key order.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import blake3
import msgpack
import xxhash

from keying.types import BlockHash, MaterialDigest, ResponseDigest

#: Default key for the material digest. Deployments set their own secret; the digest is
#: collision-resistant without it, the secret only stops offline precomputation.
DEFAULT_MATERIAL_SECRET = b"provable-llm-cache/material/v1"

HashFn = Callable[[bytes], bytes]


def _sorted_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_maps(value[k]) for k in sorted(value, key=_map_key_order)}
    if isinstance(value, (list, tuple)):
        return [_sorted_maps(v) for v in value]
    return value


def _map_key_order(key: Any) -> tuple[str, Any]:
    # Keys of one map may be of mixed types only in generic material; order by type, then value.
    return (type(key).__name__, key)


def frame(value: Any) -> bytes:
    """Encode ``value`` canonically: msgpack, maps sorted by key, float64 for every float.

    ``value`` must already be canonical (see ``keying.canonical``); this function does not fold
    spellings, it only frames.
    """
    return msgpack.packb(_sorted_maps(value), use_bin_type=True, strict_types=False)


_local = threading.local()


def _packer() -> msgpack.Packer:
    # NOTE: msgpack.packb builds a Packer per call, which costs more than packing a small
    # request; a Packer is not thread-safe, so each thread keeps its own.
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
    return packer


def frame_presorted(value: Any) -> bytes:
    """Encode a value whose maps are already in canonical key order (hot path, no re-sorting)."""
    try:
        return _packer().pack(value)
    except BaseException:
        _local.packer = msgpack.Packer(use_bin_type=True, autoreset=True)  # drop a dirty buffer
        raise


def xxh3_128(data: bytes) -> bytes:
    """The 16-byte ``xxh3_128`` digest of ``data``."""
    return xxhash.xxh3_128_digest(data)


def response_digest(material: bytes) -> ResponseDigest:
    """Name of a response-cache entry: ``xxh3_128`` of the framed key material."""
    return ResponseDigest(xxhash.xxh3_128_digest(material))


@functools.lru_cache(maxsize=16)
def _material_key(secret: bytes) -> bytes:
    # BLAKE3 takes a 32-byte key; its key-derivation mode turns a secret of any length into one.
    return blake3.blake3(secret, derive_key_context=_MATERIAL_KEY_CONTEXT).digest()


_MATERIAL_KEY_CONTEXT = "provable-llm-cache 2026 material digest key"


def material_digest(material: bytes, secret: bytes = DEFAULT_MATERIAL_SECRET) -> MaterialDigest:
    """Keyed BLAKE3 (256-bit) of the framed key material, verified on every hit.

    NOTE: BLAKE3 rather than blake2b: the same 256-bit keyed-hash strength, and SIMD-parallel
    over long input, where it is more than ten times cheaper (bench/keying.py's large request
    shows it). The key is derived from ``secret`` (any length) in BLAKE3's KDF mode.
    """
    hasher = _keyed_hasher(secret).copy()
    hasher.update(material)
    return MaterialDigest(hasher.digest())


@functools.lru_cache(maxsize=16)
def _keyed_hasher(secret: bytes) -> blake3.blake3:
    # NOTE: a keyed hasher set up once and copied per digest: cheaper than parsing the key
    # into a fresh hasher on every call. The original is never updated.
    return blake3.blake3(key=_material_key(secret))


def hash_block_tokens(
    hash_fn: HashFn,
    parent: BlockHash | None,
    tokens: tuple[int, ...] | list[int],
    extra_keys: tuple[Any, ...],
) -> BlockHash:
    """Hash one prefix block: chains the parent hash, the block's token ids and the extra keys.

    The inputs are framed like response key material, so a block hash cannot be confused with
    another tuple of inputs. ``hash_fn`` is injected (``xxh3_128`` in production).
    """
    return BlockHash(hash_fn(frame_presorted(["block/v1", parent, list(tokens), list(extra_keys)])))
