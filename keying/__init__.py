"""keying: pure functions from a request to its canonical form, key material and digests.

No I/O, and nothing else of this project is imported here.
"""

from keying.cacheability import Cacheability, assess
from keying.canonical import (
    UNKEYED_FIELDS,
    CanonicalRequest,
    KeyLimits,
    RequestKind,
    canonicalize,
    detect_kind,
)
from keying.errors import (
    InvalidMaterialError,
    InvalidRequestError,
    KeyingError,
    RequestTooLargeError,
)
from keying.escape import escape_component
from keying.framing import (
    DEFAULT_MATERIAL_SECRET,
    frame,
    hash_block_tokens,
    material_digest,
    response_digest,
    xxh3_128,
)
from keying.material import (
    MATERIAL_VERSION,
    KeyParams,
    KeyResult,
    MaterialParts,
    build_key,
    decode_material,
    encode_material,
    rebuild_key,
)
from keying.scope import Scope, ScopeKind
from keying.types import BlockHash, MaterialDigest, ResponseDigest

__all__ = [
    "DEFAULT_MATERIAL_SECRET",
    "MATERIAL_VERSION",
    "UNKEYED_FIELDS",
    "BlockHash",
    "Cacheability",
    "CanonicalRequest",
    "InvalidMaterialError",
    "InvalidRequestError",
    "KeyLimits",
    "KeyParams",
    "KeyResult",
    "KeyingError",
    "MaterialParts",
    "MaterialDigest",
    "RequestKind",
    "RequestTooLargeError",
    "ResponseDigest",
    "Scope",
    "ScopeKind",
    "assess",
    "build_key",
    "canonicalize",
    "decode_material",
    "detect_kind",
    "encode_material",
    "escape_component",
    "frame",
    "hash_block_tokens",
    "material_digest",
    "rebuild_key",
    "response_digest",
    "xxh3_128",
]
