"""Errors of the prefix KV store and the reference engine. One base, each a built-in too."""

from __future__ import annotations


class PrefixCacheError(Exception):
    """Base of every error raised by ``gpu_prefix``."""


class InvalidParamsError(PrefixCacheError, ValueError):
    """A caller passed a bad value (generation parameter, block size, budget); names the fix."""

    def __init__(self, field: str, message: str, fix: str) -> None:
        self.field = field
        self.fix = fix
        super().__init__(f"{field}: {message}; {fix}")


class ModelLoadError(PrefixCacheError, RuntimeError):
    """A model could not be loaded (unknown name, missing package or file)."""


class AdmissionRefusedError(PrefixCacheError, RuntimeError):
    """The KV pool is above its high watermark and the wait queue is full (or the wait timed
    out). Retryable: the caller should retry after ``retry_after_s``; HTTP maps it to 503."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class PoolExhaustedError(PrefixCacheError, MemoryError):
    """No free block and nothing evictable: every block is pinned by requests in flight.

    Admission control keeps this from reaching callers; the store raises it rather than evict a
    pinned block."""
