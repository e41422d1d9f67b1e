"""The start-up heap is frozen out of the garbage collector while the service runs
(cachesvc/heap.py), so a full collection under load walks only what requests allocate."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from fastapi.testclient import TestClient

from cachesvc import heap
from cachesvc.app import create_app
from tests.service_helpers import auth, chat, make_settings
from tests.support.echo_upstream import EchoUpstream


def _tracked(obj: Any) -> bool:
    """Whether a collection would walk ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_serving_freezes_the_start_up_heap_and_shutdown_thaws_it(tmp_path: Any) -> None:
    app = create_app(make_settings(tmp_path), upstream=EchoUpstream())
    before = gc.get_freeze_count()
    with TestClient(app) as client:
        services = app.state.services
        frozen = gc.get_freeze_count()
        # Everything start-up built (and the imports before it) is frozen, the services too.
        assert frozen > before
        assert not _tracked(services)
        assert not _tracked(services.cache)
        # What requests allocate is still collected, and hits still answer.
        for _ in range(2):
            r = client.post("/v1/chat/completions", json=chat("heap"), headers=auth())
            assert r.status_code == 200
        assert r.headers["x-cache"] == "HIT"
        young = len(gc.get_objects())
        # A full collection now walks a small share of the process's objects.
        assert young < frozen / 5, (young, frozen)
    assert gc.get_freeze_count() == 0
    assert _tracked(services)


def test_freeze_collects_first_and_thaw_returns_every_object() -> None:
    class Cycle:
        other: Any = None

    a, b = Cycle(), Cycle()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b  # unreachable, held only by their cycle
    keep = Cycle()
    try:
        frozen = heap.freeze()
        assert frozen == gc.get_freeze_count() > 0
        # The garbage cycle was collected before the freeze, not frozen with the rest.
        assert gone() is None
        assert not _tracked(keep)
    finally:
        heap.thaw()
    assert gc.get_freeze_count() == 0
    assert _tracked(keep)
