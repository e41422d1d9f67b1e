"""The access log: one structured line per request, with route, status, X-Cache, tenant,
latency and digest, and never a prompt, an answer or a key; and ``/docs`` and ``/redoc``
served offline."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import structlog
from fastapi.testclient import TestClient

from cachesvc.access_log import AccessLog
from cachesvc.app import create_app
from tests.service_helpers import ADMIN, KEY_A, auth, chat, make_settings
from tests.support.echo_upstream import EchoUpstream

SECRET_PROMPT = "the launch code is PLUTO-4471-ZEBRA"


@pytest.fixture
def client(tmp_path: Any) -> Any:
    with TestClient(create_app(make_settings(tmp_path), upstream=EchoUpstream())) as c:
        yield c


def access_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == "access"]


class TestAccessLog:
    def test_a_miss_and_a_hit_each_log_one_line_with_route_status_cache_tenant_and_digest(
            self, client):
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                assert client.post("/v1/chat/completions", json=chat(SECRET_PROMPT),
                                   headers=auth()).status_code == 200
        miss, hit = access_lines(logs)
        assert (miss["cache"], hit["cache"]) == ("MISS", "HIT")
        for line in (miss, hit):
            assert line["method"] == "POST" and line["route"] == "/v1/chat/completions"
            assert line["status"] == 200 and line["tenant"] == "team-a"
            assert re.fullmatch(r"[0-9a-f]{32}", line["digest"])
            assert line["latency_ms"] > 0
        assert miss["digest"] == hit["digest"]

    def test_no_line_carries_prompt_answer_or_key_text(self, client):
        with structlog.testing.capture_logs() as logs:
            r = client.post("/v1/chat/completions", json=chat(SECRET_PROMPT), headers=auth())
            client.post("/v1/cache/lookup", json={"request": chat(SECRET_PROMPT)},
                        headers=auth())
            client.post("/v1/chat/completions", json=chat(SECRET_PROMPT),
                        headers=auth("sk-wrong-" + "x" * 20))
        answer = r.json()["choices"][0]["message"]["content"]
        text = json.dumps(logs)
        assert len(access_lines(logs)) == 3
        # The echo upstream's answer repeats the prompt, so both must be absent.
        for needle in ("PLUTO-4471", answer, KEY_A, "sk-wrong-", ADMIN):
            assert needle not in text

    def test_a_401_is_logged_without_a_tenant(self, client):
        with structlog.testing.capture_logs() as logs:
            assert client.post("/v1/chat/completions", json=chat()).status_code == 401
        (line,) = access_lines(logs)
        assert line["status"] == 401 and line["tenant"] == "-"

    def test_admin_routes_log_their_template_not_the_filled_in_path(self, client):
        with structlog.testing.capture_logs() as logs:
            client.delete("/admin/tenants/team-a/entries", headers=auth(ADMIN))
        (line,) = access_lines(logs)
        assert line["route"] == "/admin/tenants/{tenant}/entries" and line["status"] == 200
        assert line["tenant"] == "(admin)"

    async def test_the_rate_limit_drops_only_successes_and_refills_with_time(self):
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": scope["status"],
                        "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def noop(message: Any) -> None:
            return None

        now = [0.0]
        mw = AccessLog(app, max_per_s=2.0, clock=lambda: now[0])

        async def request(status: int) -> None:
            await mw({"type": "http", "method": "GET", "path": "/x", "status": status},
                     None, noop)

        with structlog.testing.capture_logs() as logs:
            for status in (200, 200, 200, 404, 200, 500):  # a burst of 2 successes allowed
                await request(status)
            now[0] = 0.5  # half a second: one more token
            await request(200)
            await request(200)
        assert [e["status"] for e in access_lines(logs)] == [200, 200, 404, 500, 200]

    def test_the_access_log_can_be_turned_off(self, tmp_path):
        app = create_app(make_settings(tmp_path, logging={"access_log": False}),
                         upstream=EchoUpstream())
        with TestClient(app) as c, structlog.testing.capture_logs() as logs:
            c.get("/healthz")
        assert access_lines(logs) == []


class TestOfflineDocs:
    @pytest.mark.parametrize("page", ["/docs", "/redoc"])
    def test_the_api_pages_load_their_scripts_from_this_service_not_a_cdn(self, client, page):
        html = client.get(page)
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)""", html.text)
        assert urls and all(u.startswith("/") for u in urls), urls
        assert "cdn" not in html.text.lower()
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 500, url

    def test_the_bundled_swagger_ui_reads_openapi_3_1(self, client):
        """FastAPI writes OpenAPI 3.1; Swagger UI before 5 cannot render it (a blank page)."""
        assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
        bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
        assert "OpenAPI 3.1" in bundle or "openapi31" in bundle.lower()
