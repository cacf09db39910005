"""Two studies side by side: every item's figures from this store's latest finished runs
(yours) and from a baseline (another store, an experiment, or run ids), the ratio, the
difference, and a verdict that knows the noise: a difference inside the epochs' spread of
both sides is within noise, not a speed-up or a slow-down."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import measures, queries
from analysis.folder import csv_bytes, markdown_table, md_text, png_bytes, write_folder
from analysis.measures import ACCURACY, ENERGY, RATIO, TIME, Measure
from analysis.tables import EPOCH_NOISE
from cifarexp import tracking
from cifarexp.config import CifarexpError, ConfigError
from cifarexp.study.catalogue import SECTIONS

CAPTION = (
    f"{measures.SPREAD}; within noise: the two sides' epochs overlap, or differ by "
    f"{EPOCH_NOISE:.0%} of the epoch (of the energy) at most; ratio: yours / the "
    "baseline's; not comparable: the settings that differ, the baseline's vs yours"
)
BASELINE_GRAMMAR = (
    "give a tracking URI (sqlite:///other.db, http://HOST:PORT), an experiment name, or "
    "run ids separated by commas"
)


# ---------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class Source:
    """Where the baseline's runs are: a store's latest finished runs (`uri`), an
    experiment's of this store (`experiment`), or the given top-level `run_ids`."""

    text: str
    uri: str | None = None
    experiment: str | None = None
    run_ids: tuple[str, ...] = ()

    @property
    def shown(self) -> str:
        if self.uri is not None:
            return tracking.redact(self.uri)
        if self.experiment is not None:
            return f"experiment {self.experiment!r} of {tracking.shown_uri()}"
        return f"runs {', '.join(self.run_ids)} of {tracking.shown_uri()}"


def parse_source(text: str) -> Source:
    """--baseline's SOURCE: a tracking URI (it has a scheme, e.g. sqlite:///other.db), run ids
    (32 hex digits each, separated by commas), else an experiment name."""
    text = text.strip()
    if not text:
        raise ConfigError(f"no baseline given; {BASELINE_GRAMMAR}", "baseline")
    if "://" in text or text.startswith("sqlite:"):
        return Source(text, uri=text)
    parts = [part.strip() for part in text.split(",")]
    if any(tracking.is_run_id(part) for part in parts):
        bad = [part for part in parts if not tracking.is_run_id(part)]
        if bad:
            raise ConfigError(f"{bad[0]!r} is not a run id (32 hex digits)", "baseline")
        return Source(text, run_ids=tuple(parts))
    return Source(text, experiment=text)


@dataclass
class Study:
    """One side: the runs answering each item (those found), and where they came from."""

    label: str  # "baseline" or "yours"
    where: str
    exercises: dict[str, queries.Exercise]

    @cached_property
    def measures(self) -> dict[tuple[str, str], Measure]:
        """(item, figure) -> the figure, every item's, in the study's order."""
        return {
            (m.item, m.figure): m for ex in self.exercises.values() for m in measures.measures(ex)
        }

    def tag_values(self, tag: str) -> str:
        """The values of `tag` over every run of the study, in order ('not recorded': none)."""
        values = []
        for ex in self.exercises.values():
            for frame in (ex.parent.to_frame().T, ex.runs):
                values += [v for v in frame.get(f"tags.{tag}", []) if isinstance(v, str) and v]
        return ", ".join(dict.fromkeys(values)) or "not recorded"

    def about(self) -> str:
        """What the side ran on: device, dataset, lab preset, source commit."""
        commits = self.tag_values(tracking.COMMIT)
        if commits != "not recorded":
            commits = ", ".join(commit[:10] for commit in commits.split(", "))
        return (
            f"{self.label}: {self.where}; device {self.tag_values(tracking.TAG + 'device_name')};"
            f" dataset {self.tag_values(tracking.DATASET)}; preset "
            f"{self.tag_values(tracking.PRESET)}; commit {commits}"
        )


