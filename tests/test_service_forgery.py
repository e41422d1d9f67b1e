"""Entries an attacker with Redis write access plants, and entries the fill path would never
have written: each is a miss on the hit path (never served, never a 500) and a finding of
`cachesvc audit scan`. Real Redis, the service in process."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from audit import FileJournal
from cachesvc.app import create_app
from cachesvc.cli import app as cli
from cachesvc.store import Entry, EntryKeys, decode_entry, encode_entry, open_store
from cachesvc.store.envelope import HEADER_SIZE
from keying import rebuild_key
from tests.service_helpers import ADMIN, auth, chat, make_settings
from tests.store_helpers import KEYS, TEST_SECRET
from tests.support.echo_upstream import EchoUpstream

pytestmark = pytest.mark.redis

MAX_ENTRY = 50_000


def _repack(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The bytes with their payload changed and their old header (and MAC) kept: what anyone
    with Redis write access but without the secret can write."""
    payload = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
    change(payload)
    return raw[:HEADER_SIZE] + msgpack.packb(payload, use_bin_type=True)


def _signed(entry: Entry, **changes: Any) -> bytes:
    """An entry with a valid MAC that the fill path would still never write (``Entry``'s own
    checks bypassed, as an older or buggy writer could)."""
    raw = encode_entry(entry, keys=KEYS)
    payload = msgpack.unpackb(raw[HEADER_SIZE:], raw=False)
    payload.update(changes)
    body = msgpack.packb(payload, use_bin_type=True)
    header = raw[:HEADER_SIZE - 32]
    return header + KEYS.sign(header, body) + body


