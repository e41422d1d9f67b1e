"""Attention that reads the paged KV pool in place, plugged into transformers through its public
extension points: a ``Cache`` whose ``update()`` writes a step's new K/V through the slot
mapping into the pool, and an attention function (registered in ``AttentionInterface``) that
reads each sequence's K/V straight out of the pool by its block table.

One forward runs a packed step: every sequence's new tokens side by side in one row
(``input_ids`` of shape ``[1, T]``), each with its own position ids. ``StepLayout`` says which
packed tokens belong to which sequence, where each token's K/V goes in the pool, and which pool
slots hold each sequence's context.

Reading in place: a sequence's context is a list of runs of consecutive pool slots (its block
table, grouped). Each run is a view of the pool tensor, never a copy. With one run, attention is
one ``scaled_dot_product_attention`` over that view; with several (a prefix shared with other
requests, then the request's own blocks), attention is computed per run and the partial results
are merged by their log-sum-exp, the split-KV scheme of flash-decoding. No request copies its
prefix out of the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

#: The name under which the pool attention is registered with transformers.
ATTN_IMPLEMENTATION = "provable_pool"

#: The keyword the engine passes the step layout under; it reaches the attention function
#: through the model's ``**kwargs`` (transformers forwards unknown keywords to attention).
LAYOUT_KWARG = "pool_layout"


@dataclass(frozen=True, kw_only=True, slots=True)
class SeqSlice:
    """One sequence's part of a packed step.

    ``q_start``/``q_len``: its new tokens' place in the packed row. ``ctx_len``: the tokens of
    context its queries see once this step's K/V are written (cached + computed + new). ``runs``:
    ``(first_slot, n_slots)`` of consecutive pool slots covering positions ``0..ctx_len-1`` in
    order.
    """

    q_start: int
    q_len: int
    ctx_len: int
    runs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class StepLayout:
    """Where a packed step's tokens go and what each sequence reads."""

    write_slots: torch.Tensor  # [T] pool slot of each packed token's K/V
    seqs: tuple[SeqSlice, ...]


def slot_runs(block_ids: Sequence[int], block_size: int, n_tokens: int) -> tuple[tuple[int, int], ...]:
    """The first ``n_tokens`` positions of a block table as runs of consecutive pool slots."""
    runs: list[list[int]] = []
    left = n_tokens
    for b in block_ids:
        if left <= 0:
            break
        n = min(block_size, left)
        start = b * block_size
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += n
        else:
            runs.append([start, n])
        left -= n
    if left > 0:
        raise RuntimeError(f"block table holds {n_tokens - left} of the {n_tokens} positions asked for")
    return tuple((a, n) for a, n in runs)


