"""Fixtures of the gateway tests. Loaded by the default test run too, so it imports nothing
that only LiteLLM's virtualenv has."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.harness import Stack, running_stack


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack() as s:
        yield s
