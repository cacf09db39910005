"""The one query layer: finds the study's runs in the tracking store, returns DataFrames."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from cifarexp import tracking
from cifarexp.config import PRESETS, preset_text
from cifarexp.training.engine import whole_epoch_times

EPOCH_METRICS = [
    "data_time_s", "train_time_s", "epoch_time_s", "train_loss", "train_acc", "images_per_s",
    "test_loss", "test_acc", "mfu", "comm_time_s", "energy_j", "power_w", "energy_per_image_mj",
    "partial_data_s", "partial_train_s", "partial_total_s",  # an epoch cut at max_batches
    "estimate_low_s", "estimate_high_s",  # the range of its whole-epoch estimate
    "other_cpu_load_cpus",  # the CPUs other processes used while the epoch ran
]  # fmt: skip


def _ran_variants(tag: str, found: set[str]) -> list[str]:
    """The variants in a VARIANTS tag. Before VARIANTS_SEPARATOR, stores joined them with
    commas, which a variant may hold (gpus=2,scaling=weak): there, a run of pieces that
    names a variant found is that variant, and the pieces no found variant takes are the
    missing ones."""
    separator = tracking.VARIANTS_SEPARATOR.strip()
    if separator in tag or "," not in tag:
        return [v.strip() for v in tag.split(separator) if v.strip()]
    variants, pending = [], []
    for piece in tag.split(","):
        pending.append(piece)
        for start in range(len(pending)):
            if ",".join(pending[start:]) in found:
                variants += [*pending[:start], ",".join(pending[start:])]
                pending = []
                break
    return variants + pending


def run_settings(run: Mapping[str, object]) -> dict[str, str]:
    """A run's params (a row of `search_runs`), by name."""
    return {
        str(k).removeprefix("params."): v
        for k, v in run.items()
        if str(k).startswith("params.") and isinstance(v, str)
    }


@dataclass(frozen=True)
class Exercise:
    """The runs that answer one item of the study.

    `parent` is the top-level run; `runs` the measured runs, one per variant (the finished
    children, or the parent itself when it has none); `epochs` their per-epoch metrics.
    """

    name: str
    parent: pd.Series
    runs: pd.DataFrame
    epochs: pd.DataFrame

    @property
    def dataset(self) -> str:
        return str(self.parent.get(f"tags.{tracking.DATASET}", "?"))

    @property
    def device_name(self) -> str:
        return str(self.parent.get(f"tags.{tracking.TAG}device_name", "?"))

    @property
    def settings(self) -> str:
        """The parent's main settings (those it has), e.g. 'workers=4, loader=torch'."""
        keys = ("train_size", "workers", "batch_size", "epochs", "loader", "precision")
        keys += ("compile", "timing")
        if isinstance(self.parent.get("params.gpus"), str):  # compare-device --gpus
            keys += ("gpus", "scaling")
        values = {k: self.parent.get(f"params.{k}") for k in keys}
        if isinstance(self.parent.get("params.workers_list"), str):  # a sweep: its counts
            values["workers"] = self.parent["params.workers_list"]
        if values.get("loader") == "gpu":
            values.pop("workers")  # unused: the batches are made on the device
        for switch in ("channels_last", "cuda_graph"):  # shown when on
            if self.parent.get(f"params.{switch}") == "True":
                values[switch] = "True"
        shown = {k: v for k, v in values.items() if isinstance(v, str) and v != "None"}
        settings = ", ".join(f"{k}={v}" for k, v in shown.items())  # train_size None: all
        preset = self.parent.get(f"tags.{tracking.PRESET}")
        if isinstance(preset, str) and preset in PRESETS:
            return f"lab preset {preset} ({preset_text(preset)}), {settings}"
        return settings

    @property
    def params(self) -> dict[str, str]:
        """The parent's params (the settings its children share, and what varies)."""
        return dict(sorted(run_settings(self.parent).items()))

    @property
    def missing_variants(self) -> list[str]:
        """The variants the comparison ran whose finished runs are no longer in the store."""
        ran = str(self.parent.get(f"tags.{tracking.VARIANTS}") or "")
        found = set(self.runs.get(f"tags.{tracking.VARIANT}", pd.Series(dtype=object)))
        return [v for v in _ran_variants(ran, found) if v not in found]

    @property
    def diverged(self) -> dict[str, str]:
        """Variant (or run id) -> the epoch from which its training loss was not finite."""
        column = f"tags.{tracking.DIVERGED}"
        if column not in self.runs:
            return {}
        rows = self.runs[self.runs[column].notna()]
        names = rows.get(f"tags.{tracking.VARIANT}", rows["run_id"]).fillna("")
        return {
            name or run_id: epoch
            for name, run_id, epoch in zip(names, rows["run_id"], rows[column], strict=True)
        }

    @property
    def disturbed(self) -> dict[str, str]:
        """Variant (or run id) -> why its timing cannot be trusted (TIMING_DISTURBED)."""
        rows = self._disturbed_runs()
        if rows.empty:
            return {}
        names = rows.get(f"tags.{tracking.VARIANT}", rows["run_id"]).fillna("")
        return {
            name or run_id: reason
            for name, run_id, reason in zip(
                names, rows["run_id"], rows[f"tags.{tracking.TIMING_DISTURBED}"], strict=True
            )
        }

    @property
    def disturbed_ids(self) -> list[str]:
        """The runs whose timing was disturbed."""
        return list(self._disturbed_runs()["run_id"])

    def _disturbed_runs(self) -> pd.DataFrame:
        column = f"tags.{tracking.TIMING_DISTURBED}"
        if column not in self.runs:
            return self.runs.iloc[:0]
        return self.runs[self.runs[column].notna() & (self.runs[column] != "")]

    @property
    def parent_id(self) -> str:
        return str(self.parent["run_id"])

    @property
    def run_ids(self) -> list[str]:
        return list(self.runs["run_id"])


