"""Each item's figures as numbers with their spread, the settings they were measured with,
and a name that finds the same figure in another study (or in the reference's)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import median

import pandas as pd

from analysis.queries import Exercise, run_settings
from analysis.tables import SCALING_STEADY_FROM
from cifarexp import tracking

# The kinds of figure: per-epoch seconds or joules, a final accuracy, a count of the model's
# anatomy, a ratio of times (the GPU's speedup), a worker count (C3's best), a word.
TIME, ENERGY, ACCURACY, COUNT = "time", "energy", "accuracy", "count"
RATIO, WORKERS, TEXT = "ratio", "workers", "text"
# Per-epoch seconds compared for each run of an item: the item's own question.
TIMED = {
    "C2": ("data_time_s", "train_time_s", "epoch_time_s"),
    "C3": ("data_time_s",),
    "C5": ("epoch_time_s",),
    "C5-scaling": ("epoch_time_s",),
    "C6": ("train_time_s",),
    "C7": (),
}
# The item's steady epochs, where its table leaves out the first ones.
FIRST_EPOCH = {"C5-scaling": SCALING_STEADY_FROM}
FIGURE_NAMES = {
    "data_time_s": "data-loading s/epoch",
    "train_time_s": "training s/epoch",
    "epoch_time_s": "epoch s",
    "energy_j": "energy J/epoch",
}
FINAL_ACCURACY = ("C2", "C6", "C7")  # the items whose final training accuracy is an answer
Q_COUNTS = {  # the inspect run's metrics: the model's anatomy
    "conv_layers": "Q1 conv layers",
    "last_linear_in_features": "Q2 last linear layer's input",
    "trainable_params": "Q3 trainable parameters",
}
# Params that say where or how a run was kept, not what it measured: never compared. The
# device is the machine being compared; a CPU epoch estimated from fewer batches
# (max_batches) is still an estimate of the same epoch.
NOT_SETTINGS = frozenset(
    {"data_dir", "device", "seed", "profile", "eval", "test_size", "loader_timeout",
     "max_batches", "out"}
)  # fmt: skip
# ... and the params a kind of figure does not depend on. Synthetic data is stored and
# transformed as CIFAR-10 is (timings mean the same); how batches are loaded or executed
# does not change what the model learns; the model's anatomy depends on none of them.
LOADING = frozenset(
    {"workers", "pin_memory", "persistent_workers", "loader", "timing", "compile",
     "cuda_graph", "channels_last", "warmup", "precision"}
)  # fmt: skip
# An epoch does the same work whatever the step size and however many epochs follow it.
PER_EPOCH = frozenset({"dataset", "lr", "momentum", "weight_decay", "epochs"})
INDEPENDENT = {
    TIME: PER_EPOCH,
    ENERGY: PER_EPOCH,
    ACCURACY: LOADING - {"precision"},
    COUNT: LOADING | {"dataset", "train_size", "batch_size", "epochs", "lr"},
    RATIO: PER_EPOCH,
    WORKERS: PER_EPOCH,
    TEXT: PER_EPOCH,
}


SPREAD = "times: the median over the epochs (min–max)"


@dataclass(frozen=True)
class Measure:
    """One figure of an item: per-epoch values (times, energy) or one value, with the
    settings (run params) it depends on."""

    item: str  # C2 ... Q1-Q4
    figure: str  # e.g. "training s/epoch (optimizer=sgd)": the same name in every study
    kind: str  # TIME, ENERGY, ACCURACY, COUNT, RATIO, WORKERS or TEXT
    values: tuple[float, ...] = ()
    text: str = ""  # a TEXT figure's value (what bounds the step)
    settings: Mapping[str, str] = field(default_factory=dict)
    epoch_s: float | None = None  # a time's run's median epoch: the scale of its noise

    @property
    def value(self) -> float:
        """The median over the epochs (the one value of the others)."""
        return median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def relevant(self) -> dict[str, str]:
        """The settings that this kind of figure depends on."""
        ignored = NOT_SETTINGS | INDEPENDENT[self.kind]
        return {k: v for k, v in self.settings.items() if k not in ignored}

    def shown(self) -> str:
        """The figure as a reader reads it: a time's median over the epochs, then their
        min–max (SPREAD)."""
        if self.kind == TEXT:
            return self.text
        if self.kind == ACCURACY:
            return f"{self.value:.1%}"
        if self.kind in (COUNT, WORKERS):
            return f"{self.value:,.0f}"
        if self.kind == RATIO:
            return f"{self.value:.1f}x"
        unit = "s" if self.kind == TIME else "J"
        if len(self.values) == 1:
            return f"{self.value:.2f} {unit} (1 epoch)"
        return f"{self.value:.2f} {unit} ({self.low:.2f}–{self.high:.2f})"


def measures(ex: Exercise) -> list[Measure]:
    """The figures of one item (an Exercise), in the order a reader reads them."""
    found = []
    for run in ex.runs.to_dict("records"):
        variant = run.get(f"tags.{tracking.VARIANT}")
        suffix = f" ({variant})" if isinstance(variant, str) and variant else ""
        settings = run_settings(run)
        epochs = _epochs_of(ex, run["run_id"])
        epoch_s = _median_epoch(epochs)
        metrics = [*TIMED.get(ex.name, ()), "energy_j"] if ex.name in TIMED else []
        for metric in metrics:
            if metric in epochs and epochs[metric].notna().any():
                kind = ENERGY if metric == "energy_j" else TIME
                values = tuple(epochs[metric].dropna())
                name = FIGURE_NAMES[metric] + suffix
                scale = epoch_s if kind == TIME else None  # an energy's noise is its own
                found.append(Measure(ex.name, name, kind, values, "", settings, scale))
        if (
            ex.name in FINAL_ACCURACY
            and "train_acc" in epochs
            and epochs["train_acc"].notna().any()
        ):
            final = (float(epochs["train_acc"].dropna().iloc[-1]),)
            found.append(Measure(ex.name, "final accuracy" + suffix, ACCURACY, final, "", settings))
    return found + _answers(ex)


def _epochs_of(ex: Exercise, run_id: str) -> pd.DataFrame:
    """A run's epochs in order (its steady ones, for an item with FIRST_EPOCH)."""
    if ex.epochs.empty:
        return ex.epochs
    epochs = ex.epochs[ex.epochs["run_id"] == run_id].sort_values("epoch")
    first = FIRST_EPOCH.get(ex.name, 1)
    return epochs[epochs["epoch"] >= first] if len(epochs) >= first else epochs


