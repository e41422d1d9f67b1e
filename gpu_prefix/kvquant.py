"""INT8 storage of the paged KV pool: keys per channel, values per token (as KIVI found works
best), scales stored beside the blocks, dequantized where attention reads.

Layout (``L`` layers, ``H`` KV heads, ``S`` pool slots = ``num_blocks * block_size``, ``D`` head
dims):

- ``codes``: ``int8 [L, 2, H, S, D]``, the pool's usual layout;
- ``k_scale``: ``[L, H, num_blocks, D]``, one scale per (layer, head, block, channel): keys have
  outlier *channels*, so each channel gets its own scale, and a block is the unit a paged pool
  writes, shares and frees, so the scale lives with the block (no scale outlives or spans its
  block; a shared prefix block carries its own scales);
- ``v_scale``: ``[L, H, S]``, one scale per (layer, head, token): values have no channel
  outliers, and a token's scale is known when it is written.

Scales are stored in the model's dtype. Symmetric rounding to ``[-127, 127]``, ``scale = amax /
127``, so a value is off by at most half a step:

- V: ``|v - v̂| <= amax_token / 254``;
- K, a block written whole (prefill chunks end on block boundaries): ``|k - k̂| <= amax_c / 254``
  where ``amax_c`` is the channel's largest magnitude in the block;
- K, a block filled over several writes (decode): a later token larger than the channel's scale
  covers makes the block's channel scale grow, at least doubling (``s' = max(amax/127, 2 s)``),
  and the block's earlier codes are requantized to it. Each requantization adds at most half of
  the new step and the steps at least double, so the total error stays under the final step:
  ``|k - k̂| < s_final < 2 amax_c / 127`` (without growth it is ``<= amax_c / 254`` as above).

Layers the drift guard turned INT8 off for (``full_layers``) are stored in the model's dtype in
``full`` (``[F, 2, H, S, D]``), the others in ``codes`` and the scales (their rows in layer
order): one pool, one block table, each layer in its own storage.
"""

from __future__ import annotations

import torch

#: The largest code magnitude (symmetric int8).
QMAX = 127.0


def _safe_inv(scale: torch.Tensor) -> torch.Tensor:
    """``1 / scale``, and 0 where the scale is 0 (an all-zero channel or token)."""
    return torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))


def _codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x * _safe_inv(scale)).clamp_(-QMAX, QMAX).to(torch.int8)


def storage_key(full_layers: frozenset[int]) -> str:
    """The KV dtype an INT8 pool's block hashes carry: ``"int8"``, or with the layers kept in full
    precision named (``"int8+full:0,3"``), so blocks stored with different per-layer dtypes never
    match each other."""
    return "int8" if not full_layers else "int8+full:" + ",".join(map(str, sorted(full_layers)))


