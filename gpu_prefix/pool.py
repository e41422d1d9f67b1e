"""The paged KV pool: one preallocated tensor holding every layer's K and V for each block.

Layout ``[layers, 2, kv_heads, num_blocks * block_size, head_dim]``: per layer, K and V are each
``[kv_heads, slots, head_dim]``, the layout attention that reads the pool in place wants (a
block-major layout would force a copy per step): a run of consecutive blocks is one strided view
per layer, which ``gpu_prefix.attention`` reads without copying. The allocator keeps a
request's blocks in long runs: it hands out the block right after the request's last one when
that is free; when it is not, the middle of a free stretch (so the request has room to grow
there, and a neighbour growing beside it does not interleave with it); otherwise the lowest free
block.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpu_prefix.capacity import int8_block_bytes
from gpu_prefix.errors import InvalidParamsError, PoolExhaustedError
from gpu_prefix.kvquant import QuantizedKV

#: What a pool stores: the model's own dtype ("full"), or INT8 codes with scales (``kvquant``).
KV_DTYPES = ("full", "int8")


@dataclass(frozen=True, kw_only=True, slots=True)
class KVShape:
    """The geometry of one model's KV state."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype) -> KVShape:
        """From a transformers config (any model's: read by attribute name)."""
        text = config.get_text_config(decoder=True) if hasattr(
            config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            num_layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype,
        )

    def bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.kv_heads * self.head_dim * elem


#: Blocks a request that must start a new run gets room to grow into (see ``KVPool.allocate``).
EXTENT = 8
_STRETCH = b"\x01" * (2 * EXTENT)


def runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group block ids into maximal runs of consecutive ids: ``(position, first_id, length)``."""
    out: list[tuple[int, int, int]] = []
    for pos, b in enumerate(ids):
        if out and out[-1][1] + out[-1][2] == b:
            p, first, n = out[-1]
            out[-1] = (p, first, n + 1)
        else:
            out.append((pos, b, 1))
    return out


class KVPool:
    """Fixed-size block storage on one device. Knows nothing of hashes; see ``PrefixStore``."""

    def __init__(
        self,
        shape: KVShape,
        *,
        budget_bytes: int,
        block_size: int = 16,
        device: str | torch.device = "cpu",
        kv_dtype: str = "full",
        full_layers: frozenset[int] = frozenset(),
    ) -> None:
        if block_size < 1:
            raise InvalidParamsError("block_size", f"must be at least 1, got {block_size}",
                                     "use 16")
        if kv_dtype not in KV_DTYPES:
            raise InvalidParamsError("kv_dtype", f"unknown KV storage {kv_dtype!r}",
                                     f"use one of {', '.join(KV_DTYPES)}")
        self.shape = shape
        self.block_size = block_size
        self.kv_dtype = kv_dtype
        if full_layers and kv_dtype != "int8":
            raise InvalidParamsError("full_layers",
                                     "names layers kept in full precision in an INT8 pool",
                                     "use it with kv_dtype int8")
        if kv_dtype == "int8":
            scale_bytes = torch.empty((), dtype=shape.dtype).element_size()
            self.block_bytes = int8_block_bytes(layers=shape.num_layers, kv_heads=shape.kv_heads,
                                                head_dim=shape.head_dim, block_size=block_size,
                                                scale_bytes=scale_bytes,
                                                full_layers=len(full_layers))
        else:
            self.block_bytes = shape.bytes_per_token() * block_size
        self.num_blocks = int(budget_bytes) // self.block_bytes
        if self.num_blocks < 1:
            raise InvalidParamsError(
                "budget_bytes",
                f"{budget_bytes} bytes hold no block of {self.block_bytes} bytes "
                f"({shape.num_layers} layers x 2 x {shape.kv_heads} heads x {block_size} tokens "
                f"x {shape.head_dim} dims)",
                f"give at least {self.block_bytes} bytes",
            )
        self.device = torch.device(device)
        # NOTE: allocated once, up front: the pool never grows past its budget, and a burst
        # cannot make the process ask the device for more memory on the cache's behalf.
        self.quant: QuantizedKV | None = None
        if kv_dtype == "int8":
            self.quant = QuantizedKV(num_layers=shape.num_layers, kv_heads=shape.kv_heads,
                                     head_dim=shape.head_dim,
                                     num_blocks=self.num_blocks, block_size=block_size,
                                     dtype=shape.dtype,
                                     device=self.device, full_layers=frozenset(full_layers))
            self.tensor = self.quant.codes
        else:
            self.tensor = torch.zeros(
                (shape.num_layers, 2, shape.kv_heads, self.num_blocks * block_size, shape.head_dim),
                dtype=shape.dtype,
                device=self.device,
            )
        # A min-heap of free ids with lazy deletion: ``_is_free`` (1 = free, a bytearray so
        # ``find`` can look for free stretches in C) is the truth, and a heap entry whose block
        # was since taken out of order is skipped when popped.
        self._heap: list[int] = list(range(self.num_blocks))
        self._is_free = bytearray(b"\x01") * self.num_blocks
        self._num_free = self.num_blocks

    @property
    def kv_key(self) -> str:
        """The KV dtype its blocks' hashes carry: ``"full"``, ``"int8"``, or INT8 with the layers
        kept in full precision named (``kvquant.storage_key``)."""
        return self.quant.key if self.quant is not None else "full"

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def allocate(self, after: int | None = None) -> int:
        """A free block for a request whose last block is ``after`` (``None``: its first)."""
        if self._num_free == 0:
            raise PoolExhaustedError("no free KV block; evict first")
        b = -1
        if after is not None:
            if after + 1 < self.num_blocks and self._is_free[after + 1]:
                b = after + 1
            else:
                stretch = self._is_free.find(_STRETCH)
                if stretch >= 0:
                    b = stretch + EXTENT
        if b < 0:
            b = heapq.heappop(self._heap)
            while not self._is_free[b]:
                b = heapq.heappop(self._heap)
        self._is_free[b] = 0
        self._num_free -= 1
        if len(self._heap) > 2 * self.num_blocks:
            self._heap = [i for i in range(self.num_blocks) if self._is_free[i]]
        return b

    def free(self, block: int) -> None:
        if self._is_free[block]:
            raise RuntimeError(f"block {block} freed twice")
        self._is_free[block] = 1
        self._num_free += 1
        heapq.heappush(self._heap, block)

    def view(self, block_ids: Sequence[int]) -> list[torch.Tensor]:
        """Views (no copies) of the pool over ``block_ids``, one per run of consecutive ids, each
        ``[layers, 2, kv_heads, run_tokens, head_dim]``."""
        bs = self.block_size
        return [self.tensor[:, :, :, first * bs : (first + n) * bs,
                            :] for _, first, n in runs(block_ids)]

    def check_valid(self) -> None:
        assert sum(self._is_free) == self._num_free, "free count and free flags disagree"
        assert {b for b in self._heap if self._is_free[b]} == {
            b for b in range(self.num_blocks) if self._is_free[b]
        }, "a free block is missing from the free heap"
        nbytes = self.quant.nbytes if self.quant is not None else self.tensor.numel(
            ) * self.tensor.element_size()
        assert nbytes == self.capacity_bytes, "pool size drifted"
