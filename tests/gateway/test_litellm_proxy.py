"""End to end: the LiteLLM proxy server, configured as docs/gateway.md says, with this service as
its cache and the echo model behind it, all over HTTP on loopback. Skipped where the proxy's
own dependencies are not installed (``make test`` installs them in ``.venv-bench``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("litellm")
pytest.importorskip("websockets")  # the proxy server's dependencies, not LiteLLM's
pytest.importorskip("apscheduler")

from tests.gateway.harness import Stack
from tests.support.redis_servers import free_port

MASTER_KEY = "sk-proxy-master-0123456789abcdef"
CONFIG = """\
model_list:
  - model_name: echo-1
    litellm_params:
      model: openai/echo-1
      api_base: {upstream}
      api_key: sk-upstream
litellm_settings:
  callbacks: ["cachesvc.integrations.litellm.proxy_cache"]
"""


@pytest.fixture(scope="module")
def proxy(stack: Stack, tmp_path_factory: Any) -> Iterator[str]:
    config = tmp_path_factory.mktemp("proxy") / "config.yaml"
    config.write_text(CONFIG.format(upstream=stack.upstream))
    port = free_port()
    env = {**os.environ, "CACHESVC_URL": stack.service, "CACHESVC_API_KEY": stack.key_a,
           "LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    log = config.with_name("proxy.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("litellm")), "--config",
                             str(config), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # the proxy imports for a long while
        while True:
            assert proc.poll() is None, f"the proxy exited; see {log.name}"
            assert time.monotonic() < deadline, f"the proxy did not start; see {log.name}"
            try:
                if httpx.get(url + "/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def chat(proxy: str, text: str, **extra: Any) -> httpx.Response:
    body = {"model": "echo-1", "messages": [{"role": "user", "content": text}],
            "temperature": 0, **extra}
    r = httpx.post(proxy + "/v1/chat/completions", json=body, timeout=30,
                   headers={"Authorization": f"Bearer {MASTER_KEY}"})
    assert r.status_code == 200, r.text
    return r


class TestProxyConfig:
    def test_a_repeat_through_the_proxy_is_served_by_this_cache(self, stack, proxy):
        first = chat(proxy, "through the proxy")
        deadline = time.monotonic() + 10  # the proxy fills in the background after answering
        while "x-litellm-cache-key" not in chat(proxy, "through the proxy").headers:
            assert time.monotonic() < deadline, "the proxy never served a hit"
            time.sleep(0.05)
        calls = stack.model_calls()
        again = chat(proxy, "through the proxy")
        assert again.headers["x-litellm-cache-key"].startswith("cachesvc:")
        assert again.json()["choices"] == first.json()["choices"]
        assert stack.model_calls() == calls

    def test_a_different_parameter_through_the_proxy_is_a_miss(self, stack, proxy):
        first = chat(proxy, "proxy parameter", max_tokens=5)
        calls = stack.model_calls()
        second = chat(proxy, "proxy parameter", max_tokens=6)
        assert stack.model_calls() == calls + 1
        assert second.json()["choices"] != first.json()["choices"]