def latest_finished(exercise: str) -> pd.Series | None:
    """The newest FINISHED top-level run of `exercise`, else None."""
    found = tracking.finished_top_level({tracking.EXERCISE: exercise})
    return None if found.empty else found.iloc[0]


def run_by_id(run_id: str) -> pd.Series | None:
    """The run `run_id` whatever its status, else None (for anything that is no run id)."""
    if not tracking.is_run_id(run_id):
        return None
    found = tracking.search_runs(f"attributes.run_id = '{run_id}'")
    return None if found.empty else found.iloc[0]


def epochs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of `runs`: columns run_id, variant, epoch and one per metric. A
    partial epoch's data-loading and training times are scaled, as its total was, to the
    whole epoch that its epoch_time_s estimates."""
    frames = []
    for run in runs.to_dict("records"):
        # a query per key: only those that a run of `runs` logged (a column of theirs)
        logged = [key for key in EPOCH_METRICS if f"metrics.{key}" in run]
        history = tracking.metric_history(run["run_id"], logged)
        history = history.assign(**whole_epoch_times(history))
        history.insert(0, "variant", run.get(f"tags.{tracking.VARIANT}", ""))
        history.insert(0, "run_id", run["run_id"])
        frames.append(history.rename(columns={"step": "epoch"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def exercise(name: str, run_id: str | None = None) -> Exercise | None:
    """The runs answering `name` (C2…C7, Q1-Q4): the latest finished ones, or `run_id`'s."""
    parent = latest_finished(name) if run_id is None else run_by_id(run_id)
    if parent is None:
        return None
    runs = tracking.finished_children(parent["run_id"])
    if runs.empty:
        runs = parent.to_frame().T.reset_index(drop=True)
    return Exercise(name, parent, runs, epochs(runs))


def profiled_runs() -> pd.DataFrame:
    """The FINISHED runs that were profiled (`--profile`), newest first."""
    return tracking.search_runs("metrics.profile_s >= 0 and attributes.status = 'FINISHED'")


def answers(ex: Exercise) -> dict:
    """The answers an inspect run logged (answers.json: `cifarexp.study.inspection`'s schema)."""
    text = tracking.load_text(ex.parent_id, "answers.json")
    return json.loads(text) if text else {}