class QuantizedKV:
    """The INT8 pool's storage and its two operations: ``write`` (from ``PoolCache.update``)
    and ``read`` (from ``pool_attention``)."""

    def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device,
                 full_layers: frozenset[int] = frozenset()) -> None:
        slots = num_blocks * block_size
        if not full_layers <= set(range(num_layers)):
            raise ValueError(f"full_layers {sorted(full_layers)} are not all layers of a "
                             f"{num_layers}-layer model")
        self.num_layers = num_layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.full_layers = frozenset(full_layers)
        #: What block hashes carry as the KV dtype (:func:`storage_key`); the layers never change.
        self.key = storage_key(self.full_layers)
        #: Each layer's row in ``codes``/scales (INT8 layers) or in ``full`` (full-precision ones).
        self._row: dict[int, int] = {}
        for kind in (False, True):
            for i, layer in enumerate(x for x in range(num_layers)
                                      if (x in self.full_layers) == kind):
                self._row[layer] = i
        q = num_layers - len(self.full_layers)
        self.codes = torch.zeros((q, 2, kv_heads, slots, head_dim), dtype=torch.int8, device=device)
        self.k_scale = torch.zeros((q, kv_heads, num_blocks, head_dim), dtype=dtype, device=device)
        self.v_scale = torch.zeros((q, kv_heads, slots), dtype=dtype, device=device)
        self.full = torch.zeros((len(self.full_layers), 2, kv_heads, slots, head_dim), dtype=dtype,
                                device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.k_scale, self.v_scale,
                                                          self.full))

    def like(self, num_blocks: int, *, full_layers: frozenset[int] | None = None) -> QuantizedKV:
        """An empty storage of ``num_blocks`` blocks that quantizes as this one does: its scale
        rules (a fault planted in them too) and, unless given, its full-precision layers. The
        drift measures quantize in such scratch storage."""
        other = QuantizedKV(num_layers=self.num_layers, kv_heads=self.kv_heads,
                            head_dim=self.head_dim, num_blocks=num_blocks,
                            block_size=self.block_size, dtype=self.dtype, device=self.codes.device,
                            full_layers=self.full_layers if full_layers is None else full_layers)
        other.copy_rules_from(self)
        return other

    def copy_rules_from(self, other: QuantizedKV) -> None:
        """Quantize by ``other``'s scale rules: those planted on it (an instance's own
        ``k_scale_for``/``v_scale_for``; the class's need no copy). Only planted rules are
        copied: a bound method would keep ``other``, and all its storage, alive."""
        for name in ("k_scale_for", "v_scale_for"):
            if name in vars(other):
                setattr(self, name, vars(other)[name])

    # The two scale rules, as methods so a fault can be planted per layer (the guard's tests).
    def k_scale_for(self, layer: int, amax: torch.Tensor) -> torch.Tensor:
        """The per-channel K scale covering ``amax`` (``[H, blocks, D]``)."""
        return amax / QMAX

    def v_scale_for(self, layer: int, amax: torch.Tensor) -> torch.Tensor:
        """The per-token V scale covering ``amax`` (``[H, T]``)."""
        return amax / QMAX

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor) -> None:
        """Quantize ``key``/``value`` (``[H, T, D]``) into pool ``slots`` (``[T]``)."""
        row = self._row[layer]
        if layer in self.full_layers:
            self.full[row, 0].index_copy_(1, slots, key.to(self.dtype))
            self.full[row, 1].index_copy_(1, slots, value.to(self.dtype))
            return
        bs = self.block_size
        blocks = slots // bs
        uniq, inv = torch.unique(blocks, return_inverse=True)
        k_amax = torch.zeros((key.shape[0], len(uniq), key.shape[2]), dtype=self.dtype,
                             device=key.device)
        k_amax.scatter_reduce_(1, inv[None, :, None].expand_as(key), key.abs().to(self.dtype),
                               "amax")
        # A block is fresh when this write holds its first slot (a block's positions are written
        # in order from its first): whatever scale and codes it held belong to a former owner.
        fresh = torch.zeros(len(uniq), dtype=torch.bool, device=key.device)
        fresh[inv[slots % bs == 0]] = True
        old = self.k_scale[row][:, uniq, :]
        old = torch.where(fresh[None, :, None], torch.zeros_like(old), old)
        need = self.k_scale_for(layer, k_amax)
        grow = need > old
        new = torch.where(grow,
                          torch.maximum(need, torch.where(fresh[None, :, None], need, 2 * old)),
                          old)
        codes_k = self.codes[row, 0]
        regrow = (~fresh) & grow.any(dim=2).any(dim=0)
        if bool(regrow.any()):
            # Requantize the earlier codes of blocks whose scale grew to the new scale.
            rb = torch.nonzero(regrow).flatten()
            rslots = (uniq[rb][:, None] * bs
                      + torch.arange(bs, device=slots.device)[None, :]).flatten()
            ratio = (old[:, rb, :] * _safe_inv(new[:, rb, :])).repeat_interleave(bs, dim=1)
            requant = torch.round(codes_k.index_select(1, rslots).to(self.dtype)
                                  * ratio).clamp_(-QMAX, QMAX)
            codes_k.index_copy_(1, rslots, requant.to(torch.int8))
        self.k_scale[row][:, uniq, :] = new
        codes_k.index_copy_(1, slots, _codes(key.to(self.dtype), new[:, inv, :]))
        v = value.to(self.dtype)
        v_s = self.v_scale_for(layer, v.abs().amax(dim=-1))
        self.v_scale[row].index_copy_(1, slots, v_s)
        self.codes[row, 1].index_copy_(1, slots, _codes(v, v_s[..., None]))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V of pool ``slots`` (``[H, N, D]`` each), in a temporary."""
        row = self._row[layer]
        if layer in self.full_layers:
            return (self.full[row, 0].index_select(1, slots),
                    self.full[row, 1].index_select(1, slots))
        k = self.codes[row, 0].index_select(1, slots).to(self.dtype)
        k *= self.k_scale[row].index_select(1, slots // self.block_size)
        v = self.codes[row, 1].index_select(1, slots).to(self.dtype)
        v *= self.v_scale[row].index_select(1, slots)[..., None]
        return k, v
