"""Entry authentication: a keyed BLAKE2b MAC over a whole envelope, under the service secret.

An entry is served only if its MAC verifies, so write access to the store without the secret
cannot make the service serve bytes it did not write itself: a rewritten answer, one entry's
metadata over another's answer, or a bit flip all fail the MAC (a miss plus a finding).

Every MAC names its key by a *key id*, a short fingerprint of the secret it was made under.
The current secret signs; the current and every configured previous secret verify. Rotating
is: make the new secret current and list the old one under ``previous_secrets`` on every
replica, wait one TTL (``limits.max_ttl_seconds``), drop the old one. Entries under a key id
nobody configured are refused, and so is everything once its secret is dropped.

NOTE: the key id is 4 bytes of an unkeyed BLAKE2b of the secret. It tells keys apart; it does
not weaken a secret of at least 16 random bytes (finding one from the id is still a search of
the whole secret space).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from cachesvc.store.errors import ForgedEntryError, StoreConfigError, UnknownKeyError

KEY_ID_SIZE = 4
MAC_SIZE = 32
#: The range a service secret must be in: BLAKE2b takes keys of at most 64 bytes, and a
#: fill token needs at least 16.
MIN_SECRET_BYTES = 16
MAX_SECRET_BYTES = 64


def key_id(secret: bytes) -> bytes:
    """The key id of entries signed under ``secret``."""
    return hashlib.blake2b(secret, digest_size=KEY_ID_SIZE, person=b"llmc-entry-kid").digest()


class EntryKeys:
    """The keys entries are signed with: ``current`` signs, it and every ``previous`` verify."""

    __slots__ = ("current_id", "_macs", "_secrets")

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        self._macs: dict[bytes, hashlib.blake2b] = {}
        self._secrets: dict[bytes, bytes] = {}
        for secret in (current, *previous):
            check_secret(secret)
            kid = key_id(secret)
            if kid in self._secrets:
                if self._secrets[kid] == secret:
                    continue  # the same secret listed twice changes nothing
                raise StoreConfigError(
                    "cache.previous_secrets: two secrets share a key id; generate a new secret")
            self._secrets[kid] = secret
            # The MAC key is derived, so the secret itself is never a BLAKE2b key twice over.
            mac_key = hashlib.blake2b(secret, digest_size=64, person=b"llmc-entry-mac").digest()
            self._macs[kid] = hashlib.blake2b(key=mac_key, digest_size=MAC_SIZE)
        self.current_id = key_id(current)

    def sign(self, header: bytes, payload: bytes) -> bytes:
        """The MAC of ``header + payload`` under the current key."""
        return self._mac(self._macs[self.current_id], header, payload)

    def verify(self, kid: bytes, tag: bytes, header: bytes | memoryview,
               payload: bytes | memoryview) -> None:
        """Raise unless ``tag`` is the MAC of ``header + payload`` under key ``kid``."""
        h = self._macs.get(kid)
        if h is None:
            raise UnknownKeyError(
                f"entry is signed under key id {kid.hex()}, which is neither [cache] secret nor "
                "one of [cache] previous_secrets")
        if not hmac.compare_digest(self._mac(h, header, payload), tag):
            raise ForgedEntryError("entry MAC does not verify: the bytes were not written by a "
                                   "service holding the secret")

    def secret_for(self, kid: bytes) -> bytes | None:
        """The secret behind key id ``kid`` (it keys that entry's material digest), or None."""
        return self._secrets.get(kid)

    @staticmethod
    def _mac(base: hashlib.blake2b, header: bytes | memoryview, payload: bytes | memoryview
             ) -> bytes:
        h = base.copy()
        h.update(header)
        h.update(payload)
        return h.digest()


def check_secret(secret: bytes) -> bytes:
    """``secret`` if its length is usable, else a :class:`StoreConfigError` saying the fix."""
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise StoreConfigError(
            f"cache.secret: {len(secret)} bytes; a service secret must be {MIN_SECRET_BYTES} to "
            f"{MAX_SECRET_BYTES} bytes (e.g. `python -c 'import secrets; "
            "print(secrets.token_hex(32))'`)")
    return secret