def latest(label: str) -> Study:
    """The latest finished run of each item in the store read, as the report takes them."""
    found = {item: queries.exercise(item) for item in SECTIONS}
    return Study(label, tracking.shown_uri(), {k: v for k, v in found.items() if v})


def read_baseline(source: Source) -> Study:
    """The baseline's runs, from wherever `source` says; bad input is one ConfigError."""
    if source.uri is not None:
        try:
            with tracking.reading(source.uri):
                return latest("baseline")
        except CifarexpError as exc:
            raise ConfigError(exc.message, "baseline") from None
    if source.experiment is not None:
        run_ids = _experiment_runs(source.experiment)
    else:
        run_ids = _given_runs(source.run_ids)
    found = {item: queries.exercise(item, run_id) for item, run_id in run_ids.items()}
    return Study("baseline", source.shown, {k: v for k, v in found.items() if v})


def _experiment_runs(name: str) -> dict[str, str]:
    """Item -> the latest finished top-level run of it in the experiment `name`."""
    experiment_id = tracking.experiment_id(name)
    if experiment_id is None:
        raise ConfigError(
            f"no experiment {name!r} in {tracking.shown_uri()}; {BASELINE_GRAMMAR}", "baseline"
        )
    run_ids = {}
    for item in SECTIONS:
        runs = tracking.finished_top_level({tracking.EXERCISE: item})
        runs = runs[runs["experiment_id"] == experiment_id] if not runs.empty else runs
        if not runs.empty:
            run_ids[item] = str(runs.iloc[0]["run_id"])
    return run_ids


def _given_runs(run_ids: tuple[str, ...]) -> dict[str, str]:
    """Item -> run id, each a finished top-level run of one item of the study."""
    found: dict[str, str] = {}
    for run_id in run_ids:
        run = queries.run_by_id(run_id)
        if run is None:
            raise ConfigError(f"no run {run_id} in {tracking.shown_uri()}", "baseline")
        item = run.get(f"tags.{tracking.EXERCISE}")
        if item not in SECTIONS:
            raise ConfigError(f"run {run_id} answers no item of the study", "baseline")
        if isinstance(run.get(f"tags.{tracking.PARENT}"), str):
            raise ConfigError(
                f"run {run_id} is a variant of a comparison: give its parent", "baseline"
            )
        if run["status"] != "FINISHED":
            raise ConfigError(f"run {run_id} is {run['status']}, not FINISHED", "baseline")
        if item in found:
            raise ConfigError(f"two runs of {item}: {found[item]} and {run_id}", "baseline")
        found[item] = run_id
    return found


# ---------------------------------------------------------------- the comparison

