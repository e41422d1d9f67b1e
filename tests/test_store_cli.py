"""``cachesvc models rollout|show`` and ``cachesvc purge`` against a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from cachesvc.cli import app
from cachesvc.store import storage_key
from keying import Scope
from tests.store_helpers import digest_of

pytestmark = pytest.mark.redis
runner = CliRunner()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def last_json(output: str) -> dict[str, Any]:
    return json.loads(output.strip().splitlines()[-1])


class TestModelsCli:
    def test_rollout_then_show_lists_the_model(self, redis_url: str) -> None:
        first = cli("models", "rollout", "llama", "v1", "--create", "--redis", redis_url, "--json")
        assert first.exit_code == 0, first.output
        second = cli("models", "rollout", "llama", "v2", "--redis", redis_url, "--json")
        a, b = last_json(first.output), last_json(second.output)
        assert b["epoch"] > a["epoch"] and b["previous"]["version"] == "v1"
        shown = last_json(cli("models", "show", "--redis", redis_url, "--json").output)
        assert shown["models"][0]["version"] == "v2" and shown["models"][0]["epoch"] == b["epoch"]

    def test_an_idempotent_repeat_changes_nothing(self, redis_url: str) -> None:
        cli("models", "rollout", "llama", "v1", "--create", "--redis", redis_url)
        again = cli("models", "rollout", "llama", "v1", "--idempotent", "--redis", redis_url)
        assert again.exit_code == 0 and "nothing changed" in again.output

    def test_a_rollout_of_a_model_the_registry_does_not_know_is_refused_without_create(
            self, redis_url: str) -> None:
        cli("models", "rollout", "llama", "v1", "--create", "--redis", redis_url)
        typo = cli("models", "rollout", "lama", "v2", "--redis", redis_url)
        assert typo.exit_code == 1 and "--create" in typo.output
        shown = last_json(cli("models", "show", "--redis", redis_url, "--json").output)
        assert [m["model"] for m in shown["models"]] == ["llama"]

    def test_the_config_file_names_redis(self, redis_url: str, tmp_path: Path) -> None:
        config = tmp_path / "cachesvc.toml"
        config.write_text(f'[redis]\nurl = "{redis_url}"\n')
        result = cli("models", "rollout", "m", "1", "--create", "--config", str(config))
        assert result.exit_code == 0 and "epoch" in result.output

    def test_without_redis_the_error_says_how_to_name_it(self, monkeypatch: Any) -> None:
        monkeypatch.delenv("CACHESVC_CONFIG", raising=False)
        result = cli("models", "show")
        assert result.exit_code == 2 and "--redis" in result.output

    def test_a_bad_version_is_refused_naming_the_field(self, redis_url: str) -> None:
        result = cli("models", "rollout", "m", "x" * 300, "--create", "--redis", redis_url)
        assert result.exit_code == 1 and "version:" in result.output


class TestPurgeCli:
    def test_purge_old_epochs_keeps_the_current_one(self, redis_url: str,
                                                    redis_standalone: Any) -> None:
        old = last_json(cli("models", "rollout", "m", "v1", "--create", "--redis", redis_url,
                            "--json").output)
        new = last_json(cli("models", "rollout", "m", "v2", "--create", "--redis", redis_url,
                            "--json").output)
        client = redis.Redis(host=redis_standalone.host, port=redis_standalone.port)
        keys = {}
        for epoch in (old["epoch"], new["epoch"]):
            keys[epoch] = [storage_key(scope=Scope.for_tenant("t"), model="m", epoch=epoch,
                                       digest=digest_of(i)) for i in range(25)]
            for k in keys[epoch]:
                client.set(k, b"v")
        result = cli("purge", "--model", "m", "--old-epochs", "--redis", redis_url, "--json")
        assert result.exit_code == 0, result.output
        assert last_json(result.output)["deleted"] == 25
        assert client.exists(*keys[old["epoch"]]) == 0
        assert client.exists(*keys[new["epoch"]]) == 25

    def test_purge_a_tenant_with_a_glob_in_its_id(self, redis_url: str,
                                                  redis_standalone: Any) -> None:
        client = redis.Redis(host=redis_standalone.host, port=redis_standalone.port)
        for tenant in ("*", "a"):
            for i in range(5):
                client.set(storage_key(scope=Scope.for_tenant(tenant), model="m", epoch=1,
                                       digest=digest_of(i)), b"v")
        result = cli("purge", "--tenant", "*", "--redis", redis_url)
        assert result.exit_code == 0 and "purged 5 entries" in result.output
        assert client.dbsize() == 5

    def test_a_purge_naming_nothing_is_refused(self, redis_url: str) -> None:
        result = cli("purge", "--redis", redis_url)
        assert result.exit_code == 1 and "--model M" in result.output

    def test_old_epochs_without_a_model_is_refused(self, redis_url: str) -> None:
        result = cli("purge", "--old-epochs", "--tenant", "t", "--redis", redis_url)
        assert result.exit_code == 2 and "--old-epochs needs --model" in result.output
