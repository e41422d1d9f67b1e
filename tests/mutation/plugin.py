"""pytest plugin for mutation runs (`make mutation`, see README): deterministic and short.

Loaded with ``-p tests.mutation.plugin``. Under mutation every Hypothesis test runs
derandomized (a mutant is killed or survives the same way on every run) with at most
``MAX_EXAMPLES`` examples, and the example-based tests run first: mutmut stops at the first
failure, so a mutant that an example test kills costs no property run.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

MAX_EXAMPLES = 30


def _shortened(current: settings) -> settings:
    return settings(
        current,
        max_examples=min(current.max_examples, MAX_EXAMPLES),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "obj", None)
        fn = getattr(fn, "__func__", fn)  # a test method: its function holds the settings
        # NOTE: where @given keeps a test's settings; Hypothesis' own pytest plugin reads it too.
        current = getattr(fn, "_hypothesis_internal_use_settings", None)
        if current is not None:
            fn._hypothesis_internal_use_settings = _shortened(current)
        cls = getattr(item, "cls", None)
        machine_settings = getattr(cls, "settings", None) if cls is not None else None
        if isinstance(machine_settings, settings):  # a RuleBasedStateMachine's TestCase
            cls.settings = _shortened(machine_settings)
    items.sort(key=lambda item: _is_property(item))


def _is_property(item: pytest.Item) -> bool:
    fn = getattr(item, "obj", None)
    cls = getattr(item, "cls", None)
    return bool(getattr(fn, "is_hypothesis_test", False)) or hasattr(cls, "settings")