# The verdicts in the order the summary counts them.
VERDICTS = ["slower", "faster", "more", "less", "within noise", "higher", "lower", "same",
            "differs", "not comparable", "missing in the baseline", "missing in yours"]  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One figure of both sides (None: the side does not have it) and its verdict."""

    item: str
    figure: str
    baseline: Measure | None
    yours: Measure | None

    @property
    def differing(self) -> list[str]:
        """The settings this figure depends on that differ: 'name baseline vs yours'."""
        if self.baseline is None or self.yours is None:
            return []
        mine, theirs = self.yours.relevant, self.baseline.relevant
        return [
            f"{k} {theirs[k]} vs {mine[k]}" for k in theirs if k in mine and theirs[k] != mine[k]
        ]

    @property
    def ratio(self) -> float | None:
        """Yours / the baseline's, for figures that are numbers and comparable."""
        numbers = (TIME, ENERGY, RATIO)
        if self.differing or self.baseline is None or self.yours is None:
            return None
        if self.yours.kind not in numbers or not self.baseline.value:
            return None
        return self.yours.value / self.baseline.value

    @property
    def within_noise(self) -> bool:
        """Whether the two sides' epochs overlap (some epoch of one took as long as some epoch
        of the other: every epoch of yours must be slower for a slow-down), or their medians
        differ by less than EPOCH_NOISE of the epoch, for a time, or of themselves, for an
        energy (a figure of one epoch has no spread of its own; a wait of 0.05 s that grew
        by 8% in a 5 s epoch is noise)."""
        b, y = self.baseline, self.yours
        overlap = y.low <= b.high and b.low <= y.high
        scale = max(b.value, y.value, b.epoch_s or 0.0, y.epoch_s or 0.0)
        return overlap or abs(y.value - b.value) <= EPOCH_NOISE * scale

    @property
    def verdict(self) -> str:
        b, y = self.baseline, self.yours
        if b is None or y is None:
            return f"missing in {'the baseline' if b is None else 'yours'}"
        if self.differing:
            return f"not comparable: {'; '.join(self.differing)}"
        if y.kind in (TIME, ENERGY):
            if self.within_noise:
                return "within noise"
            more, less = ("slower", "faster") if y.kind == TIME else ("more", "less")
            return more if y.value > b.value else less
        if y.kind in (ACCURACY, RATIO):
            if abs(y.value - b.value) < (0.0005 if y.kind == ACCURACY else 0.05 * b.value):
                return "same"
            return "higher" if y.value > b.value else "lower"
        same = y.text == b.text if y.kind == measures.TEXT else y.values == b.values
        return "same" if same else "differs"

    @property
    def difference(self) -> str:
        """Yours less the baseline's, in the figure's unit."""
        b, y = self.baseline, self.yours
        if self.ratio is None or y.kind == RATIO:
            if b is not None and y is not None and y.kind == ACCURACY and not self.differing:
                return f"{100 * (y.value - b.value):+.1f} points"
            return ""
        unit = "s" if y.kind == TIME else "J"
        return f"{y.value - b.value:+.2f} {unit} ({self.ratio - 1:+.1%})"

    def slower_than(self, threshold: float) -> bool:
        """A time slower beyond the noise and by more than `threshold` (0.05: 5%)."""
        ratio = self.ratio
        return self.verdict == "slower" and ratio is not None and ratio > 1 + threshold

    def slower_line(self, threshold: float) -> str:
        b, y = self.baseline, self.yours
        return (
            f"slower: {self.item} {self.figure}: {y.value:.2f} s against {b.value:.2f} s "
            f"({self.ratio - 1:+.1%}, beyond {percent(threshold)} and beyond both sides' epochs)"
        )


@dataclass
class Comparison:
    baseline: Study
    yours: Study
    rows: list[Row] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per figure: both sides (median and spread), ratio, difference, verdict."""
        return pd.DataFrame(
            {
                "item": [r.item for r in self.rows],
                "figure": [r.figure for r in self.rows],
                "baseline": [r.baseline.shown() if r.baseline else "missing" for r in self.rows],
                "yours": [r.yours.shown() if r.yours else "missing" for r in self.rows],
                "ratio": [r.ratio if r.ratio is not None else float("nan") for r in self.rows],
                "difference": [r.difference for r in self.rows],
                "verdict": [r.verdict for r in self.rows],
            }
        )

    def slower(self, threshold: float | None) -> list[str]:
        """One line per time slower beyond the noise and `threshold` (none without one)."""
        if threshold is None:
            return []
        return [r.slower_line(threshold) for r in self.rows if r.slower_than(threshold)]

    def summary(self, threshold: float | None) -> str:
        """The verdict in a sentence: how many figures fall under each verdict."""
        verdicts = [row.verdict.split(":")[0] for row in self.rows]
        shown = sorted(set(verdicts), key=lambda v: (VERDICTS.index(v) if v in VERDICTS else 99, v))
        text = ", ".join(f"{verdicts.count(v)} {v}" for v in shown) or "nothing to compare"
        if threshold is None:
            return f"Yours against the baseline: {text}."
        slower = [f"{r.item} {r.figure}" for r in self.rows if r.slower_than(threshold)]
        check = (
            f"{len(slower)} slower beyond {percent(threshold)} and the noise ({'; '.join(slower)})"
            if slower
            else f"nothing slower beyond {percent(threshold)} and the noise"
        )
        return f"Yours against the baseline: {text}. Regression check: {check}."

    def description(self, threshold: float | None) -> str:
        """The run's description (markdown): the sides, then the verdict."""
        sides = "\n".join(f"- {md_text(s.about())}" for s in (self.baseline, self.yours))
        return f"**{self.summary(threshold)}**\n\n{sides}"

    def figures(self) -> dict[str, Figure]:
        """A plot per item with times: each side's epochs and median, figure by figure."""
        return {
            f"compare_{item.lower().replace('-', '_')}": times_plot(item, rows)
            for item in SECTIONS
            if (rows := [r for r in self.rows if r.item == item and _kind(r) == TIME])
        }


