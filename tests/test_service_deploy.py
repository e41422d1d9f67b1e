"""The service as deployed: ``cachesvc serve`` in its own process (several uvicorn workers on
one Redis), and the in-process reference engine as the upstream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.service_helpers import ADMIN, KEY_A, KEY_B, fake_openai_app, free_port, serving
from tests.support.echo_upstream import EchoUpstream

pytestmark = [pytest.mark.redis, pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Say hi."}]


def _config(tmp_path: Path, redis_url: str, upstream: str | None) -> Path:
    up = f'[upstream]\nurl = "{upstream}"\n' if upstream else \
        '[upstream]\nmodel = "random-tiny"\n'
    cfg = tmp_path / "cachesvc.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "state"}"\n{up}'
        f'[redis]\nurl = "{redis_url}"\ntimeout_ms = 1000\n'
        f'[admin]\napi_key = "{ADMIN}"\n'
        f'[cache]\nregistry_refresh_s = 1.0\n'
        f'[[tenants]]\nid = "team-a"\napi_keys = ["{KEY_A}"]\n'
        f'[[tenants]]\nid = "team-b"\napi_keys = ["{KEY_B}"]\n')
    return cfg


def _serve(cfg: Path, port: int, *extra: str, log: Path | None = None
           ) -> subprocess.Popen[bytes]:
    cli = Path(sys.executable).with_name("cachesvc")
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([str(cli), "serve", "--config", str(cfg), "--port", str(port),
                             *extra], stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"cachesvc serve exited with {proc.returncode}")
        time.sleep(0.2)
    _stop(proc)
    raise RuntimeError("cachesvc serve did not start in 90 s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the process group this test started
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _chat(port: int, key: str = KEY_A, model: str = "echo-1", **kw: Any) -> Any:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    return c.chat.completions.with_raw_response.create(model=model, messages=MESSAGES,
                                                       temperature=0, max_tokens=8, **kw)


class TestWorkers:
    def test_workers_share_entries_and_every_worker_learns_a_rollout(self, tmp_path, redis_url):
        with serving(fake_openai_app(EchoUpstream())) as up:
            port = free_port()
            proc = _serve(_config(tmp_path, redis_url, up.url + "/v1"), port, "--workers", "2")
            try:
                first = _chat(port)
                states = [_chat(port).headers["x-cache"] for _ in range(12)]
                assert first.headers["x-cache"] == "MISS" and set(states) == {"HIT"}
                r = httpx.post(f"http://127.0.0.1:{port}/admin/models/echo-1/rollout",
                               json={"version": "v2", "create": True},
                               headers={"Authorization": f"Bearer {ADMIN}"})
                assert r.status_code == 200
                time.sleep(0.5)  # > the event poll interval; far below the refresh bound
                after = [_chat(port).headers["x-cache"] for _ in range(8)]
                assert after[0] == "MISS" and "MISS" not in after[1:]
            finally:
                _stop(proc)

    def test_several_workers_without_redis_are_refused(self, tmp_path):
        cli = Path(sys.executable).with_name("cachesvc")
        out = subprocess.run([str(cli), "serve", "--workers", "2", "--port", str(free_port())],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "shared store" in out.stderr


class TestEngineUpstream:
    def test_the_engine_answers_misses_and_a_rollout_reaches_its_prefix_pool(self, tmp_path,
                                                                             redis_url):
        from fastapi.testclient import TestClient

        from cachesvc.app import create_app
        from tests.service_helpers import auth, make_settings

        settings = make_settings(tmp_path, redis={"url": redis_url},
                                 upstream={"model": "random-tiny"})
        with TestClient(create_app(settings)) as c:
            engine = c.app.state.services.upstream.engine
            body = {"model": "random-tiny", "messages": MESSAGES, "temperature": 0,
                    "max_tokens": 6}
            a = c.post("/v1/chat/completions", json=body, headers=auth())
            b = c.post("/v1/chat/completions", json=body, headers=auth())
            assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
            assert a.content == b.content
            streamed = c.post("/v1/chat/completions", json={**body, "stream": True},
                              headers=auth())
            assert streamed.headers["x-cache"] == "HIT" and "data: [DONE]" in streamed.text
            r = c.post("/admin/models/random-tiny/rollout", json={"version": "2", "create": True},
                       headers=auth(ADMIN)).json()
            assert engine.model_epoch == r["epoch"]
            again = c.post("/v1/chat/completions", json=body, headers=auth())
            assert again.headers["x-cache"] == "MISS"
            unsupported = c.post("/v1/chat/completions", json={**body, "logit_bias": {"1": 5}},
                                 headers=auth())
            assert unsupported.status_code == 422
            assert unsupported.json()["error"]["param"] == "logit_bias"
            metrics = c.get(
                "/metrics", headers=auth(ADMIN)).text  # the engine's metrics, through the service
            for name in ("engine_requests_running", "engine_requests_preempted_total",
                         'engine_kv_blocks{state="cached"}',
                         "engine_ttft_seconds_bucket", "engine_step_seconds_count",
                         "engine_steps_total"):
                assert name in metrics, name


class TestLogs:
    @pytest.mark.parametrize("log_content", [False, True])
    def test_prompts_reach_the_log_only_when_the_config_says_so(self, tmp_path, log_content):
        marker = "PROMPT-MARKER-5f1c"
        with serving(fake_openai_app(EchoUpstream())) as up:
            cfg = _config(tmp_path, "redis://127.0.0.1:9/0", up.url + "/v1")  # a dead store
            cfg.write_text(cfg.read_text() + "[logging]\nlog_content = "
                                             f"{str(log_content).lower()}\n")
            port, log = free_port(), tmp_path / "serve.log"
            proc = _serve(cfg, port, log=log)
            try:
                for fail in (None, "500", "cut"):
                    meta = {"fail": fail} if fail else {}
                    httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {KEY_A}"},
                               json={"model": "echo-1", "temperature": 0, "metadata": meta,
                                     "stream": fail == "cut",
                                     "messages": [{"role": "user", "content": marker}]})
            finally:
                _stop(proc)
        text = log.read_text()
        assert "registry_unavailable_at_start" in text  # the dead Redis was logged ...
        assert (marker in text) == log_content  # ... and the prompt only when enabled


class TestStartWithNoConfig:
    """``make serve``: no config, a demo tenant. The hint to try it comes once the model is
    loaded (the service answers by then), and the demo key survives a restart."""

    def _start(self, tmp_path: Path, port: int) -> tuple[subprocess.Popen[bytes], list[str]]:
        cli = Path(sys.executable).with_name("cachesvc")
        env = {**os.environ, "CACHESVC_STATE_DIR": str(tmp_path / "state"),
               "CACHESVC_UPSTREAM__MODEL": "random-tiny"}
        env.pop("CACHESVC_CONFIG", None)
        proc = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        lines: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
            if line.startswith("try:"):
                return proc, lines
        _stop(proc)
        raise AssertionError(f"no try hint within 90 s (exit {proc.returncode}): {lines}")

    def test_the_hint_comes_when_the_service_answers_and_the_key_survives_a_restart(
            self, tmp_path):
        port = free_port()
        proc, lines = self._start(tmp_path, port)
        try:
            key = next(ln for ln in lines if "demo tenant" in ln).split("key: ")[1].split()[0]
            # The hint is printed from the app's start-up, after the model loaded: it answers.
            r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "random-tiny", "messages": MESSAGES, "max_tokens": 2,
                                 "temperature": 0})
            assert r.status_code == 200, r.text
        finally:
            _stop(proc)
        proc, lines = self._start(tmp_path, port)
        _stop(proc)
        assert any(f"key: {key}" in ln for ln in lines)
