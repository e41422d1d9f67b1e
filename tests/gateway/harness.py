"""The LiteLLM side's handle on the service stack (``tests/gateway/stack.py``): start it in the
service's virtualenv, read where it listens, stop it. Standard library, httpx and orjson only,
so it runs in a virtualenv that has LiteLLM and not the service's dependencies."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[2]
#: The interpreter of the service's virtualenv (it has the service's dependencies).
SERVICE_PYTHON = os.environ.get("CACHESVC_PYTHON", str(ROOT / ".venv/bin/python"))


@dataclass(frozen=True, kw_only=True)
class Stack:
    service: str  # the cache service's base URL
    upstream: str  # the echo model's OpenAI base URL (.../v1)
    key_a: str  # tenant keys of the service
    key_b: str
    admin: str

    def model_calls(self) -> int:
        """How many requests the model has answered so far."""
        return httpx.get(self.upstream.removesuffix("/v1") + "/calls").json()["calls"]

    def rollout(self, model: str, version: str) -> None:
        httpx.post(f"{self.service}/admin/models/{model}/rollout",
                   json={"version": version, "create": True},
                   headers={"Authorization": f"Bearer {self.admin}"}).raise_for_status()


@contextlib.contextmanager
def running_stack(*args: str) -> Iterator[Stack]:
    """The echo model and the service, in a child process of ``SERVICE_PYTHON``; ``args`` go to
    ``tests.gateway.stack`` (``--redis URL``)."""
    proc = subprocess.Popen([SERVICE_PYTHON, "-m", "tests.gateway.stack", *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the service stack did not start ({SERVICE_PYTHON} exited "
                               f"{proc.wait(timeout=10)}); run `make install` first")
        yield Stack(**orjson.loads(line))
    finally:
        proc.stdin.close()  # the stack exits when its stdin closes
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
