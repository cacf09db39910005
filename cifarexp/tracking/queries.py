"""Reading the store: runs as DataFrames, metric histories, artifacts, where a run is."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from cifarexp.config import CifarexpError
from cifarexp.tracking.names import DATASET, DEVICE, EXERCISE, PARENT, SETTINGS, VARIANT
from cifarexp.tracking.store import STORE_SCHEMES, redact, root_cause, sqlite_path


def where(run_id: str, *, ui: bool = True) -> list[str]:
    """Where to find `run_id`: its experiment and run, the UI links (runs view; for a
    comparison, its variants on MLflow's compare page too), and, for a store that is no
    tracking server and if `ui`, the command that opens the UI on it (`cifarexp ui`;
    credentials masked)."""
    from cifarexp.tracking import ui as mlflow_ui

    run = mlflow.get_run(run_id)
    experiment = mlflow.get_experiment(run.info.experiment_id)
    uri = mlflow.get_tracking_uri()
    server = mlflow_ui.is_server(uri)
    base = redact(uri).rstrip("/") if server else f"http://{mlflow_ui.HOST}:{mlflow_ui.PORT}"
    page = f"{base}/#/experiments/{experiment.experiment_id}"
    view = mlflow_ui.RUNS_VIEW
    lines = [
        f"Experiment {experiment.name!r}, run {run.info.run_name!r} ({run_id}).",
        f"In the MLflow UI: {page}{view} (the experiment's runs), "
        f"{page}/runs/{run_id}{view} (this run).",
    ]
    children = list(finished_children(run_id)["run_id"])
    if len(children) > 1:
        runs = json.dumps(children, separators=(",", ":"))
        experiments = json.dumps([experiment.experiment_id])
        lines.append(
            f"Its variants side by side: {base}/#/compare-runs?runs={quote(runs)}"
            f"&experiments={quote(experiments)}"
        )
    if ui and not server:
        lines.append(f"See it in the MLflow UI: {mlflow_ui.command(uri)}")
    return lines


def search_runs(filter_string: str = "") -> pd.DataFrame:
    """Runs of every experiment matching `filter_string`, newest first, as MLflow's DataFrame
    (columns run_id, status, start_time, params.*, tags.*, metrics.*)."""
    return mlflow.search_runs(
        filter_string=filter_string,
        search_all_experiments=True,
        order_by=["attributes.start_time DESC"],
    )


def load_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact of `run_id`, or None where the run has none of that name."""
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError):
        return None


def metric_history(run_id: str, keys: list[str]) -> pd.DataFrame:
    """One row per step of `run_id`, one column per metric key (absent keys are left out)."""
    client = mlflow.MlflowClient()
    series = {
        key: pd.Series({m.step: m.value for m in client.get_metric_history(run_id, key)})
        for key in keys
    }
    frame = pd.DataFrame({k: v for k, v in series.items() if not v.empty})
    return frame.rename_axis("step").reset_index()


RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: a UUID's 32 hex digits


def is_run_id(text: str) -> bool:
    """Whether `text` has the form of a run id (checked before it goes into a filter)."""
    return RUN_ID.fullmatch(text) is not None


def tag_filter(tags: Mapping[str, str]) -> str:
    """An MLflow filter string matching every tag exactly."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


def top_level(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the runs without a parent."""
    column = f"tags.{PARENT}"
    if column not in runs:
        return runs
    return runs[runs[column].isna() | (runs[column] == "")]


def finished_children(parent_id: str) -> pd.DataFrame:
    """The FINISHED children of a run, the newest one per variant, in the order they ran."""
    children = search_runs(children_filter(parent_id, "FINISHED"))
    if children.empty:  # no columns at all: give callers the ones they index
        return pd.DataFrame(columns=["run_id", f"tags.{VARIANT}"])
    children = children.drop_duplicates(f"tags.{VARIANT}", keep="first")
    return children.sort_values("start_time").reset_index(drop=True)


def children_filter(parent_id: str, status: str) -> str:
    """The filter of the children of `parent_id` with `status`."""
    return f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = '{status}'"


def finished_top_level(tags: Mapping[str, str]) -> pd.DataFrame:
    """The FINISHED runs without a parent whose tags have these values, newest first."""
    return top_level(search_runs(tag_filter(tags) + " and attributes.status = 'FINISHED'"))


def latest_sweep(device_type: str, dataset: str) -> pd.Series | None:
    """The newest finished workers sweep (C3) for this device type and dataset."""
    found = finished_top_level({EXERCISE: "C3", DEVICE: device_type, DATASET: dataset})
    found = found[found["metrics.best_workers"].notna()] if not found.empty else found
    return None if found.empty else found.iloc[0]


def settings_digest(params: Mapping[str, object]) -> str:
    """A short digest of a comparison's settings (its params)."""
    text = json.dumps({k: str(v) for k, v in params.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def with_settings(exercise: str, params: Mapping[str, object]) -> pd.Series | None:
    """The newest top-level run of `exercise` (C3, C5, C5-scaling, ...) with these settings,
    whatever its status: FINISHED, or unfinished (FAILED, KILLED, or RUNNING because its
    process was killed outright or is still running: see `start_run`'s reopen)."""
    found = top_level(search_runs(tag_filter({EXERCISE: exercise})))
    digest = settings_digest(params)
    for _, run in found.iterrows():
        same = run.get(f"tags.{SETTINGS}") == digest or all(
            str(run.get(f"params.{k}")) == str(v) for k, v in params.items()
        )
        if same:
            return run
    return None


# ---------------------------------------------------------------- another study's store


def experiment_id(name: str) -> str | None:
    """The id of the experiment `name` in the store, else None."""
    experiment = mlflow.get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id


@contextmanager
def reading(uri: str) -> Iterator[None]:
    """Every query inside reads the store at `uri` (another study's, never created nor
    changed here), then the session's store again. A URI that names no store, or a store
    that cannot be read, is one CifarexpError."""
    scheme = uri.partition(":")[0].split("+")[0]
    if scheme not in STORE_SCHEMES:
        raise CifarexpError(f"{redact(uri)!r} is not a tracking URI (e.g. sqlite:///other.db)")
    if scheme == "sqlite":
        path = Path(sqlite_path(uri))
        if not uri.startswith("sqlite:///") or not path.is_file() or not path.stat().st_size:
            raise CifarexpError(f"no tracking store at {redact(uri)} (no such database file)")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except Exception as exc:  # a missing driver, not a database, an older schema, ...
            raise CifarexpError(
                f"cannot read the tracking store {redact(uri)} ({root_cause(exc)})"
            ) from None
        yield
    finally:
        mlflow.set_tracking_uri(previous)
