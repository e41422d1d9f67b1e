"""Attention that reads the paged KV pool in place, plugged into transformers through its public
extension points: a ``Cache`` whose ``update()`` writes a step's new K/V through the slot
mapping into the pool, and an attention function (registered in ``AttentionInterface``) that
reads each sequence's K/V straight out of the pool by its block table.

One forward runs a packed step: every sequence's new tokens side by side in one row
(``input_ids`` of shape ``[1, T]``), each with its own position ids. ``StepLayout`` says which
packed tokens belong to which sequence, where each token's K/V goes in the pool, and which pool
slots hold each sequence's context.

Reading in place: a sequence's context is a list of runs of consecutive pool slots (its block
table, grouped). When it is one run (the allocator extends runs where it can), attention is one
``scaled_dot_product_attention`` over a view of the pool: no copy at all. With several runs (a
prefix shared with other requests, then the request's own blocks):

- a decode (one query) on the CPU attends to each run's view with the fused CPU attention kernel,
  which also returns each query's log-sum-exp, and merges the runs' outputs weighted by their
  log-sum-exp (the split-KV scheme of flash-decoding): nothing is copied;
- otherwise (a prefill chunk, or another device) the step gathers the context by slot index
  (``index_select``, into a temporary the layer drops) and runs SDPA on it.

No request keeps a private copy of its prefix: the pool is the only home of every K/V.

An INT8 pool (``gpu_prefix.kvquant``): ``update()`` quantizes the new K/V as it writes them, and
attention dequantizes each sequence's context slots into a temporary for the layer (one gather by
slot index), then runs SDPA on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gpu_prefix.kvquant import QuantizedKV

#: The name under which the pool attention is registered with transformers.
ATTN_IMPLEMENTATION = "provable_pool"

#: The keyword the engine passes the step layout under; it reaches the attention function
#: through the model's ``**kwargs`` (transformers forwards unknown keywords to attention).
LAYOUT_KWARG = "pool_layout"
#: ... and an INT8 pool's storage under this one.
QUANT_KWARG = "pool_quant"


@dataclass(frozen=True, kw_only=True, slots=True)
class SeqSlice:
    """One sequence's part of a packed step.

    ``q_start``/``q_len``: its new tokens' place in the packed row. ``ctx_len``: the tokens of
    context its queries see once this step's K/V are written (cached + computed + new). Its
    context is either one run of pool slots (``run``: first slot, then a view) or ``gather``,
    the slot of each position in order. ``mask``: the causal mask of a chunk whose queries start
    past position 0 (``None``: a decode, or ``is_causal`` from position 0).
    """

    q_start: int
    q_len: int
    ctx_len: int
    runs: tuple[tuple[int, int], ...]
    run: int | None
    gather: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass(frozen=True, kw_only=True, slots=True)
class StepLayout:
    """Where a packed step's tokens go and what each sequence reads."""

    write_slots: torch.Tensor  # [T] pool slot of each packed token's K/V
    seqs: tuple[SeqSlice, ...]


