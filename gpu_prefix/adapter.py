"""The transformers adapter: a request's KV as a transformers ``Cache`` backed by one buffer.

``RequestCache`` owns a working buffer ``[layers, 2, kv_heads, capacity, head_dim]`` sized for
the request's prompt plus its token budget, allocated once. Matched prefix blocks are copied in
from the pool (one copy per run of consecutive blocks, across all layers at once); each layer's
``update()`` writes the new K/V into the buffer in place and returns a view of that layer's K/V
so far. Unlike ``DynamicCache``, which concatenates (re-copies the whole past) on every step,
a decode step here writes one position. New full blocks go back to the pool from the buffer.

NOTE: ``update()`` is the seam for the next steps: writing through a block table into the pool
itself, and attention that reads the pool in place, replace this buffer without touching the
engine's callers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from gpu_prefix.errors import InvalidParamsError
from gpu_prefix.pool import KVPool, KVShape


class _BufferLayer(DynamicLayer):
    """One layer's view of the request buffer (batch size 1)."""

    def __init__(self, owner: RequestCache, layer_idx: int) -> None:
        super().__init__()
        self._owner = owner
        self._idx = layer_idx
        self.length = 0
        self.is_initialized = True
        self.device = owner.buffer.device
        self._sync()

    def _sync(self) -> None:
        # Views, not copies: transformers helpers that read ``.keys`` see the live state.
        buf = self._owner.buffer
        self.keys = buf[self._idx, 0, :, : self.length, :].unsqueeze(0)
        self.values = buf[self._idx, 1, :, : self.length, :].unsqueeze(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        if key_states.shape[0] != 1:
            raise RuntimeError("RequestCache holds one sequence (batch size 1)")
        end = self.length + q
        buf = self._owner.buffer
        if end > self._owner.capacity:
            raise RuntimeError(f"request KV buffer overflow: {end} > capacity {self._owner.capacity}")
        buf[self._idx, 0, :, self.length : end, :].copy_(key_states[0])
        buf[self._idx, 1, :, self.length : end, :].copy_(value_states[0])
        self.length = end
        self._sync()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max(0, max_length))
        self._sync()

    def reset(self) -> None:
        self.length = 0
        self._sync()


class BufferArena:
    """Reuses request buffers between requests.

    A fresh CPU buffer is an ``mmap`` whose pages the kernel faults in and zeroes on first
    touch: for SmolLM2 and a 1k-token prompt (48 MB) that cost about 5x the copy of the prefix
    itself. Keeping up to ``max_buffers`` buffers (``max_bytes`` in all) makes it a plain copy.
    """

    def __init__(self, shape: KVShape, *, device: str | torch.device = "cpu", max_buffers: int = 8,
                 max_bytes: int = 512 * 2**20, granularity: int = 256) -> None:
        self.shape = shape
        self.device = torch.device(device)
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self.granularity = granularity
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, capacity: int) -> torch.Tensor:
        with self._lock:
            # _free is sorted by capacity: the first that fits is the smallest that fits.
            # NOTE: by index, never list.remove: that compares tensors with ``==``.
            for i, b in enumerate(self._free):
                if b.shape[3] >= capacity:
                    return self._free.pop(i)
        rounded = -(-capacity // self.granularity) * self.granularity
        s = self.shape
        return torch.empty((s.num_layers, 2, s.kv_heads, rounded, s.head_dim), dtype=s.dtype, device=self.device)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: b.shape[3])
            while self._free and (len(self._free) > self.max_buffers or self.held_bytes() > self.max_bytes):
                self._free.pop()  # the largest goes first

    def held_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._free)


class RequestCache(Cache):
    """One request's KV state, usable as ``model(..., cache=RequestCache(...))``."""

    def __init__(self, shape: KVShape, capacity: int, *, device: str | torch.device = "cpu",
                 buffer: torch.Tensor | None = None) -> None:
        if capacity < 1:
            raise InvalidParamsError("capacity", f"must be at least 1 token, got {capacity}", "size it prompt + max tokens")
        self.shape = shape
        if buffer is None:
            buffer = torch.empty(
                (shape.num_layers, 2, shape.kv_heads, capacity, shape.head_dim), dtype=shape.dtype, device=device
            )
        elif buffer.shape[3] < capacity:
            raise RuntimeError(f"buffer holds {buffer.shape[3]} tokens, {capacity} needed")
        self.buffer = buffer
        self._capacity = capacity
        super().__init__(layers=[_BufferLayer(self, i) for i in range(shape.num_layers)])

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def load_blocks(self, pool: KVPool, block_ids: Sequence[int]) -> int:
        """Fill the start of an empty cache with pool blocks; returns the tokens loaded."""
        if self.length:
            raise RuntimeError("load_blocks needs an empty cache")
        n = len(block_ids) * pool.block_size
        if n > self.capacity:
            raise RuntimeError(f"{n} prefix tokens exceed the buffer capacity {self.capacity}")
        pool.read(block_ids, self.buffer, 0)
        for layer in self.layers:
            layer.length = n
            layer._sync()
        return n

    def store_blocks(self, pool: KVPool, block_ids: Sequence[int], fresh: Sequence[bool], first_block: int) -> None:
        """Copy the buffer's blocks ``first_block, first_block + 1, ...`` into the fresh pool ids."""
        bs = pool.block_size
        if (first_block + len(block_ids)) * bs > self.length:
            raise RuntimeError("store_blocks past the computed tokens")
        group: list[int] = []
        start = 0
        for i, (b, f) in enumerate(zip(block_ids, fresh, strict=True)):
            if f:
                if not group:
                    start = i
                group.append(b)
            elif group:
                pool.write(group, self.buffer, (first_block + start) * bs)
                group = []
        if group:
            pool.write(group, self.buffer, (first_block + start) * bs)
