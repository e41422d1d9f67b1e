"""KV memory arithmetic: bytes per token, blocks, and how many sessions fit.

The seed's example: a 7B model (32 layers, 32 KV heads of 128 dims, fp16) keeps
``32 x 2 x 32 x 128 x 2 bytes = 0.5 MiB`` of K/V per token; with 14 GB of weights on a 24 GB
device, 10 GB hold about 20,000 tokens, i.e. 20 sessions of 1,000 tokens, and 16 under an 80%
admission watermark. ``cachesvc capacity`` prints this for any model; the engine sizes its pool
with :func:`pool_plan` and logs the figures at start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gpu_prefix.errors import InvalidParamsError

#: Bytes per element of the KV dtypes the pool can hold.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}

#: Model geometries for ``cachesvc capacity --model`` without a config file at hand:
#: (layers, kv heads, head dim, parameters).
KNOWN_MODELS: dict[str, tuple[int, int, int, float]] = {
    "llama-2-7b": (32, 32, 128, 6.74e9),
    "llama-3-8b": (32, 8, 128, 8.03e9),
    "mistral-7b": (32, 8, 128, 7.24e9),
    "smollm2": (30, 3, 64, 1.35e8),
    "random-tiny": (2, 2, 16, 1.6e5),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolPlan:
    """What a KV budget holds."""

    kv_bytes_per_token: float  # a fraction for INT8, whose K scales are per block
    block_size: int
    block_bytes: int
    pool_bytes: int
    num_blocks: int
    pool_tokens: int
    high_watermark: float
    admit_blocks: int
    admit_tokens: int

    def sessions(self, tokens_per_session: int) -> tuple[int, int]:
        """Sessions of ``tokens_per_session`` tokens that fit: in the whole pool, and under the
        admission watermark (each session's last block is partial, so it rounds up)."""
        per = -(-tokens_per_session // self.block_size)
        return self.num_blocks // per, self.admit_blocks // per

    def as_log(self) -> dict[str, Any]:
        return asdict(self)


def pool_plan(*, kv_bytes_per_token: int | None = None, pool_bytes: int, block_size: int = 16,
              high_watermark: float = 0.8, block_bytes: int | None = None) -> PoolPlan:
    """The pool a byte budget gives (the same rounding ``KVPool`` applies), from the bytes of a
    token or (INT8, whose K scales are per block) of a block."""
    if block_size < 1:
        raise InvalidParamsError("block_size", f"must be at least 1, got {block_size}", "use 16")
    if not 0.0 < high_watermark <= 1.0:
        raise InvalidParamsError("high_watermark", f"must be in (0, 1], got {high_watermark}",
                                 "use 0.8")
    if block_bytes is None:
        if kv_bytes_per_token is None:
            raise InvalidParamsError("kv_bytes_per_token", "missing",
                                     "give kv_bytes_per_token or block_bytes")
        block_bytes = kv_bytes_per_token * block_size
    per_token = kv_bytes_per_token if kv_bytes_per_token is not None else block_bytes / block_size
    blocks = max(0, int(pool_bytes)) // block_bytes
    admit = max(1, int(high_watermark * blocks)) if blocks else 0
    return PoolPlan(
        kv_bytes_per_token=per_token, block_size=block_size, block_bytes=block_bytes,
        pool_bytes=blocks * block_bytes, num_blocks=blocks, pool_tokens=blocks * block_size,
        high_watermark=high_watermark, admit_blocks=admit, admit_tokens=admit * block_size,
    )


def kv_bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of every layer for one token."""
    for name, v in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                    ("dtype_bytes", dtype_bytes)):
        if v < 1:
            raise InvalidParamsError(name, f"must be at least 1, got {v}",
                                     "give the model's geometry")
    return layers * 2 * kv_heads * head_dim * dtype_bytes


def int8_block_bytes(*, layers: int, kv_heads: int, head_dim: int, block_size: int,
                     scale_bytes: int,
                     full_layers: int = 0) -> int:
    """Bytes of one INT8 pool block (``gpu_prefix.kvquant``): K and V codes (one byte each), the
    block's per-channel K scales and its tokens' V scales, over every layer and KV head; of the
    ``layers``, ``full_layers`` (the drift guard turned INT8 off for them) hold K and V in the
    model's dtype (``scale_bytes`` each) instead."""
    per_head = 2 * block_size * head_dim + head_dim * scale_bytes + block_size * scale_bytes
    full_per_head = 2 * block_size * head_dim * scale_bytes
    return (layers - full_layers) * kv_heads * per_head + full_layers * kv_heads * full_per_head


def block_bytes_for(*, layers: int, kv_heads: int, head_dim: int, block_size: int, kv_dtype: str,
                    scale_bytes: int = 2) -> int:
    """Bytes of one pool block of ``kv_dtype`` (one of ``DTYPE_BYTES``); INT8 blocks carry their
    scales, ``scale_bytes`` each (the model's dtype: 2 for fp16/bf16, 4 for fp32)."""
    if kv_dtype not in DTYPE_BYTES:
        raise InvalidParamsError("kv_dtype", f"unknown KV dtype {kv_dtype!r}",
                                 f"use one of {', '.join(DTYPE_BYTES)}")
    if kv_dtype == "int8":
        return int8_block_bytes(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                block_size=block_size,
                                scale_bytes=scale_bytes)
    return kv_bytes_per_token(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                              dtype_bytes=DTYPE_BYTES[kv_dtype]) * block_size


def device_plan(*, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, device_bytes: int,
                weights_bytes: int, block_size: int = 16, high_watermark: float = 0.8,
                reserve_bytes: int = 0, block_bytes: int | None = None) -> PoolPlan:
    """The pool that fits on a device of ``device_bytes`` next to ``weights_bytes`` of weights
    (and ``reserve_bytes`` kept for activations)."""
    free = device_bytes - weights_bytes - reserve_bytes
    if free <= 0:
        raise InvalidParamsError(
            "device_memory",
            f"{device_bytes} bytes hold no KV next to {weights_bytes} bytes of weights"
            f" and {reserve_bytes} reserved",
            "use a larger device, a smaller model, or quantized weights")
    if block_bytes is not None:
        return pool_plan(block_bytes=block_bytes, pool_bytes=free, block_size=block_size,
                         high_watermark=high_watermark)
    per_token = kv_bytes_per_token(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                   dtype_bytes=dtype_bytes)
    return pool_plan(kv_bytes_per_token=per_token, pool_bytes=free, block_size=block_size,
                     high_watermark=high_watermark)


def parse_bytes(text: str, *, field: str) -> int:
    """``"24GB"``, ``"14 GiB"``, ``"512MiB"``, ``"1e9"`` -> bytes (GB = 10^9, GiB = 2^30)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abgikmtb")  # noqa: B005 - strips any run of unit letters, as meant
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise InvalidParamsError(field, f"cannot read {text!r} as a size",
                                 "write e.g. 24GB or 512MiB") from None
    if unit not in units or value < 0:
        raise InvalidParamsError(field, f"cannot read {text!r} as a size",
                                 "write e.g. 24GB or 512MiB")
    return int(value * units[unit])