def seq_slice(*, q_start: int, q_len: int, ctx_len: int, table: Sequence[int], block_size: int,
              device: torch.device) -> SeqSlice:
    """The layout of one sequence whose context is the first ``ctx_len`` positions of
    ``table`` (its block table) and whose queries are the last ``q_len`` of them."""
    runs = slot_runs(table, block_size, ctx_len)
    gather = None
    if len(runs) > 1 and not (q_len == 1 and device.type == "cpu" and _FLASH_CPU is not None):
        blocks = torch.tensor(table[: -(-ctx_len // block_size)], dtype=torch.long)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).flatten(
            )[:ctx_len]
        gather = slots.to(device)
    mask = None
    q_pos0 = ctx_len - q_len
    if q_len > 1 and q_pos0 > 0:
        mask = (torch.arange(ctx_len, device=device)[None, :]
                <= (q_pos0 + torch.arange(q_len, device=device))[:, None])
    return SeqSlice(q_start=q_start, q_len=q_len, ctx_len=ctx_len, runs=runs,
                    run=runs[0][0] if len(runs) == 1 else None, gather=gather, mask=mask)


def slot_runs(block_ids: Sequence[int], block_size: int,
              n_tokens: int) -> tuple[tuple[int, int], ...]:
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
        raise RuntimeError(f"block table holds {n_tokens - left} of the {n_tokens} positions asked "
                           "for")
    return tuple((a, n) for a, n in runs)


class PoolCache(Cache):
    """The step's cache: ``update()`` writes the new K/V into the pool through the layout's slot
    mapping. The attention function then reads them (with the context) from the pool."""

    def __init__(self, pool_tensor: torch.Tensor, layout: StepLayout,
                 quant: QuantizedKV | None = None) -> None:
        super().__init__(layers=[])
        self.pool_tensor = pool_tensor
        self.layout = layout
        self.quant = quant

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.layout.write_slots
        if self.quant is not None:
            self.quant.write(layer_idx, slots, key_states[0], value_states[0])
            return key_states, value_states
        layer = self.pool_tensor[layer_idx]
        # key_states: [1, kv_heads, T, head_dim]; the pool's layer K/V: [kv_heads, slots, head_dim].
        layer[0].index_copy_(1, slots, key_states[0].to(layer.dtype))
        layer[1].index_copy_(1, slots, value_states[0].to(layer.dtype))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


#: The fused CPU attention kernel that returns the log-sum-exp beside the output (what SDPA runs
#: on the CPU); ``None`` where this torch build lacks it, and then decodes gather too.
_FLASH_CPU: Callable[..., Any] | None = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _decode_over_runs(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                      runs: tuple[tuple[int, int], ...], scale: float) -> torch.Tensor:
    """One query per head (``q``: ``[1, heads, 1, d]``) over several runs of pool slots, each
    read as a view; returns ``[1, heads, 1, d]``."""
    assert _FLASH_CPU is not None, "the caller checks that the kernel exists"
    heads, d = q.shape[1], q.shape[3]
    kv_heads = k_all.shape[0]
    # Grouped-query attention without repeating K/V: the heads sharing a K/V head become that
    # head's queries (one position, so no causal mask is involved).
    qg = q.reshape(1, kv_heads, heads // kv_heads, d)
    outs, lses = [], []
    for a, n in runs:
        o, lse = _FLASH_CPU(qg, k_all[None, :, a : a + n].to(q.dtype),
                            v_all[None, :, a : a + n].to(q.dtype),
                            scale=scale)[:2]
        outs.append(o)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses).float(), dim=0).to(q.dtype)[..., None]
    return (torch.stack(outs) * weights).sum(dim=0).reshape(1, heads, 1, d)


def pool_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0,
                   scaling: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function. Without a step layout (a plain forward of the same
    model elsewhere) it is transformers' SDPA attention, mask and all."""
    layout: StepLayout | None = kwargs.pop(LAYOUT_KWARG, None)
    pool_tensor: torch.Tensor | None = kwargs.pop("pool_tensor", None)
    quant: QuantizedKV | None = kwargs.pop(QUANT_KWARG, None)
    if layout is None or pool_tensor is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer_idx = cast(int, module.layer_idx)
    if quant is not None:
        return _quantized_attention(layer_idx, query, quant, layout, scale), None
    k_all = pool_tensor[layer_idx, 0]  # [kv_heads, slots, head_dim]
    v_all = pool_tensor[layer_idx, 1]
    heads, total, d = query.shape[1], query.shape[2], query.shape[3]
    out = torch.empty((1, total, heads, d), dtype=query.dtype, device=query.device)
    for s in layout.seqs:
        q = query[:, :, s.q_start : s.q_start + s.q_len, :]
        if s.run is not None:  # one run: a view of the pool, no copy
            k = k_all[None, :, s.run : s.run + s.ctx_len, :]
            v = v_all[None, :, s.run : s.run + s.ctx_len, :]
        elif s.gather is None:  # a decode over several runs: views merged by log-sum-exp
            out[0, s.q_start] = _decode_over_runs(q, k_all, v_all, s.runs, scale)[0, :, 0]
            continue
        else:
            k = k_all.index_select(1, s.gather)[None]
            v = v_all.index_select(1, s.gather)[None]
        o = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=s.mask, scale=scale,
            is_causal=s.mask is None and s.q_len > 1, enable_gqa=True)
        out[0, s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out, None


def _context_slots(s: SeqSlice, device: torch.device) -> torch.Tensor:
    """The pool slot of each of a sequence's context positions, in order."""
    if s.gather is not None:
        return s.gather
    return torch.cat([torch.arange(a, a + n, device=device) for a, n in s.runs])


def _quantized_attention(layer: int, query: torch.Tensor, quant: QuantizedKV, layout: StepLayout,
                         scale: float) -> torch.Tensor:
    """Attention over an INT8 pool: each sequence's context dequantized into a temporary."""
    heads, total, d = query.shape[1], query.shape[2], query.shape[3]
    out = torch.empty((1, total, heads, d), dtype=query.dtype, device=query.device)
    for s in layout.seqs:
        q = query[:, :, s.q_start : s.q_start + s.q_len, :]
        k, v = quant.read(layer, _context_slots(s, query.device))
        o = F.scaled_dot_product_attention(
            q, k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=s.mask, scale=scale,
            is_causal=s.mask is None and s.q_len > 1, enable_gqa=True)
        out[0, s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out


def install(model: Any) -> None:
    """Route ``model``'s attention through :func:`pool_attention` (idempotent). A forward without
    a step layout still runs transformers' SDPA attention, so the model stays usable as is."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, pool_attention)
    # NOTE: the mask function too: without one transformers builds no mask for this name, and a
    # plain forward of several tokens over a cache would run SDPA's is_causal, which aligns the
    # causal mask to the top left (each new token would see only the first keys).
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def packed_forward(model: Any, pool_tensor: torch.Tensor, input_ids: Sequence[int],
                   positions: Sequence[int],
                   layout: StepLayout, keep: Sequence[int],
                   quant: QuantizedKV | None = None) -> torch.Tensor:
    """One forward over a packed step; returns the logits of the packed positions in ``keep``
    (``[len(keep), vocab]``). ``quant``: the pool's INT8 storage, when it is one."""
    device = pool_tensor.device
    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=device)
    pos = torch.tensor([list(positions)], dtype=torch.long, device=device)
    # NOTE: a 4-D mask is taken as prepared and passed through unread: the layout is the mask.
    no_mask = torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)
    out = model(input_ids=ids, position_ids=pos, attention_mask=no_mask,
                cache=PoolCache(pool_tensor, layout, quant),
                use_cache=True,
                logits_to_keep=torch.tensor(list(keep), dtype=torch.long, device=device),
                **{LAYOUT_KWARG: layout, "pool_tensor": pool_tensor, QUANT_KWARG: quant})
    logits: torch.Tensor = out.logits[0]
    return logits
