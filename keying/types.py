"""Distinct types for the different digests, so one is never passed where another is expected."""

from __future__ import annotations

from typing import NewType

#: ``xxh3_128`` of the key material: names a response-cache entry (16 bytes).
ResponseDigest = NewType("ResponseDigest", bytes)

#: Keyed BLAKE3 of the key material: stored in an entry and checked on every hit (32 bytes).
MaterialDigest = NewType("MaterialDigest", bytes)

#: ``xxh3_128`` of a prefix block (parent hash, token ids, extra keys), used by ``gpu_prefix``.
BlockHash = NewType("BlockHash", bytes)
