"""The noise of a timing: each run's median over its epochs with their range, whether its
timing was disturbed (the run's TIMING_DISTURBED tag, see cifarexp.training.noise), and
when two timings differ by no more than that noise (docs/timing.md: "Disturbed timings")."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis.queries import Exercise
from cifarexp.config import EPOCH_SPREAD_TOLERANCE

LOW, HIGH = " min", " max"  # a timing column's range over the epochs: "training s min"
DISTURBED = "disturbed"  # a table's column: "yes" for a run whose timing was disturbed


@dataclass(frozen=True)
class Timing:
    """A run's timing: the median over its epochs, their min and max, and whether the run's
    timing was disturbed."""

    median: float
    low: float
    high: float
    disturbed: bool = False

    @classmethod
    def of(cls, row: pd.Series, column: str) -> Timing:
        """The timing `column` of a table's row (with its `column min`/`column max`)."""
        value = float(row[column])
        return cls(
            value,
            float(row.get(column + LOW, value)),
            float(row.get(column + HIGH, value)),
            row.get(DISTURBED) == "yes",
        )

    def within_noise(self, other: Timing, tolerance: float) -> str | None:
        """Why this timing and `other` differ by noise only, or None: their epochs' ranges
        overlap; the medians differ by `tolerance` (of the smaller) at most; or a run's
        timing was disturbed and they differ by EPOCH_SPREAD_TOLERANCE at most."""
        smaller = min(self.median, other.median)
        difference = abs(self.median - other.median)
        if difference <= tolerance * smaller:
            return f"they differ by {tolerance:.0%} at most"
        if self.low <= other.high and other.low <= self.high:
            return "their epochs' times overlap"
        if (self.disturbed or other.disturbed) and difference <= EPOCH_SPREAD_TOLERANCE * smaller:
            return (
                f"they differ by less than {EPOCH_SPREAD_TOLERANCE:.0%} and a run's timing was "
                "disturbed"
            )
        return None


def spread(ex: Exercise, metrics: dict[str, str]) -> pd.DataFrame:
    """Per measured run (in run order, indexed by run id): each of `metrics` (metric -> its
    column's name) as the median over its epochs, then its min and max (`name min`, `name
    max`)."""
    grouped = ex.epochs.groupby("run_id", sort=False)[list(metrics)]
    median, low, high = grouped.median(), grouped.min(), grouped.max()
    columns = {}
    for metric, name in metrics.items():
        columns |= {name: median[metric], name + LOW: low[metric], name + HIGH: high[metric]}
    table = pd.DataFrame(columns)
    return table.loc[[r for r in ex.runs["run_id"] if r in table.index]]


def disturbed_column(ex: Exercise, run_ids: pd.Series) -> dict[str, list[str]]:
    """{DISTURBED: "yes" or "" per run} where a run of `ex` was disturbed; else nothing."""
    disturbed = set(ex.disturbed_ids)
    if not disturbed:
        return {}
    return {DISTURBED: ["yes" if r in disturbed else "" for r in run_ids]}


def disturbed_notes(ex: Exercise) -> list[str]:
    """One line per run whose timing was disturbed, with why."""
    return [
        f"Timings disturbed{'' if name == ex.parent_id else f', {name}'}: {reason}."
        for name, reason in ex.disturbed.items()
    ]


def within_noise_note(names: list[str], timings: list[Timing], what: str, tolerance: float) -> str:
    """A line naming the runs whose `what` is within noise of the fastest's (none: "")."""
    if len(timings) < 2:
        return ""
    fastest = min(range(len(timings)), key=lambda i: timings[i].median)
    close = [
        (names[i], why)
        for i in range(len(timings))
        if i != fastest and (why := timings[fastest].within_noise(timings[i], tolerance))
    ]
    if not close:
        return ""
    shown = lambda i: f"{names[i]} {_range(timings[i])}"  # noqa: E731
    others = ", ".join(shown(names.index(name)) for name, _ in close)
    reasons = "; ".join(dict.fromkeys(why for _, why in close))
    verb = "does" if len(close) == 1 else "do"
    return (
        f"Within noise: the {what} of {others} {verb} not differ beyond noise from the "
        f"fastest, {shown(fastest)} ({reasons}); do not rank them."
    )


def _range(timing: Timing) -> str:
    if timing.low == timing.high:
        return f"{timing.median:.2f} s"
    return f"{timing.median:.2f} s ({timing.low:.2f}–{timing.high:.2f})"
