"""The registry as the service uses it: epochs never repeat (no constant first epoch, a lost
registry included), a late fill at a passed epoch does not survive, start-up never changes the
registry, and a rollout of a model the registry does not know needs create."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cachesvc.app import create_app
from cachesvc.errors import RegistryConflictError
from cachesvc.models import ModelVersions
from cachesvc.response_cache import Payload
from cachesvc.store import open_store
from cachesvc.wiring import attach_engine
from invalidation import EmbeddedRegistry
from tests.service_helpers import ADMIN, auth, chat, make_settings
from tests.support.echo_upstream import EchoUpstream


class FakeEngine:
    """What attach_engine needs of the reference engine: its model id and epoch."""

    def __init__(self, model_id: str = "smollm2") -> None:
        self.model_id = model_id
        self.model_epoch = 0

    def on_rollout(self, version: object, epoch: int) -> None:
        self.model_epoch = epoch


async def _versions(registry: EmbeddedRegistry) -> ModelVersions:
    return await ModelVersions.open(registry, refresh_s=5.0, strict=False)


class TestStartUpNeverChangesTheRegistry:
    async def test_a_config_version_other_than_the_registrys_refuses_to_start(self) -> None:
        registry = EmbeddedRegistry()
        await registry.rollout("smollm2", "1")
        rolled = await registry.rollout("smollm2", "2")
        versions = await _versions(registry)
        try:
            with pytest.raises(RegistryConflictError, match=r"version '2'.*version is '1'"):
                await attach_engine(FakeEngine(), versions, "1")
            # Nothing rolled back: the registry and its epoch are as the operator left them.
            assert await registry.current("smollm2") == rolled.current
        finally:
            await versions.aclose()

    async def test_the_same_version_keeps_its_epoch_and_a_new_model_is_registered(self) -> None:
        registry = EmbeddedRegistry()
        versions = await _versions(registry)
        try:
            engine = FakeEngine()
            await attach_engine(engine, versions, "1")
            first = await registry.current("smollm2")
            assert first.version == "1" and engine.model_epoch == first.epoch
            await attach_engine(FakeEngine(), versions, "1")  # a restart
            assert await registry.current("smollm2") == first
        finally:
            await versions.aclose()


class TestRolloutOfAnUnknownModel:
    def test_is_refused_unless_asked_to_create(self, tmp_path: Path) -> None:
        with TestClient(create_app(make_settings(tmp_path), upstream=EchoUpstream())) as c:
            typo = c.post("/admin/models/ecoh-1/rollout", json={"version": "2"},
                          headers=auth(ADMIN))
            assert typo.status_code == 404 and "create" in typo.text
            assert c.get("/admin/models", headers=auth(ADMIN)).json()["models"] == []
            made = c.post("/admin/models/echo-1/rollout", json={"version": "2", "create": True},
                          headers=auth(ADMIN))
            assert made.status_code == 200
            again = c.post("/admin/models/echo-1/rollout", json={"version": "3"},
                           headers=auth(ADMIN))
            assert again.status_code == 200 and again.json()["epoch"] > made.json()["epoch"]


class TestEpochsNeverRepeat:
    @pytest.mark.redis
    def test_a_pre_rollout_answer_is_not_served_after_the_registry_is_lost(
            self, redis_url: str, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, redis={"url": redis_url})

        def ask(c: TestClient) -> str:
            return c.post("/v1/chat/completions", json=chat("before the rollout"),
                          headers={**auth(), "Cache-Control": "only-if-cached"}
                          ).headers["x-cache"]

        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            c.post("/v1/chat/completions", json=chat("before the rollout"), headers=auth())
            assert ask(c) == "HIT"  # a model never rolled out is cached (at the genesis epoch)
            saved = asyncio.run(_entry_keys(redis_url))
            r = c.post("/admin/models/echo-1/rollout", json={"version": "2", "create": True},
                       headers=auth(ADMIN))
            assert r.status_code == 200
            assert ask(c) == "MISS"

        async def lose_registry_keep_old_entry(raw: dict[str, bytes]) -> None:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(redis_url)
            await client.flushall()  # the registry's keys are gone (no persistence)
            for key, value in raw.items():  # ... and the pre-rollout answer is back, as a
                await client.set(key, value)  # late fill after the purge would have left it
            await client.aclose()

        asyncio.run(lose_registry_keep_old_entry(saved))
        with TestClient(create_app(settings, upstream=EchoUpstream())) as c:
            assert ask(c) == "MISS"

    async def test_a_late_fill_at_a_passed_epoch_is_deleted_not_kept(self,
                                                                     tmp_path: Path) -> None:
        settings = make_settings(tmp_path)
        store = open_store(None)
        app = create_app(settings, upstream=EchoUpstream(), store=store)
        async with app.router.lifespan_context(app):
            services = app.state.services
            tenant = services.tenants.authenticate(auth()["Authorization"])
            keyed = await services.cache.key(tenant, chat("slow answer"), "chat")
            await services.versions.rollout("echo-1", "2", create=True)  # while it computed
            body = await EchoUpstream().complete(keyed.body, "chat", tenant=tenant.id)
            why = await services.cache.fill(keyed.target, Payload(stream=False, body=body),
                                            source="proxy")
            assert why == "stale_epoch"
            assert await store.get(keyed.target.storage_key) is None


async def _entry_keys(redis_url: str) -> dict[str, Any]:
    store = open_store(redis_url)
    try:
        return {k: raw async for k, raw in store.scan_entries()}
    finally:
        await store.close()


class TestARolloutWithABadName:
    async def test_the_400_names_the_argument_that_is_bad_whatever_the_names_contain(
            self) -> None:
        """The field comes from the registry's typed error, not from the message's words: a
        model whose name contains "version" is still the model's fault."""
        from cachesvc.errors import BadRequestError

        versions = await ModelVersions.open(EmbeddedRegistry(), refresh_s=5.0, strict=False)
        try:
            with pytest.raises(BadRequestError) as bad_model:
                await versions.rollout("version\x07x", "1", create=True)
            with pytest.raises(BadRequestError) as bad_version:
                await versions.rollout("model-x", "v\x07", create=True)
        finally:
            await versions.aclose()
        assert bad_model.value.field == "model"
        assert bad_version.value.field == "version"
