"""JSON responses rendered with orjson (FastAPI deprecated its own ORJSONResponse), and the hit
path's responses, whose body and headers are encoded once per entry rather than per request."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse, Response

from cachesvc.memo import Memo
from cachesvc.response_cache import Payload


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


_JSON = (b"content-type", b"application/json")


class EncodedJsonResponse(Response):
    """A 200 JSON response of bytes already encoded, with headers already encoded (lower-case
    names): the same bytes on the wire as ``OrjsonResponse``, nothing rendered per request."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [*headers, (b"content-length", b"%d" % len(body)), _JSON]


class EncodedBodies:
    """The JSON body of each hot entry's answer, encoded once per entry and kind.

    Keyed by the identity of the entry's decoded answer (the response cache's entry memo hands
    out the same objects for the same stored bytes), which this memo also keeps alive, so an
    identity is never reused while it is remembered.

    NOTE: entries are read-only once decoded; nothing on the request path changes one.
    """

    def __init__(self, *, max_items: int = 8192, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._memo: Memo[tuple[object, bytes]] = Memo(max_items=max_items, max_bytes=max_bytes)

    def body(self, payload: Payload, kind: str) -> bytes:
        held: object = payload.body if payload.body is not None else payload.chunks
        key = (id(held), kind)
        found = self._memo.get(key)
        if found is not None and found[0] is held:
            return found[1]
        raw = orjson.dumps(payload.as_body(kind), option=orjson.OPT_NON_STR_KEYS)
        self._memo.put(key, (held, raw), len(raw))
        return raw
