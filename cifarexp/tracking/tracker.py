"""The Tracker: one command's link to the store, created by its session and passed to what
logs. It holds what this process knows of its runs, and writes onto them."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric, RunData, RunTag

from cifarexp.config import CifarexpError
from cifarexp.tracking import lifecycle
from cifarexp.tracking.names import APPENDED, NOTE, REUSED_FROM, TAG
from cifarexp.tracking.store import check_whole, open_store, retry_locked
from cifarexp.tracking.tabular import csv_text, rounded
from cifarexp.training.distributed import World

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cifarexp.training.engine import EpochResult


@dataclass
class Tracker:
    """Where this process logs, and what it knows of the runs it logged.

    Only a process that `writes` (rank 0 of a torchrun job; the only one in a plain run)
    writes anything: on the others every write does nothing. Writes go to MLflow's active
    run (`start_run`), except the answer, which is logged onto a run by id once it ended.
    """

    uri: str
    world: World = field(default_factory=World)
    system_metrics: bool = True  # whether training runs log MLflow's system metrics
    later_tags: dict[str, str] = field(default_factory=dict)  # see tag_later_runs
    epochs_logged: dict[str, list[int]] = field(default_factory=dict)  # run id -> epochs
    ended: list[tuple[str, str]] = field(default_factory=list)  # (run id, status), in order

    @classmethod
    def open(
        cls, tracking_uri: str | None, world: World | None = None, *, system_metrics: bool = True
    ) -> Tracker:
        """The store at `tracking_uri` (else MLFLOW_TRACKING_URI, else MLflow's default),
        checked up front (see `store.open_store`), as `world`'s process."""
        world = world or World()
        uri = open_store(tracking_uri, writes=world.writes)
        return cls(uri, world, system_metrics)

    @property
    def writes(self) -> bool:
        """Whether this process writes to the store, as its world says: only rank 0 of a
        torchrun job does (the other ranks' runs exist only through rank 0's metrics)."""
        return self.world.writes

    def start_run(self, experiment: str, **settings: object) -> AbstractContextManager[str | None]:
        """A run that always ends FINISHED, FAILED or KILLED (see `lifecycle.start_run`)."""
        return lifecycle.start_run(self, experiment, **settings)

    def copy_run(
        self, source_id: str, *, run_name: str, tags: Mapping[str, str], parent: str
    ) -> str:
        """A new child of `parent` holding what the finished run `source_id` measured (its
        params, cifarexp tags and metric histories; its artifacts stay on it), tagged
        REUSED_FROM: a run with the same settings as one already finished is not trained
        again. `tags` replace the source's (its place in the study)."""
        client = mlflow.MlflowClient()
        source = client.get_run(source_id)
        kept = {k: v for k, v in source.data.tags.items() if k.startswith(TAG)}
        note = (
            f"Not trained again: the same settings as the finished run {source.info.run_name!r} "
            f"({source_id}), whose params and metrics this run copies; its model summary and "
            "dataset stay on that run."
        )
        kept = {**kept, **tags, REUSED_FROM: source_id, NOTE: note}
        history = [
            m for key in source.data.metrics for m in client.get_metric_history(source_id, key)
        ]
        with self.start_run(
            "", run_name=run_name, tags=kept, params=source.data.params, parent=parent
        ) as run_id:
            for start in range(0, len(history), 1000):  # MLflow's most metrics a batch
                part = history[start : start + 1000]
                retry_locked(lambda part=part: client.log_batch(run_id, metrics=part))
        return run_id

    def tag_later_runs(self, tags: Mapping[str, str]) -> None:
        """Set `tags` on every run this tracker starts from now on, e.g. the sweep a
        `--workers best` count came from, or the lab's preset."""
        self.later_tags.update(tags)

    def ended_here(self, run_id: str) -> bool:
        """Whether this process ended the run `run_id` (else it was there already)."""
        return any(ended == run_id for ended, _ in self.ended)

    def last_ended(self) -> tuple[str, str] | None:
        """The (run id, status) of the run this process ended last, if any."""
        return self.ended[-1] if self.ended else None

    # ------------------------------------------------------------ the active run

    def has_tag(self, key: str) -> bool:
        """Whether the active run has the tag `key` (False on a process that does not write)."""
        return self.writes and key in _active_run_data().tags

    def set_tags(self, tags: Mapping[str, object]) -> None:
        if self.writes:
            retry_locked(lambda: mlflow.set_tags({k: str(v) for k, v in tags.items()}))

    def append_description(self, paragraph: str) -> None:
        """Add a paragraph to the active run's description, after what it holds already;
        kept (in APPENDED) when `describe` writes the description later."""
        if not self.writes:
            return
        tags = _active_run_data().tags
        self.set_tags(
            {
                NOTE: f"{tags.get(NOTE, '')}\n\n{paragraph}".strip(),
                APPENDED: f"{tags.get(APPENDED, '')}\n\n{paragraph}".strip(),
            }
        )

    def log_params(self, params: Mapping[str, object]) -> None:
        """Log params; one that `mlflow run` already logged differently (e.g. workers=best)
        keeps its value and the resolved one goes into a tag."""
        if not self.writes:
            return
        given = _active_run_data().params
        fresh = {k: v for k, v in params.items() if k not in given}
        retry_locked(lambda: mlflow.log_params(fresh))
        self.set_tags(
            {TAG + "resolved." + k: v for k, v in params.items() if given.get(k, str(v)) != str(v)}
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.writes:
            retry_locked(lambda: mlflow.log_metrics(dict(metrics), step=step))

    def log_epoch(self, result: EpochResult) -> None:
        """The per-epoch metrics of one finished epoch, step = epoch number; then the store
        is read through (`store.check_whole`: MLflow's own connection may not see that the
        file was damaged under it), so that a run stops at the epoch after the damage."""
        if not self.writes:
            return
        retry_locked(lambda: mlflow.log_metrics(result.metrics(), step=result.epoch))
        self.epochs_logged.setdefault(mlflow.active_run().info.run_id, []).append(result.epoch)
        retry_locked(lambda: check_whole(self.uri))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.writes:
            with _writing_artifact(artifact_file):
                mlflow.log_text(text, artifact_file)

    def log_artifacts(self, folder: Path) -> None:
        if self.writes:
            with _writing_artifact(str(folder)):
                mlflow.log_artifacts(str(folder))

    def log_dataset(self, targets: np.ndarray, *, name: str, source: Mapping[str, str]) -> None:
        """The training set as the run's dataset input (the UI's Dataset column): recorded
        by its labels (a digest of them, their count), never its images; `source` says
        where the images come from."""
        if not self.writes:
            return
        from mlflow.data.code_dataset_source import CodeDatasetSource

        dataset = mlflow.data.from_numpy(
            targets, source=CodeDatasetSource(tags=dict(source)), name=name
        )
        # Two runs of one experiment logging the same set at once may both try to insert it.
        race = "UNIQUE constraint failed: datasets."
        retry_locked(lambda: mlflow.log_input(dataset, context="training"), races=(race,))

    def log_table(self, table: pd.DataFrame, name: str, run_id: str | None = None) -> None:
        """A table as `name`.csv (readable by any tool) and as an MLflow table, `name`.json,
        which the UI shows and compares across runs, both holding the same numbers rounded
        once (`tabular.rounded`); on the active run, or on `run_id`."""
        if not self.writes:
            return
        run_id = run_id or mlflow.active_run().info.run_id
        client = mlflow.MlflowClient()
        table = rounded(table)
        with _writing_artifact(f"{name}.csv"):
            client.log_text(run_id, csv_text(table), f"{name}.csv")
        with _writing_artifact(f"{name}.json"):
            client.log_table(
                run_id, table.astype(object).where(table.notna(), None), f"{name}.json"
            )

    # ------------------------------------------------------------ a run's answer

    def describe(self, run_id: str, text: str) -> None:
        """`text` (markdown) as the run's description in the UI, followed by the paragraphs
        appended to it as it ran (`append_description`: its profile's)."""
        if not self.writes:
            return
        client = mlflow.MlflowClient()
        appended = client.get_run(run_id).data.tags.get(APPENDED)
        note = f"{text}\n\n{appended}" if appended else text
        retry_locked(lambda: client.set_tag(run_id, NOTE, note))

    def log_answer(
        self,
        run_id: str,
        *,
        tables: Mapping[str, pd.DataFrame],
        figures: Mapping[str, Figure],
        notes: str,
        metrics: Mapping[str, float],
        tags: Mapping[str, str],
    ) -> None:
        """A comparison's answer onto its (ended) parent run: tables, plots, notes
        (notes.md), headline metrics and tags."""
        if not self.writes:
            return
        client = mlflow.MlflowClient()
        for name, table in tables.items():
            self.log_table(table, name, run_id)
        for name, figure in figures.items():
            with _writing_artifact(f"{name}.png"):
                client.log_figure(run_id, figure, f"{name}.png")
        if notes:
            with _writing_artifact("notes.md"):
                client.log_text(run_id, notes, "notes.md")
        now = int(time.time() * 1000)
        values = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        labels = [RunTag(key, str(value)) for key, value in tags.items()]
        retry_locked(lambda: client.log_batch(run_id, metrics=values, tags=labels))


def _active_run_data() -> RunData:
    """What the store holds of the active run: its params, tags and latest metrics."""
    return mlflow.get_run(mlflow.active_run().info.run_id).data


@contextmanager
def _writing_artifact(name: str) -> Iterator[None]:
    """An artifact that cannot be written (a full disk, a read-only folder) as one line."""
    try:
        yield
    except OSError as exc:
        raise CifarexpError(
            f"cannot write the artifact {name} of the run ({exc.strerror})"
        ) from None
