"""``cachesvc key explain``: the command a user runs to see why two requests shared an entry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-c", "from cachesvc.cli import main; main()", "key", "explain"]


def explain(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=body, capture_output=True, text=True, timeout=60)


class TestKeyExplain:
    def test_prints_digests_cacheability_and_fields(self) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "temperature": 0}
        out = explain(json.dumps(body), "--tenant", "acme", "--epoch", "3")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert len(doc["digest"]) == 32 and len(doc["material_digest"]) == 64
        assert doc["cacheable"] is True and doc["reason"] == "deterministic: temperature=0"
        assert doc["keyed"]["temperature"] == 0 and "stream" not in doc["keyed"]
        assert doc["unkeyed"] == ["stream"]
        assert doc["epoch"] == 3 and doc["scope"] == "tenant:acme"

    def test_two_spellings_print_the_same_digest(self) -> None:
        a = '{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}'
        b = ('{"messages":[{"content":[{"type":"text","text":"hi"}],"role":"user"}],'
             '"model":"m","temperature":0.0,"user":"bob"}')
        da = json.loads(explain(a, "--tenant", "t").stdout)["digest"]
        db = json.loads(explain(b, "--tenant", "t").stdout)["digest"]
        assert da == db

    def test_user_scope_separates_users(self) -> None:
        body = '{"model":"m","prompt":"x","temperature":0}'
        u1 = json.loads(explain(body, "--tenant", "t", "--user", "u1").stdout)
        u2 = json.loads(explain(body, "--tenant", "t", "--user", "u2").stdout)
        assert u1["scope"] == "user:t/u1" and u1["digest"] != u2["digest"]

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ("{not json", "stdin is not valid JSON"),
            ('{"model":"m","messages":[],"temperature":0}', "invalid request: messages"),
            ('{"model":"m","prompt":"x","temperature":NaN}', "stdin is not valid JSON"),
            ('{"model":"m","prompt":"x","temperature":"hot"}', "invalid request: temperature"),
        ],
    )
    def test_bad_input_exits_non_zero_with_a_clear_message(self, body: str, message: str) -> None:
        out = explain(body, "--tenant", "t")
        assert out.returncode != 0
        assert message in out.stderr

    def test_user_scope_without_user_is_refused(self) -> None:
        out = explain('{"model":"m","prompt":"x"}', "--tenant", "t", "--scope", "user")
        assert out.returncode != 0 and "scope.user" in out.stderr


_HEAVY = ("scipy", "numpy", "torch", "transformers", "redis", "fastapi", "starlette", "uvicorn",
          "structlog", "audit", "invalidation", "gpu_prefix", "cachesvc.store", "cachesvc.app")


class TestStartup:
    def test_key_explain_imports_only_what_keying_needs(self) -> None:
        # NOTE: the modules loaded, not the time taken: start-up time depends on the machine's
        # load, the import list does not (importing scipy and the auditor was most of 1.3 s).
        code = ("import atexit, sys\n"
                "atexit.register(lambda: print(' '.join(sorted(sys.modules)), file=sys.stderr))\n"
                "sys.argv = ['cachesvc', 'key', 'explain', '--tenant', 't']\n"
                "from cachesvc.cli import main; main()\n")
        out = subprocess.run([sys.executable, "-c", code], input='{"model":"m","prompt":"x"}',
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        loaded = set(out.stderr.split())
        assert "keying" in loaded
        heavy = sorted(m for m in loaded if m.split(".")[0] in _HEAVY or m.startswith(_HEAVY))
        assert heavy == []

    def test_every_command_group_is_listed_and_loads(self) -> None:
        from typer.testing import CliRunner

        from cachesvc.cli import app

        listed = CliRunner().invoke(app, ["--help"])
        assert listed.exit_code == 0, listed.output
        for name in ("audit", "engine", "key", "models", "purge", "serve"):
            assert name in listed.output
            res = CliRunner().invoke(app, [name, "--help"])
            assert res.exit_code == 0 and "Usage" in res.output, (name, res.output)
