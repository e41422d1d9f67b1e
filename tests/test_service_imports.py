"""A service loads only the parts its settings name (cachesvc/wiring.py): on the embedded store,
redis-py is never imported, and so never frozen into its heap (cachesvc/heap.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SERVE_ONE_HIT = """
import sys, tempfile
from fastapi.testclient import TestClient
from cachesvc.app import create_app
from cachesvc.settings import load_settings
from tests.support.echo_upstream import EchoUpstream

settings = load_settings(None, state_dir=tempfile.mkdtemp(), audit={"sample_rate": 1.0},
                         tenants=[{"id": "t", "api_keys": ["sk-t-0123456789abcdef"]}])
body = {"model": "echo-1", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
with TestClient(create_app(settings, upstream=EchoUpstream())) as client:
    for _ in range(2):
        r = client.post("/v1/chat/completions", json=body,
                        headers={"Authorization": "Bearer sk-t-0123456789abcdef"})
        assert r.status_code == 200, r.text
    assert r.headers["x-cache"] == "HIT"
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] == "redis")) or "-")
"""


def test_a_service_on_the_embedded_store_never_imports_redis_py() -> None:
    out = subprocess.run([sys.executable, "-c", _SERVE_ONE_HIT], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "-"