def _median_epoch(epochs: pd.DataFrame) -> float | None:
    """The median epoch time of a run's epochs, where they have one."""
    if "epoch_time_s" not in epochs or epochs["epoch_time_s"].isna().all():
        return None
    return float(epochs["epoch_time_s"].median())


def _answers(ex: Exercise) -> list[Measure]:
    """The item's answers that are no per-run figure: the best worker count and the loader
    at it (C3), the GPU's speedup (C5), what bounds the step (C2, when profiled), the
    model's counts (Q1-Q4)."""
    parent, settings = ex.parent, run_settings(ex.parent)
    found = []
    if ex.name == "C3" and pd.notna(parent.get("metrics.best_workers")):
        best = int(parent["metrics.best_workers"])
        found.append(Measure("C3", "best workers", WORKERS, (best,), "", settings))
        at_best = [
            run
            for run in ex.runs.to_dict("records")
            if run.get("params.workers") == str(best) and run.get("params.loader") != "gpu"
        ]
        if at_best:
            epochs = _epochs_of(ex, at_best[0]["run_id"])
            waits = tuple(epochs["data_time_s"].dropna())
            kept = {k: v for k, v in run_settings(at_best[0]).items() if k != "workers"}
            name = "data-loading s/epoch (best count)"
            found.append(Measure("C3", name, TIME, waits, "", kept, _median_epoch(epochs)))
    if ex.name == "C5":
        per_device = {
            run.get("params.device"): _epochs_of(ex, run["run_id"])["epoch_time_s"].median()
            for run in ex.runs.to_dict("records")
        }
        gpu = [v for d, v in per_device.items() if str(d).startswith("cuda")]
        if "cpu" in per_device and gpu:
            speedup = (per_device["cpu"] / min(gpu),)
            found.append(Measure("C5", "GPU speedup vs CPU", RATIO, speedup, "", settings))
    verdict = parent.get(f"tags.{tracking.VERDICT}")
    if ex.name == "C2" and isinstance(verdict, str) and verdict:
        bound = verdict.partition(":")[0]
        found.append(Measure("C2", "what bounds the step", TEXT, (), bound, settings))
    if ex.name == "Q1-Q4":
        found += [
            Measure("Q1-Q4", name, COUNT, (float(parent[f"metrics.{metric}"]),), "", settings)
            for metric, name in Q_COUNTS.items()
            if pd.notna(parent.get(f"metrics.{metric}"))
        ]
    return found
