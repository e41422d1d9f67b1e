"""The timing audit: can one caller tell, by response time, that another caller's prompt is cached?

This is the protocol of the published audit of prompt caching in LLM APIs (Gu et al., 2025,
"Auditing Prompt Caching in Language Model APIs"), which found cross-user cache sharing at
several providers:

* a *hit trial*: the victim sends a random long prompt; then the probe sends a prompt that
  shares most of its prefix (``shared_fraction`` of the words) with a fresh ending;
* a *miss trial*: the victim sends a random long prompt; then the probe sends a prompt that
  shares nothing with it (same length, so the only difference between the two trials is the
  shared prefix);
* every request asks for one token of output, so the time measured is the time to first token;
* hit and miss trials are interleaved in random order, and the sharing levels are interleaved
  round by round, so drift in the target's load hits all of them alike;
* the hit and miss time samples are compared with a one-sided two-sample Kolmogorov-Smirnov test
  (alternative: hit times are stochastically smaller); a p-value below ``alpha`` means the probe
  can tell, i.e. the cache is shared at that level.

Levels: ``same_key`` (victim and probe use one key: the positive control, sharing expected
where the target caches prefixes at all), ``same_tenant`` (two keys of one tenant),
``other_user`` (one key of a per-user tenant, two values of the request's ``user`` field: a
leak there, since each user is its own scope), and ``other_tenant`` (keys of two tenants:
sharing there is a leak and becomes a ``timing`` finding).
If the positive control shows no cache effect, the negative levels are reported inconclusive:
the target may cache nothing, or the prompts may be too short for the effect to show.

The prober (one HTTP request, returns seconds) is injected; the HTTP client lives in the service.

Sizing a run: with ``n`` trials per level the one-sided test rejects when the KS distance
exceeds about ``sqrt(ln(1/alpha) / n)``, and by the DKW inequality (for two samples of ``n``) the
measured distance falls more than ``e`` below the true one with probability at most
``exp(-n e^2)``. So a true separation ``D`` is detected with power ``1 - beta`` once
``n >= (sqrt(ln(1/alpha)) + sqrt(ln(1/beta)))^2 / D^2`` (:func:`trials_for`); conservative,
with no assumption on the time distributions. :func:`detectable_distance` is the inverse.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from scipy import stats

from audit.errors import AuditConfigError
from audit.finding import Draft, EntryRef, Finding, new_run_id
from audit.protocols import Prober

LevelName = Literal["same_key", "same_tenant", "other_user", "other_tenant"]
LEVEL_NAMES: tuple[LevelName, ...] = ("same_key", "same_tenant", "other_user", "other_tenant")
TimingStatus = Literal["running", "complete", "interrupted"]
#: Detection power the run's sizing is stated at.
POWER = 0.9


def detectable_distance(trials: int, alpha: float, power: float = POWER) -> float:
    """The smallest true KS distance between hit and miss times that ``trials`` trials per level
    detect at significance ``alpha`` with probability ``power`` (see the module docstring)."""
    return _power_root(alpha, power) / math.sqrt(trials)


def trials_for(distance: float, alpha: float, power: float = POWER) -> int:
    """Trials per level that detect a true KS distance ``distance`` with ``power``."""
    if not 0 < distance <= 1:
        raise AuditConfigError("--detect", f"{distance!r} is not in (0, 1]",
                               "give the KS distance to detect, such as 0.3")
    return max(5, math.ceil((_power_root(alpha, power) / distance) ** 2))


def _power_root(alpha: float, power: float) -> float:
    """``sqrt(ln(1/alpha)) + sqrt(ln(1/beta))``: the detectable distance times ``sqrt(n)``."""
    return math.sqrt(math.log(1 / alpha)) + math.sqrt(math.log(1 / (1 - power)))


@dataclass(frozen=True, kw_only=True, slots=True)
class Level:
    """One sharing level: who plants the prompt, who probes, and whether sharing is a leak."""

    name: LevelName
    victim_key: str
    probe_key: str
    leak_if_shared: bool
    victim_user: str | None = None
    probe_user: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class TimingConfig:
    """The protocol's knobs. Defaults follow the published audit where it gives them."""

    trials: int = 250
    prompt_words: int = 300
    shared_fraction: float = 0.9
    alpha: float = 1e-4
    warmup: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 5:
            raise AuditConfigError("--trials", f"{self.trials!r} is too few",
                                   "use at least 5 trials per level (250 in the published audit)")
        if self.prompt_words < 10:
            raise AuditConfigError("--prompt-words", f"{self.prompt_words!r} is too short",
                                   "use at least 10 words; a cache effect needs long prompts")
        if not 0 < self.shared_fraction < 1:
            raise AuditConfigError("--shared-fraction",
                                   f"{self.shared_fraction!r} is not in (0, 1)",
                                   "use a fraction such as 0.9")
        if not 0 < self.alpha < 1:
            raise AuditConfigError("--alpha", f"{self.alpha!r} is not in (0, 1)",
                                   "use a small significance level such as 1e-4")
        if self.warmup < 0:
            raise AuditConfigError("--warmup", f"{self.warmup!r} is negative", "use 0 or more")


