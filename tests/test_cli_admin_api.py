"""``cachesvc models|purge|audit scan --url``: the CLI through a running service's admin API
(the only way to reach the embedded store), one rollout behaviour, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from cachesvc.app import create_app
from cachesvc.cli import app
from cachesvc.store import storage_key
from keying import Scope
from tests.service_helpers import ADMIN, auth, chat, make_settings, serving
from tests.store_helpers import digest_of
from tests.support.echo_upstream import EchoUpstream

runner = CliRunner()


def cli(*args: str, **env: str) -> Any:
    return runner.invoke(app, list(args), env=env or None)


#: The service runs in a thread of this process, so its own log lines land in the CLI runner's
#: captured output too; they start with a timestamp, the CLI's own lines never do.
_SERVICE_LOG = re.compile(r"^\d{4}-\d\d-\d\d[ T]")


def cli_lines(output: str) -> list[str]:
    return [ln for ln in output.strip().splitlines() if ln.strip() and not _SERVICE_LOG.match(ln)]


def last_json(output: str) -> dict[str, Any]:
    return json.loads(cli_lines(output)[-1])


def one_error_line(output: str) -> str:
    lines = cli_lines(output)
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture(scope="module")
def service(tmp_path_factory: Any) -> Any:
    """The service with the embedded store (as `make serve` runs it), on a loopback port."""
    tmp = tmp_path_factory.mktemp("svc")
    with serving(create_app(make_settings(tmp), upstream=EchoUpstream())) as server:
        yield server


class TestThroughTheAdminApi:
    def test_rollout_and_show_reach_the_embedded_registry(self, service):
        out = cli("models", "rollout", "echo-1", "v7", "--url", service.url, "--admin-key",
                  ADMIN, "--create", "--json")
        assert out.exit_code == 0, out.output
        epoch = last_json(out.output)["epoch"]
        shown = cli("models", "show", "--url", service.url, "--json",
                    CACHESVC_ADMIN_KEY=ADMIN)
        assert shown.exit_code == 0, shown.output
        assert {"model": "echo-1", "version": "v7", "epoch": epoch} in \
            last_json(shown.output)["models"]
        table = cli("models", "show", "--url", service.url, CACHESVC_ADMIN_KEY=ADMIN)
        assert "echo-1" in table.output and "v7" in table.output

    def test_a_rollout_of_a_model_the_registry_lacks_needs_create_through_the_api_too(
            self, service):
        out = cli("models", "rollout", "echo-typo", "v1", "--url", service.url, "--admin-key",
                  ADMIN)
        assert out.exit_code == 1
        line = one_error_line(out.output)
        assert "answered 404" in line and "--create" in line
        shown = cli("models", "show", "--url", service.url, "--json", CACHESVC_ADMIN_KEY=ADMIN)
        assert "echo-typo" not in {m["model"] for m in last_json(shown.output)["models"]}
        out = cli("models", "rollout", "echo-typo", "v1", "--url", service.url, "--admin-key",
                  ADMIN, "--create", "--json")
        assert out.exit_code == 0, out.output
        assert last_json(out.output)["version"] == "v1"

    def test_a_model_named_by_provider_path_rolls_out_and_purges_through_the_api(
            self, service):
        # Gateways name models with slashes (LiteLLM: "openai/gpt-4o"); the CLI quotes them.
        out = cli("models", "rollout", "openai/echo-1", "v1", "--create", "--url", service.url,
                  "--admin-key", ADMIN, "--json")
        assert out.exit_code == 0, out.output
        assert last_json(out.output)["model"] == "openai/echo-1"
        out = cli("purge", "--model", "openai/echo-1", "--old-epochs", "--url", service.url,
                  "--admin-key", ADMIN, "--json")
        assert out.exit_code == 0, out.output
        assert last_json(out.output)["model"] == "openai/echo-1"

    def test_the_admin_key_can_come_from_the_config(self, service, tmp_path):
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[admin]\napi_key = "{ADMIN}"\n')
        out = cli("models", "show", "--url", service.url, "--config", str(cfg), "--json")
        assert out.exit_code == 0, out.output

    def test_purge_a_tenant_and_a_model_in_the_embedded_store(self, service):
        import httpx

        for i in range(3):
            httpx.post(f"{service.url}/v1/chat/completions", json=chat(f"purge me {i}"),
                       headers=auth(), timeout=10).raise_for_status()
        out = cli("purge", "--tenant", "team-a", "--url", service.url, "--admin-key", ADMIN,
                  "--json")
        assert out.exit_code == 0, out.output
        assert last_json(out.output)["deleted"] >= 3
        out = cli("purge", "--model", "echo-1", "--old-epochs", "--url", service.url,
                  "--admin-key", ADMIN)
        assert out.exit_code == 0 and cli_lines(out.output)[-1].startswith("purged "), out.output

    def test_scan_runs_inside_the_service_and_reports_its_run(self, service):
        import httpx

        httpx.post(f"{service.url}/v1/chat/completions", json=chat("scan me"), headers=auth(),
                   timeout=10).raise_for_status()
        out = cli("audit", "scan", "--url", service.url, "--admin-key", ADMIN)
        assert out.exit_code == 0, out.output
        assert "of embedded store" in out.output and " 0 findings" in out.output

    def test_a_wrong_admin_key_is_one_line_naming_the_status(self, service):
        out = cli("models", "show", "--url", service.url, "--admin-key", "sk-wrong-0123456789ab")
        assert out.exit_code == 1
        assert "answered 401" in one_error_line(out.output)

    def test_an_unreachable_service_is_one_line(self):
        out = cli("models", "show", "--url", "http://127.0.0.1:9", "--admin-key", ADMIN)
        assert out.exit_code == 1
        assert "is the service running at --url?" in one_error_line(out.output)

    def test_no_admin_key_anywhere_says_where_to_put_one(self, service, monkeypatch):
        monkeypatch.delenv("CACHESVC_CONFIG", raising=False)
        monkeypatch.delenv("CACHESVC_ADMIN__API_KEY", raising=False)
        out = cli("models", "show", "--url", service.url)
        assert out.exit_code == 2 and "--admin-key" in one_error_line(out.output)

    def test_without_url_or_redis_the_error_offers_url(self, monkeypatch):
        monkeypatch.delenv("CACHESVC_CONFIG", raising=False)
        for args in (("models", "show"), ("purge", "--tenant", "t"), ("audit", "scan")):
            out = cli(*args)
            assert out.exit_code == 2 and "--url" in one_error_line(out.output), args


@pytest.mark.redis
class TestOneRolloutBehaviour:
    def test_a_cli_rollout_deletes_the_old_epochs_entries_as_the_http_rollout_does(
            self, redis_url: str, redis_standalone: Any) -> None:
        old = last_json(cli("models", "rollout", "m", "v1", "--create", "--redis", redis_url,
                            "--json").output)
        client = redis.Redis(host=redis_standalone.host, port=redis_standalone.port)
        keys = [storage_key(scope=Scope.for_tenant("t"), model="m", epoch=old["epoch"],
                            digest=digest_of(i)) for i in range(10)]
        for k in keys:
            client.set(k, b"v")
        new = cli("models", "rollout", "m", "v2", "--redis", redis_url, "--json")
        assert new.exit_code == 0, new.output
        assert last_json(new.output)["old_epoch_entries_deleted"] == 10
        assert client.exists(*keys) == 0


class TestConfigErrors:
    def test_an_unknown_engine_model_is_one_line_at_start_up(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[upstream]\nmodel = "llama-70b"\n')
        out = cli("serve", "--config", str(cfg))
        assert out.exit_code == 2
        line = one_error_line(out.output)
        assert "upstream.model" in line and "smollm2" in line and "random-tiny" in line

    def test_an_unknown_setting_names_the_key(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[cache]\nstrict_epochs = true\n')
        out = cli("serve", "--config", str(cfg))
        assert out.exit_code == 2 and "cache.strict_epochs" in one_error_line(out.output)

    def test_a_toml_syntax_error_is_one_line(self, tmp_path: Path) -> None:
        cfg = tmp_path / "c.toml"
        cfg.write_text('[cache\n')
        out = cli("audit", "report", "--config", str(cfg))
        assert out.exit_code == 2 and str(cfg) in one_error_line(out.output)

    def test_the_engine_model_names_match_the_engine(self) -> None:
        from cachesvc.settings import ENGINE_MODELS
        from gpu_prefix.models import MODEL_NAMES

        assert set(ENGINE_MODELS) == set(MODEL_NAMES)
