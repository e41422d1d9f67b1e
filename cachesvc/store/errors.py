"""Errors raised by the response stores and the entry envelope.

One base, :class:`StoreError`; each error also subclasses the matching built-in, so a caller
that only knows ``ValueError`` or ``ConnectionError`` still handles it sensibly.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by ``cachesvc.store``."""


class EntryDecodeError(StoreError, ValueError):
    """Base of the errors raised when stored bytes cannot be trusted as an entry.

    A caller treats any of them as a miss plus a finding; the bytes are never served.
    """


class ForeignEntryError(EntryDecodeError):
    """Raised when the bytes do not start with this project's envelope magic: another program
    wrote the key, or the key was overwritten with something else."""


class UnsupportedVersionError(EntryDecodeError):
    """Raised when the envelope names a format version this code does not read (written by a
    newer or older release)."""


class CorruptEntryError(EntryDecodeError):
    """Raised when the envelope is truncated, its checksum does not match, or its payload does
    not have the entry schema."""


class ForgedEntryError(EntryDecodeError):
    """Raised when an envelope's MAC does not verify: the bytes were changed, or written by
    someone without the service secret."""


class UnknownKeyError(EntryDecodeError):
    """Raised when an envelope is signed under a key id that is neither the current secret's
    nor a configured previous secret's (a rotated-out key, or a forgery)."""


class OversizeEntryError(EntryDecodeError):
    """Raised when stored bytes exceed ``max_entry_bytes``: the fill path never writes such an
    entry, so it is refused before it is decoded."""


class InvalidEntryError(StoreError, ValueError):
    """Raised when an :class:`~cachesvc.store.envelope.Entry` is built with a bad field; the
    message names the field and the fix."""


class EntryTooLargeError(StoreError, ValueError):
    """Raised when an encoded entry exceeds the store's configured ``max_entry_bytes``."""


class StoreConfigError(StoreError, ValueError):
    """Raised for a bad store URL or limit; the message names the setting and the fix."""


class StoreUnavailableError(StoreError, ConnectionError):
    """Raised when the backing store cannot be reached or does not answer in time.

    The service turns it into a miss (lookups) or a dropped write (fills); never a hit.
    """


class StoreTimeoutError(StoreUnavailableError, TimeoutError):
    """Raised when the store kept its own deadline and the backend did not answer by it."""