class TestForgedAndInvalidEntries:
    def test_each_is_a_miss_never_served_and_the_scan_reports_each(self, redis_url: str,
                                                                   tmp_path: Path) -> None:
        settings = make_settings(tmp_path, redis={"url": redis_url},
                                 limits={"max_entry_bytes": MAX_ENTRY})
        prompts = [f"question {i}" for i in range(9)]
        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            r = c.post("/admin/models/echo-1/rollout", json={"version": "v1", "create": True},
                       headers=auth(ADMIN))
            assert r.status_code == 200, r.text
            for p in prompts:
                r = c.post("/v1/chat/completions", json=chat(p), headers=auth())
                assert r.headers["x-cache"] == "MISS", r.text
            stream = c.post("/v1/chat/completions", json=chat("streamed", stream=True),
                            headers=auth())
            assert stream.status_code == 200

            async def entries() -> dict[str, tuple[str, bytes, Entry]]:
                s = open_store(redis_url)
                out = {}
                async for k, raw in s.scan_entries():
                    e = decode_entry(raw, keys=KEYS)
                    assert e.material is not None
                    request = rebuild_key(e.material, secret=TEST_SECRET).canonical.body()
                    out[request["messages"][0]["content"]] = (k, raw, e)
                await s.close()
                return out

            by_prompt = asyncio.run(entries())
            assert len(by_prompt) == len(prompts) + 1
            _, _y_raw, y = by_prompt["question 1"]
            planted = {
                "rewritten answer": _repack(by_prompt["question 0"][1], lambda p: p["r"][
                    "choices"][0]["message"].update(content="a planted answer")),
                "swapped answer": _repack(by_prompt["question 2"][1],
                                          lambda p: p.update(r=y.response)),
                "foreign key id": encode_entry(by_prompt["question 3"][2],
                                               keys=EntryKeys(b"an-attackers-own-secret!")),
                "empty choices": _signed(by_prompt["question 4"][2],
                                         r={**y.response, "choices": []}),
                "incomplete stream": _signed(by_prompt["streamed"][2], st=[
                    c for c in by_prompt["streamed"][2].stream or []
                    if not any(ch.get("finish_reason") for ch in c.get("choices") or ())]),
                "oversize": encode_entry(dataclasses.replace(
                    by_prompt["question 5"][2], response={**y.response, "pad": "x" * MAX_ENTRY}),
                    keys=KEYS),
                "immortal": _signed(by_prompt["question 6"][2], t=None, c=1.0),
                "wrong version": encode_entry(dataclasses.replace(
                    by_prompt["question 7"][2], model_version="v0"), keys=KEYS),
            }
            prompt_of = {"rewritten answer": "question 0", "swapped answer": "question 2",
                         "foreign key id": "question 3", "empty choices": "question 4",
                         "incomplete stream": "streamed", "oversize": "question 5",
                         "immortal": "question 6", "wrong version": "question 7"}

            async def plant() -> None:
                s = open_store(redis_url, max_entry_bytes=10 * MAX_ENTRY)
                for case, raw in planted.items():
                    await s.set(by_prompt[prompt_of[case]][0], raw)
                await s.close()

            asyncio.run(plant())
            for case, prompt in prompt_of.items():
                body = chat(prompt, stream=True) if prompt == "streamed" else chat(prompt)
                r = c.post("/v1/chat/completions", json=body, headers=auth())
                assert r.status_code == 200, (case, r.text)
                if case == "wrong version":
                    # The epoch is what a hit is judged by; the scan reports the version.
                    continue
                assert r.headers["x-cache"] == "MISS", case
                assert "entry rejected" in r.headers["x-cache-reason"], case
                assert "planted" not in r.text
            # The untouched entry is still a hit.
            assert c.post("/v1/chat/completions", json=chat("question 8"),
                          headers=auth()).headers["x-cache"] == "HIT"

        asyncio.run(plant())  # the misses above refilled some keys: plant again for the scan
        cfg = tmp_path / "scan.toml"
        cfg.write_text(f'state_dir = "{tmp_path}"\n[redis]\nurl = "{redis_url}"\n'
                       f'[cache]\nsecret = "{TEST_SECRET.decode()}"\n'
                       f'[limits]\nmax_entry_bytes = {MAX_ENTRY}\n')
        findings = tmp_path / "f.jsonl"
        res = CliRunner().invoke(cli, ["audit", "scan", "--config", str(cfg), "--findings",
                                       str(findings), "--quiet"])
        assert res.exit_code == 1, res.output
        found = {f.entry.storage_key: f for f in FileJournal(findings).findings()}
        reasons = {case: found[by_prompt[prompt_of[case]][0]] for case in planted
                   if by_prompt[prompt_of[case]][0] in found}
        assert sorted(reasons) == sorted(planted), res.output
        assert {c: f.evidence.get("reason", f.kind) for c, f in reasons.items()} == {
            "rewritten answer": "forged", "swapped answer": "forged",
            "foreign key id": "unknown_key", "empty choices": "corrupt",
            "incomplete stream": "corrupt", "oversize": "oversize", "immortal": "lifetime",
            "wrong version": "stale"}
        # Nothing else was flagged: the untouched entries are clean.
        assert len(found) == len(planted)
        assert orjson.loads(orjson.dumps(FileJournal(findings).load_result("scan")))[
            "entries"] == len(prompts) + 1


class TestSecretRotation:
    def test_entries_under_a_previous_secret_are_served_until_it_is_dropped(
            self, redis_url: str, tmp_path: Path) -> None:
        old, new = "old-secret-0123456789abcdef", "new-secret-0123456789abcdef"

        def status(**cache: Any) -> str:
            settings = make_settings(tmp_path, redis={"url": redis_url}, cache=cache)
            with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
                r = c.post("/v1/chat/completions", json=chat("rotate me"),
                           headers={**auth(), "Cache-Control": "only-if-cached"})
                return r.headers["x-cache"]

        settings = make_settings(tmp_path, redis={"url": redis_url}, cache={"secret": old})
        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            assert c.post("/v1/chat/completions", json=chat("rotate me"),
                          headers=auth()).headers["x-cache"] == "MISS"
        assert status(secret=old) == "HIT"
        assert status(secret=new, previous_secrets=[old]) == "HIT"
        assert status(secret=new) == "MISS"
