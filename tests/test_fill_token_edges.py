"""Edges of fill tokens that the service tests do not reach: the secret's minimum length, the
default expiry, expiry at the exact second, a payload signed but not of this format, and the
error's field and fix.

Written from a mutation run (``make mutation``, README).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Any

import orjson
import pytest

from cachesvc.errors import UnprocessableError
from cachesvc.fill_token import FillGrant, FillTokenSigner

SECRET = b"k" * 32
FIELDS: dict[str, Any] = dict(tenant="t", scope=["tenant", "t", None], digest=b"\x01" * 16,
                              material_digest=b"\x02" * 32, model="m", epoch=7, stream=True,
                              ttl_seconds=60)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def forge(payload: list[Any], secret: bytes = SECRET) -> str:
    """A token with a valid signature over ``payload``: a signer's bug, not a forgery."""
    raw = orjson.dumps(payload)
    key = hashlib.blake2b(secret, person=b"cachesvc-fill").digest()
    return b64(raw) + "." + b64(hmac.new(key, raw, hashlib.sha256).digest())


class TestSigning:
    def test_a_secret_of_sixteen_bytes_is_enough_and_fifteen_is_not(self) -> None:
        FillTokenSigner(b"k" * 16)
        with pytest.raises(ValueError, match=r"^fill token secret must be at least 16 bytes$"):
            FillTokenSigner(b"k" * 15)

    def test_a_token_expires_its_ttl_after_signing_by_default(self) -> None:
        clock = Clock(1000.0)
        s = FillTokenSigner(SECRET, ttl_s=30.0, clock=clock)
        grant = s.verify(s.sign(**FIELDS))
        assert grant == FillGrant(**FIELDS, expires_at=1030.0)
        clock.t = 1030.0
        assert s.verify(s.sign(grant)).expires_at == 1030.0  # valid up to the second itself
        clock.t = 1030.001
        with pytest.raises(UnprocessableError, match=r"^fill_token has expired$"):
            s.verify(s.sign(grant))

    def test_an_explicit_expiry_is_kept(self) -> None:
        s = FillTokenSigner(SECRET, clock=Clock(0.0))
        assert s.verify(s.sign(**FIELDS, expires_at=5.0)).expires_at == 5.0

    def test_the_default_lifetime_is_five_minutes(self) -> None:
        s = FillTokenSigner(SECRET, clock=Clock(0.0))
        assert s.verify(s.sign(**FIELDS)).expires_at == 300.0

    def test_every_bound_field_reads_back(self) -> None:
        s = FillTokenSigner(SECRET, clock=Clock())
        g = s.verify(s.sign(**FIELDS))
        assert (g.tenant, g.scope, g.digest, g.material_digest, g.model, g.epoch, g.stream,
                g.ttl_seconds) == ("t", ["tenant", "t", None], b"\x01" * 16, b"\x02" * 32, "m",
                                   7, True, 60)

    def test_a_token_is_its_payload_and_mac_in_unpadded_url_safe_base64(self) -> None:
        s = FillTokenSigner(SECRET, clock=Clock(0.0))
        token = s.sign(**FIELDS)
        assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
        assert token == forge(["ft1", "t", ["tenant", "t", None], "01" * 16, "02" * 32, "m", 7,
                               True, 300.0, 60])


class TestRefusals:
    def test_the_error_names_the_field_and_the_fix(self) -> None:
        with pytest.raises(UnprocessableError, match=r"^fill_token is not a fill token$") as err:
            FillTokenSigner(SECRET).verify("nodot")
        assert err.value.field == "fill_token"
        assert err.value.fix == ("call /v1/cache/lookup again and store with the fill_token it "
                                 "returns")

    def test_bad_base64_is_not_a_fill_token(self) -> None:
        with pytest.raises(UnprocessableError, match=r"^fill_token is not a fill token$"):
            FillTokenSigner(SECRET).verify("a.b")

    def test_a_signed_payload_of_another_shape_is_malformed(self) -> None:
        s = FillTokenSigner(SECRET, clock=Clock())
        for payload in (["ft1", "t"], {"v": "ft1"}, "ft1"):
            with pytest.raises(UnprocessableError, match=r"^fill_token is malformed$"):
                s.verify(forge(payload))  # type: ignore[arg-type]

    def test_a_signed_payload_of_another_version_is_refused(self) -> None:
        s = FillTokenSigner(SECRET, clock=Clock())
        payload = ["ft0", "t", ["tenant", "t", None], "01" * 16, "02" * 32, "m", 7, False,
                   2000.0, 60]
        with pytest.raises(UnprocessableError, match=r"^fill_token has an unknown version$"):
            s.verify(forge(payload))
        payload[0] = "ft1"
        assert s.verify(forge(payload)).epoch == 7

    def test_a_token_under_a_secret_no_longer_listed_is_refused(self) -> None:
        old = FillTokenSigner(b"a" * 32, clock=Clock())
        token = old.sign(**FIELDS)
        assert FillTokenSigner(b"b" * 32, previous=[b"c" * 32, b"a" * 32],
                               clock=Clock()).verify(token).model == "m"
        with pytest.raises(UnprocessableError, match=r"^fill_token has an invalid signature$"):
            FillTokenSigner(b"b" * 32, previous=[b"c" * 32], clock=Clock()).verify(token)
