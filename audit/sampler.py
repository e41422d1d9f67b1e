"""Which hits and fills the shadow auditor checks: a geometric gap drawn once per sample.

Drawing the gap to the next sample (``log(1-u) / log(1-rate)`` events) samples exactly as an
independent draw per event at ``rate`` would, but costs one random number per *sample*, and
lets a caller count the gap down itself (:meth:`Sampler.pass_over`) so a skipped hit runs none
of the auditor's code.
"""

from __future__ import annotations

import math
import random
from typing import get_args

from audit import metrics
from audit.counts import ShadowCounts
from audit.sample import EventKind
from audit.shadow_config import ShadowConfig


class Sampler:
    """The sampling decision per event kind, counted in ``counts`` (offered, skipped)."""

    def __init__(self, config: ShadowConfig, counts: ShadowCounts, rng: random.Random) -> None:
        self._config = config
        self._counts = counts
        self._random = rng.random
        #: Off (stopping): every event is skipped and no gap is handed out.
        self.closed = False
        # Per kind: the events still to skip before the next sample (absent: no gap drawn),
        # and the skips handed to pass_over's caller, counted when that gap's sample comes.
        self._left: dict[str, int] = {}
        self._promised: dict[str, int] = {}
        # Bound once: the request path indexes a dict instead of asking metrics.child.
        self._m_skipped = {k: metrics.child(metrics.SAMPLES, k, "skipped")
                           for k in get_args(EventKind)}

    @property
    def config(self) -> ShadowConfig:
        return self._config

    @config.setter
    def config(self, config: ShadowConfig) -> None:
        """New rates take effect at the next draw: gaps drawn at the old rates are dropped
        (skips already promised to a caller stay promised)."""
        self._config = config
        self._left.clear()

    def draw(self, kind: EventKind, *, force: bool = False) -> bool:
        """True when this event of ``kind`` is a sample. Counted as offered, and as skipped
        when not drawn. ``force``: a sample whatever the rate (evidence, not a sample)."""
        self._counts.offered += 1
        if force:
            return True
        rate = self._config.rate(kind)
        if rate <= 0 or self.closed:
            return self._skip(kind, 1)
        left = self._left.get(kind)
        if left is None:
            left = self._gap(rate)
        if left > 0:
            self._left[kind] = left - 1
            return self._skip(kind, 1)
        self._left.pop(kind, None)
        promised = self._promised.pop(kind, 0)
        if promised:
            self._counts.offered += promised
            self._skip(kind, promised)
        return True

    def pass_over(self, kind: EventKind) -> int:
        """How many of the next events of ``kind`` will not be samples, handed to a caller
        that passes over them without calling :meth:`draw`. The event after them is a sample.
        They are counted, as offered and skipped, when that sample is drawn: the counters lag
        by at most one gap. 0: call :meth:`draw` for the next event."""
        rate = self._config.rate(kind)
        if self.closed or not 0 < rate < 1:
            return 0
        left = self._left.get(kind)
        if left is None:
            left = self._gap(rate)
        self._left[kind] = 0
        self._promised[kind] = self._promised.get(kind, 0) + left
        return left

    def _gap(self, rate: float) -> int:
        """Events to skip before the next sample: geometric, drawn once per sample."""
        return 0 if rate >= 1 else int(math.log1p(-self._random()) / math.log1p(-rate))

    def _skip(self, kind: str, n: int) -> bool:
        self._counts.skipped += n
        self._m_skipped[kind].inc(n)
        return False