def _kind(row: Row) -> str:
    return (row.yours or row.baseline).kind


def compare(baseline: Study, yours: Study) -> Comparison:
    """Every figure either side has, item by item, yours first."""
    keys = list(dict.fromkeys([*yours.measures, *baseline.measures]))
    order = {item: i for i, item in enumerate(SECTIONS)}
    keys.sort(key=lambda key: order[key[0]])  # stable: each side's order within an item
    rows = [
        Row(item, figure, baseline.measures.get((item, figure)), yours.measures.get((item, figure)))
        for item, figure in keys
    ]
    return Comparison(baseline, yours, rows)


def percent(fraction: float) -> str:
    """0.05 as '5%', 0.025 as '2.5%'."""
    return f"{100 * fraction:g}%"


PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%?")


def parse_threshold(text: str) -> float:
    """--fail-if-slower's percentage ('5%' or '5') as a fraction (0.05)."""
    found = PERCENT.fullmatch(text.strip())
    if found is None:
        raise ConfigError(f"{text!r} is not a percentage; give e.g. 5%", "fail_if_slower")
    return float(found.group(1)) / 100


# ---------------------------------------------------------------- the plot and the folder


def times_plot(item: str, rows: list[Row]) -> Figure:
    """One item's times: a row per figure, each side's epochs as dots, its median as a bar."""
    fig = Figure(figsize=(9, 1.4 + 0.55 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    for offset, side, color in ((-0.15, "baseline", "C0"), (0.15, "yours", "C1")):
        label = side  # on the side's first dots only
        for i, row in enumerate(rows):
            if (m := getattr(row, side)) is not None:
                y = i + offset
                ax.plot(m.values, [y] * len(m.values), "o", color=color, alpha=0.5, label=label)
                ax.plot([m.value] * 2, [y - 0.12, y + 0.12], "-", color=color, lw=3)
                label = None
    ax.set_yticks(range(len(rows)), [f"{r.figure}\n{r.verdict[:40]}" for r in rows])
    ax.invert_yaxis()
    values = [v for r in rows for m in (r.baseline, r.yours) if m for v in m.values]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_xscale("log")  # a CPU epoch beside a GPU's
    else:
        ax.set_xlim(left=0)
    ax.set(xlabel="seconds per epoch (dots: epochs; bar: median)")
    ax.set_title(f"{item}: baseline against yours")
    ax.legend()
    return fig


def write(comparison: Comparison, out: Path, threshold: float | None) -> Path:
    """`out`/compare.md (the sides, the table, the verdict, the plots), comparison.csv and
    one PNG per item with times; written whole or not at all (`folder.write_folder`)."""
    table = comparison.table()
    files = {"comparison.csv": csv_bytes(table)}
    lines = [
        "# cifarexp compare",
        "",
        *(f"- {md_text(s.about())}" for s in (comparison.baseline, comparison.yours)),
    ]
    lines += ["", md_text(comparison.summary(threshold)), "", markdown_table(table), ""]
    lines += [f"*{md_text(CAPTION)}*", ""]
    lines += [f"- {md_text(line)}" for line in comparison.slower(threshold)]
    for name, figure in comparison.figures().items():
        files[f"{name}.png"] = png_bytes(figure)
        lines += ["", f"![{name}]({name}.png)"]
    files["compare.md"] = ("\n".join(lines) + "\n").encode()
    write_folder(out, files)
    return out / "compare.md"
