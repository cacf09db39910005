"""The one query layer: finds the study's runs in the tracking store, returns DataFrames."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from cifarexp import tracking

EPOCH_METRICS = [
    "data_time_s", "train_time_s", "epoch_time_s", "train_loss", "train_acc", "images_per_s",
    "test_loss", "test_acc", "mfu", "est_epoch_time_s", "comm_time_s",
]  # fmt: skip
PARENT = "tags.mlflow.parentRunId"


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
        keys = ("workers", "batch_size", "epochs", "loader", "precision", "compile", "timing")
        if isinstance(self.parent.get("params.gpus"), str):  # compare-device --gpus
            keys += ("gpus", "scaling")
        values = {k: self.parent.get(f"params.{k}") for k in keys}
        if isinstance(self.parent.get("params.workers_list"), str):  # a sweep: its counts
            values["workers"] = self.parent["params.workers_list"]
        return ", ".join(f"{k}={v}" for k, v in values.items() if isinstance(v, str))

    @property
    def parent_id(self) -> str:
        return str(self.parent["run_id"])

    @property
    def run_ids(self) -> list[str]:
        return list(self.runs["run_id"])


def top_level(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the runs without a parent."""
    if PARENT not in runs:
        return runs
    return runs[runs[PARENT].isna() | (runs[PARENT] == "")]


def latest_finished(exercise: str) -> pd.Series | None:
    """The newest FINISHED top-level run of `exercise`, else None."""
    where = tracking.tag_filter({tracking.EXERCISE: exercise})
    found = top_level(tracking.search_runs(where + " and attributes.status = 'FINISHED'"))
    return None if found.empty else found.iloc[0]


def run_by_id(run_id: str) -> pd.Series | None:
    """The run `run_id` whatever its status, else None."""
    found = tracking.search_runs(f"attributes.run_id = '{run_id}'")
    return None if found.empty else found.iloc[0]


def finished_children(parent_id: str) -> pd.DataFrame:
    """The FINISHED children of a run, the newest one per variant, in the order they ran."""
    children = tracking.search_runs(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'FINISHED'"
    )
    if children.empty:  # no columns at all: give callers the ones they index
        return pd.DataFrame(columns=["run_id", f"tags.{tracking.VARIANT}"])
    children = children.drop_duplicates(f"tags.{tracking.VARIANT}", keep="first")
    return children.sort_values("start_time").reset_index(drop=True)


def epochs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch metrics of `runs`: columns run_id, variant, epoch and one per metric."""
    frames = []
    for run in runs.to_dict("records"):
        history = tracking.metric_history(run["run_id"], EPOCH_METRICS)
        history.insert(0, "variant", run.get(f"tags.{tracking.VARIANT}", ""))
        history.insert(0, "run_id", run["run_id"])
        frames.append(history.rename(columns={"step": "epoch"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def exercise(name: str, run_id: str | None = None) -> Exercise | None:
    """The runs answering `name` (C2…C7, Q1-Q4): the latest finished ones, or `run_id`'s."""
    parent = latest_finished(name) if run_id is None else run_by_id(run_id)
    if parent is None:
        return None
    runs = finished_children(parent["run_id"])
    if runs.empty:
        runs = parent.to_frame().T.reset_index(drop=True)
    return Exercise(name, parent, runs, epochs(runs))


def latest_sweep(device_type: str, dataset: str) -> pd.Series | None:
    """The newest finished workers sweep (C3) for this device type and dataset."""
    where = {tracking.EXERCISE: "C3", tracking.DEVICE: device_type, tracking.DATASET: dataset}
    found = top_level(
        tracking.search_runs(tracking.tag_filter(where) + " and attributes.status = 'FINISHED'")
    )
    found = found[found["metrics.best_workers"].notna()] if not found.empty else found
    return None if found.empty else found.iloc[0]


def unfinished(exercise: str, params: dict[str, object]) -> pd.Series | None:
    """The newest top-level run of `exercise` (C3, C5, C5-scaling, ...), if it has exactly
    these params and did not finish (FAILED, KILLED, or RUNNING because its process was
    killed outright)."""
    found = top_level(tracking.search_runs(tracking.tag_filter({tracking.EXERCISE: exercise})))
    for _, run in found.iterrows():
        if all(str(run.get(f"params.{k}")) == str(v) for k, v in params.items()):
            return None if run["status"] == "FINISHED" else run
    return None
