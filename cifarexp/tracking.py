"""The only module that talks to MLflow: the store, runs and their status, what gets logged."""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from cifarexp.config import CifarexpError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cifarexp.engine import EpochResult

TAG = "cifarexp."  # prefix of every tag this project sets
COMMAND, EXERCISE, VARIANT, DATASET, DEVICE = (
    TAG + name for name in ("command", "exercise", "variant", "dataset", "device")
)
ERROR = TAG + "error"
STORE_ERRORS: tuple[type[Exception], ...] = (MlflowException,)  # failures of the store itself


def use_store(tracking_uri: str | None) -> str:
    """Point MLflow at `tracking_uri` (else MLFLOW_TRACKING_URI, else MLflow's default).

    A tracking server is checked up front, so an unreachable one is one clear error
    instead of minutes of retries.
    """
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no store-creation chatter
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CifarexpError(f"cannot reach the tracking server at {uri} ({reason})") from None
    return uri


def current_uri() -> str:
    return mlflow.get_tracking_uri()


@contextmanager
def start_run(
    experiment: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, object] | None = None,
    nested: bool = False,
    reopen: str | None = None,
) -> Iterator[str]:
    """A run that ends FINISHED, FAILED (error recorded as a tag) or KILLED (Ctrl-C).

    Nested runs go into their parent's experiment. Under `mlflow run` (MLFLOW_RUN_ID set)
    the project's run is this run, in the experiment `mlflow run` chose. `reopen` continues
    an earlier run (by id) instead of starting one. Yields the run id.
    """
    try:
        if not nested and not os.environ.get("MLFLOW_RUN_ID"):
            _set_experiment(experiment)
        run = mlflow.start_run(
            run_id=reopen, run_name=run_name, nested=nested, tags=dict(tags or {})
        )
    except MlflowException as exc:
        raise CifarexpError(f"tracking store {mlflow.get_tracking_uri()}: {exc.message}") from None
    try:
        _log_params(run, params or {})
        yield run.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        _end_failed(exc)
        raise
    mlflow.end_run("FINISHED")


def _log_params(run: mlflow.ActiveRun, params: Mapping[str, object]) -> None:
    """Log params; one that `mlflow run` already logged differently (e.g. workers=best)
    keeps its value and the resolved one goes into a tag."""
    given = run.data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in given})
    set_tags(
        {TAG + "resolved." + k: v for k, v in params.items() if given.get(k, str(v)) != str(v)}
    )


def _set_experiment(name: str) -> None:
    """Make `name` the active experiment; with a local sqlite store its artifacts go into
    `mlartifacts/` beside the database file (never the legacy ./mlruns)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        root = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        with contextlib.suppress(MlflowException):  # created meanwhile by another command
            mlflow.create_experiment(name, artifact_location=root.as_uri())
    mlflow.set_experiment(name)


def _end_failed(exc: BaseException) -> None:
    try:
        mlflow.set_tag(ERROR, f"{type(exc).__name__}: {exc}"[:5000])
    finally:
        mlflow.end_run("FAILED")


def set_tags(tags: Mapping[str, object]) -> None:
    mlflow.set_tags({key: str(value) for key, value in tags.items()})


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(dict(metrics), step=step)


def log_epoch(result: EpochResult) -> None:
    """The SPEC §4 metrics of one finished epoch, step = epoch number."""
    mlflow.log_metrics(result.metrics(), step=result.epoch)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_table(table: pd.DataFrame, artifact_file: str) -> None:
    """A table as a CSV artifact (readable in the UI and by any tool)."""
    mlflow.log_text(table.to_csv(index=False), artifact_file)


def log_figure(figure: Figure, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def search_runs(filter_string: str = "") -> pd.DataFrame:
    """Runs of every experiment matching `filter_string`, newest first, as MLflow's DataFrame
    (columns run_id, status, start_time, params.*, tags.*, metrics.*)."""
    return mlflow.search_runs(
        filter_string=filter_string,
        search_all_experiments=True,
        order_by=["attributes.start_time DESC"],
    )


def metric_history(run_id: str, keys: list[str]) -> pd.DataFrame:
    """One row per step of `run_id`, one column per metric key (absent keys are left out)."""
    client = mlflow.MlflowClient()
    series = {
        key: pd.Series({m.step: m.value for m in client.get_metric_history(run_id, key)})
        for key in keys
    }
    frame = pd.DataFrame({k: v for k, v in series.items() if not v.empty})
    return frame.rename_axis("step").reset_index()


def tag_filter(tags: Mapping[str, str]) -> str:
    """An MLflow filter string matching every tag exactly."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
