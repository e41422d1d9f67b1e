"""How much a clean audit is worth, in numbers: upper confidence bounds on the rate of bad
entries (or hits) when ``bad`` of ``checked`` were found bad.

A reviewer asks "you checked N and found none: how bad could it still be?". The exact answer is
the one-sided Clopper-Pearson bound, the largest rate p for which seeing at most ``bad`` bad
ones in ``checked`` draws still has probability ``1 - confidence``. With none found it is
``1 - (1 - confidence) ** (1 / N)``, about ``3 / N`` at 95% (the rule of three), which the
report shows beside it because reviewers know it.

The bounds assume the checked items are a random sample of what they stand for: true for the
shadow auditor's sampled hits, and for the scan (every entry, so the bound is on the rate of a
process that could have made them).
"""

from __future__ import annotations

from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True, kw_only=True, slots=True)
class Assurance:
    """``bad`` of ``checked`` found bad, and the upper bound on the true rate."""

    checked: int
    bad: int
    upper: float
    confidence: float = CONFIDENCE

    @property
    def rule_of_three(self) -> float | None:
        """``3 / checked`` when nothing was found (the usual approximation), else None."""
        return 3.0 / self.checked if self.checked and not self.bad else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"checked": self.checked, "bad": self.bad, "upper": self.upper,
                "confidence": self.confidence, "rule_of_three": self.rule_of_three}


def upper_bound(bad: int, checked: int, confidence: float = CONFIDENCE) -> float:
    """One-sided exact (Clopper-Pearson) upper bound on a rate after ``bad`` of ``checked``.

    Nothing checked proves nothing: the bound is 1."""
    if checked < 0 or bad < 0 or bad > checked:
        raise ValueError(f"bad={bad}, checked={checked}: need 0 <= bad <= checked")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: need 0 < confidence < 1")
    if checked == 0 or bad == checked:
        return 1.0
    return float(stats.beta.ppf(confidence, bad + 1, checked - bad))


def assess(bad: int, checked: int, confidence: float = CONFIDENCE) -> Assurance:
    return Assurance(checked=checked, bad=bad, upper=upper_bound(bad, checked, confidence),
                     confidence=confidence)