class PoolCache(Cache):
    """The step's cache: ``update()`` writes the new K/V into the pool through the layout's slot
    mapping. The attention function then reads them (with the context) from the pool."""

    def __init__(self, pool_tensor: torch.Tensor, layout: StepLayout) -> None:
        super().__init__(layers=[])
        self.pool_tensor = pool_tensor
        self.layout = layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.layout.write_slots
        layer = self.pool_tensor[layer_idx]
        # key_states: [1, kv_heads, T, head_dim]; the pool's layer K/V: [kv_heads, slots, head_dim].
        layer[0].index_copy_(1, slots, key_states[0].to(layer.dtype))
        layer[1].index_copy_(1, slots, value_states[0].to(layer.dtype))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _attend_runs(q: torch.Tensor, k_runs: list[torch.Tensor], v_runs: list[torch.Tensor], *,
                 q_pos0: int, scale: float) -> torch.Tensor:
    """Attention of ``q`` ``[H, q_len, d]`` over K/V given as consecutive runs of positions
    (each ``[kv_heads, n, d]``, in position order), causal for queries at positions
    ``q_pos0 ..``; returns ``[H, q_len, d]``."""
    heads, q_len, d = q.shape
    kv_heads = k_runs[0].shape[0]
    group = heads // kv_heads
    qg = q.reshape(kv_heads, group * q_len, d).float()
    q_pos = (q_pos0 + torch.arange(q_len, device=q.device)).repeat(group)  # row r is query r % q_len
    acc = norm = top = None
    k_pos0 = 0
    for k, v in zip(k_runs, v_runs, strict=True):
        n = k.shape[1]
        s = torch.matmul(qg, k.transpose(1, 2).float()) * scale  # [kv_heads, group*q_len, n]
        if k_pos0 + n - 1 > q_pos0:  # some key of this run lies after some query: mask it
            k_pos = k_pos0 + torch.arange(n, device=q.device)
            s = s.masked_fill((k_pos[None, :] > q_pos[:, None])[None], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a fully masked row adds nothing
        p = torch.exp(s - m)
        o = torch.matmul(p, v.float())
        l = p.sum(dim=-1, keepdim=True)
        if acc is None:
            acc, norm, top = o, l, m
        else:
            new_top = torch.maximum(top, m)
            a, b = torch.exp(top - new_top), torch.exp(m - new_top)
            acc = acc * a + o * b
            norm = norm * a + l * b
            top = new_top
        k_pos0 += n
    out = acc / norm
    return out.reshape(heads, q_len, d).to(q.dtype)


def pool_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function. Without a step layout (a plain forward of the same
    model elsewhere) it is transformers' SDPA attention, mask and all."""
    layout: StepLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    pool_tensor: torch.Tensor | None = kwargs.pop("pool_tensor", None)
    if layout is None or pool_tensor is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    k_all = pool_tensor[module.layer_idx, 0]  # [kv_heads, slots, head_dim]
    v_all = pool_tensor[module.layer_idx, 1]
    heads, total, d = query.shape[1], query.shape[2], query.shape[3]
    out = torch.empty((1, total, heads, d), dtype=query.dtype, device=query.device)
    for s in layout.seqs:
        q = query[0, :, s.q_start : s.q_start + s.q_len, :]
        k_runs = [k_all[:, a : a + n, :] for a, n in s.runs]
        v_runs = [v_all[:, a : a + n, :] for a, n in s.runs]
        q_pos0 = s.ctx_len - s.q_len
        if len(s.runs) == 1:
            # One run: SDPA straight over the pool view.
            k, v = k_runs[0][None], v_runs[0][None]
            if s.q_len == 1 or q_pos0 == 0:
                o = F.scaled_dot_product_attention(q[None], k.to(q.dtype), v.to(q.dtype), scale=scale,
                                                   is_causal=s.q_len > 1, enable_gqa=True)
            else:
                causal = (torch.arange(s.ctx_len, device=q.device)[None, :]
                          <= (q_pos0 + torch.arange(s.q_len, device=q.device))[:, None])
                o = F.scaled_dot_product_attention(q[None], k.to(q.dtype), v.to(q.dtype), attn_mask=causal,
                                                   scale=scale, enable_gqa=True)
            o = o[0]
        else:
            o = _attend_runs(q, k_runs, v_runs, q_pos0=q_pos0, scale=scale)
        out[0, s.q_start : s.q_start + s.q_len] = o.transpose(0, 1)
    return out, None


def install(model: Any) -> None:
    """Route ``model``'s attention through :func:`pool_attention` (idempotent). A forward without
    a step layout still runs transformers' SDPA attention, so the model stays usable as is."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, pool_attention)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def packed_forward(model: Any, pool_tensor: torch.Tensor, input_ids: Sequence[int], positions: Sequence[int],
                   layout: StepLayout, keep: Sequence[int]) -> torch.Tensor:
    """One forward over a packed step; returns the logits of the packed positions in ``keep``
    (``[len(keep), vocab]``)."""
    device = pool_tensor.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    pos = torch.tensor([list(positions)], dtype=torch.long, device=device)
    # NOTE: a 4-D mask is taken as prepared and passed through unread: the layout is the mask.
    no_mask = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)
    out = model(input_ids=ids, position_ids=pos, attention_mask=no_mask, cache=PoolCache(pool_tensor, layout),
                use_cache=True, logits_to_keep=torch.tensor(list(keep), dtype=torch.long, device=device),
                **{LAYOUT_KWARG: layout, "pool_tensor": pool_tensor})
    return out.logits[0]