@dataclass(frozen=True, kw_only=True, slots=True)
class LevelResult:
    """The two samples of one level, the KS test and the verdict."""

    name: LevelName
    leak_if_shared: bool
    hit_times: Sequence[float]
    miss_times: Sequence[float]
    statistic: float
    p_value: float
    shared: bool
    verdict: str

    @property
    def median_hit(self) -> float:
        return statistics.median(self.hit_times)

    @property
    def median_miss(self) -> float:
        return statistics.median(self.miss_times)

    @property
    def leak(self) -> bool:
        return self.shared and self.leak_if_shared

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "leak_if_shared": self.leak_if_shared,
            "trials": len(self.hit_times),
            "statistic": self.statistic,
            "p_value": self.p_value,
            "shared": self.shared,
            "leak": self.leak,
            "verdict": self.verdict,
            "median_hit_s": self.median_hit,
            "median_miss_s": self.median_miss,
            "hit_times": list(self.hit_times),
            "miss_times": list(self.miss_times),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class TimingResult:
    """Every level of one timing audit against one target."""

    target: str
    started_at: float
    finished_at: float
    config: TimingConfig
    levels: Sequence[LevelResult]
    notes: Sequence[str] = field(default_factory=tuple)
    run_id: str = field(default_factory=new_run_id)
    status: TimingStatus = "complete"
    #: True when the run was for a per-user tenant (``--user``): ``other_user`` is then needed.
    user_scoped: bool = False

    @property
    def leaks(self) -> list[LevelResult]:
        return [lv for lv in self.levels if lv.leak]

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "run_id": self.run_id,
            "status": self.status,
            "user_scoped": self.user_scoped,
            "detectable_distance": detectable_distance(
                min((len(lv.hit_times) for lv in self.levels), default=c.trials) or c.trials,
                c.alpha),
            "target": self.target,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "config": {"trials": c.trials, "prompt_words": c.prompt_words,
                       "shared_fraction": c.shared_fraction, "alpha": c.alpha, "warmup": c.warmup},
            "levels": [lv.as_dict() for lv in self.levels],
            "leaks": [lv.name for lv in self.leaks],
            "notes": list(self.notes),
        }

    def findings(self, *, at: float) -> list[Finding]:
        """One ``timing`` finding per level where sharing is a leak and was detected."""
        out = []
        for lv in self.leaks:
            draft = Draft(
                kind="timing",
                summary=f"prompt cache shared at level {lv.name}: a probe can tell a victim's "
                        "prompt",
                evidence={"level": lv.name, "p_value": lv.p_value, "statistic": lv.statistic,
                          "alpha": self.config.alpha, "trials": len(lv.hit_times),
                          "median_hit_s": lv.median_hit, "median_miss_s": lv.median_miss,
                          "target": self.target, "run_id": self.run_id},
            )
            out.append(draft.stamp(source="timing", entry=EntryRef(scope=lv.name), at=at))
        return out


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def random_words(rng: random.Random, n: int) -> list[str]:
    """``n`` random lowercase words; never seen before, so never cached by anyone else."""
    return ["".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def ks_greater(hit_times: Sequence[float], miss_times: Sequence[float]) -> tuple[float, float]:
    """One-sided two-sample KS: H1 is that hit times are stochastically smaller than miss times
    (the hit sample's CDF lies above the miss sample's)."""
    res = stats.ks_2samp(hit_times, miss_times, alternative="greater")
    return float(res.statistic), float(res.pvalue)


def _verdict(level: Level, shared: bool, control_shared: bool | None) -> str:
    if shared:
        return "LEAK: cache shared across tenants" if level.leak_if_shared else "shared (expected)"
    if level.name == "same_key":
        return "no cache effect measured (positive control)"
    if control_shared is False:
        return "inconclusive: the positive control showed no cache effect"
    return "isolated" if level.leak_if_shared else "not shared"


def run_timing(
    levels: Sequence[Level],
    prober: Prober,
    *,
    target: str,
    config: TimingConfig = TimingConfig(),
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    progress: Callable[[int, int], None] | None = None,
    checkpoint: Callable[[TimingResult], None] | None = None,
    checkpoint_every_s: float = 10.0,
    run_id: str | None = None,
) -> TimingResult:
    """Run the protocol at every level; ``progress(done, total)`` after each trial pair.

    ``checkpoint(partial)`` gets the results so far (``status="running"``, every level with the
    rounds done) at most every ``checkpoint_every_s`` seconds, so a run stopped early still
    leaves its evidence; a caller that catches the stop saves the last one as ``interrupted``.
    """
    if not levels:
        raise AuditConfigError("levels", "no sharing level to test", "pass at least --victim-key")
    names = [lv.name for lv in levels]
    if len(set(names)) != len(names):
        raise AuditConfigError("levels", f"duplicate levels {names}", "test each level once")
    rng = rng if rng is not None else random.Random()
    run_id = run_id or new_run_id()
    started = clock()
    words = config.prompt_words
    shared_n = max(1, int(words * config.shared_fraction))

    def prompt() -> list[str]:
        return random_words(rng, words)

    for _ in range(config.warmup):  # warm the target's code paths and connections
        for lv in levels:
            prober(key=lv.probe_key, prompt=" ".join(prompt()), user=lv.probe_user)
    hits: dict[str, list[float]] = {lv.name: [] for lv in levels}
    misses: dict[str, list[float]] = {lv.name: [] for lv in levels}
    total = config.trials * len(levels)
    done = 0
    last_checkpoint = clock()
    for _ in range(config.trials):
        order = list(levels)
        rng.shuffle(order)
        for lv in order:
            pair = ["hit", "miss"]
            rng.shuffle(pair)
            for which in pair:
                victim = prompt()
                prober(key=lv.victim_key, prompt=" ".join(victim), user=lv.victim_user)
                if which == "hit":
                    probe = victim[:shared_n] + random_words(rng, words - shared_n)
                    hits[lv.name].append(
                        prober(key=lv.probe_key, prompt=" ".join(probe), user=lv.probe_user))
                else:
                    misses[lv.name].append(
                        prober(key=lv.probe_key, prompt=" ".join(prompt()), user=lv.probe_user))
            done += 1
            if progress is not None:
                progress(done, total)
        if checkpoint is not None and clock() - last_checkpoint >= checkpoint_every_s:
            last_checkpoint = clock()
            checkpoint(_result(levels, hits, misses, target=target, config=config,
                               started=started, finished=last_checkpoint, run_id=run_id,
                               status="running"))
    return _result(levels, hits, misses, target=target, config=config, started=started,
                   finished=clock(), run_id=run_id, status="complete")


def _result(levels: Sequence[Level], hits: Mapping[str, Sequence[float]],
            misses: Mapping[str, Sequence[float]], *, target: str, config: TimingConfig,
            started: float, finished: float, run_id: str, status: TimingStatus) -> TimingResult:
    """The KS test and verdict of every level over the trials so far."""
    results_raw: list[tuple[Level, float, float, bool]] = []
    for lv in levels:
        stat, p = ks_greater(hits[lv.name], misses[lv.name])
        results_raw.append((lv, stat, p, p < config.alpha))
    control = next((shared for lv, _, _, shared in results_raw if lv.name == "same_key"), None)
    results = [
        LevelResult(name=lv.name, leak_if_shared=lv.leak_if_shared,
                    hit_times=list(hits[lv.name]), miss_times=list(misses[lv.name]),
                    statistic=stat, p_value=p, shared=shared,
                    verdict=_verdict(lv, shared, control))
        for lv, stat, p, shared in results_raw
    ]
    notes = []
    if control is False:
        notes.append("The same-key positive control showed no cache effect: either the target "
                     "does not cache prompt prefixes, or prompts are too short to show it; "
                     "increase --prompt-words before trusting an 'isolated' verdict.")
    return TimingResult(target=target, started_at=started, finished_at=finished, config=config,
                        levels=results, notes=tuple(notes), run_id=run_id, status=status,
                        user_scoped=any(lv.name == "other_user" for lv in levels))


def levels_for_keys(
    *, key_a: str, key_b: str | None = None, key_a2: str | None = None,
    same_tenant_is_leak: bool = False, user: str | None = None, other_user: str | None = None,
) -> list[Level]:
    """The levels the given keys allow: ``key_a`` alone gives the same-key control, ``key_a2``
    (another key of ``key_a``'s tenant) the same-tenant level, ``key_b`` (another tenant) the
    cross-tenant level. Same-tenant sharing is a leak only where scopes are per user.

    For a per-user tenant (``scope = "user"``) the victim sends ``user`` as the request's
    ``user`` field (its scope), and ``other_user`` adds the level where the probe uses the same
    key as another user: sharing there crosses scopes, a leak."""
    if other_user is not None and user is None:
        raise AuditConfigError("--other-user", "needs the victim's --user",
                               "pass --user U (the victim) with --other-user V")
    if other_user is not None and other_user == user:
        raise AuditConfigError("--other-user", f"{other_user!r} is the victim's own --user",
                               "give another user's name")
    out = [Level(name="same_key", victim_key=key_a, probe_key=key_a, leak_if_shared=False,
                 victim_user=user, probe_user=user)]
    if key_a2:
        out.append(Level(name="same_tenant", victim_key=key_a, probe_key=key_a2,
                         leak_if_shared=same_tenant_is_leak, victim_user=user, probe_user=user))
    if other_user is not None:
        out.append(Level(name="other_user", victim_key=key_a, probe_key=key_a,
                         leak_if_shared=True, victim_user=user, probe_user=other_user))
    if key_b:
        out.append(Level(name="other_tenant", victim_key=key_a, probe_key=key_b,
                         leak_if_shared=True, victim_user=user, probe_user=user))
    return out


def summarize(result: TimingResult) -> Mapping[str, str]:
    """Level -> one line (p-value and verdict), for the CLI."""
    return {
        lv.name: f"p={lv.p_value:.3g} D={lv.statistic:.3f} "
                 f"median hit {lv.median_hit * 1000:.1f} ms / miss {lv.median_miss * 1000:.1f} ms: "
                 f"{lv.verdict}"
        for lv in result.levels
    }
