"""A variant trained by several processes: launched through torchrun as the child run of a
comparison (`compare-device --gpus`); each process runs the hidden command
`cifarexp launched-run`, which reads what to train from the environment."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from cifarexp import processes
from cifarexp.config import CifarexpError, TrainConfig, flag
from cifarexp.study.catalogue import Labels
from cifarexp.study.runs import TrainingRun, run_training
from cifarexp.study.session import Session

LAUNCHED_RUN = "CIFAREXP_LAUNCHED_RUN"  # what `cifarexp launched-run` trains (JSON)


@dataclass(frozen=True)
class LaunchedRun:
    """What `run_processes` asks each launched process to train."""

    config: TrainConfig
    labels: Labels
    parent: str
    quiet: bool
    system_metrics: bool  # as the launcher's --system-metrics says
    tags: dict[str, str]  # the launcher's tags for every run it starts (tag_later_runs)


def run_processes(
    cfg: TrainConfig, labels: Labels, nproc: int, session: Session, *, parent: str
) -> None:
    """Train `cfg` as `nproc` data-parallel processes on this machine (one per GPU, or
    CPU processes with gloo), launched through torchrun, as a child run of `parent`; waits."""
    tracker = session.tracker
    spec = LaunchedRun(
        cfg, labels, parent, session.progress is None, tracker.system_metrics,
        dict(tracker.later_tags),
    )  # fmt: skip
    env = {LAUNCHED_RUN: json.dumps(asdict(spec)), "MLFLOW_TRACKING_URI": tracker.uri}
    code = processes.launch(nproc, ["launched-run"], env)
    if code != 0:
        raise CifarexpError(
            f"{labels.variant}: its {nproc} processes failed (torchrun exit status "
            f"{code}; the error is above)"
        )


def launched_run() -> LaunchedRun:
    """The training `run_processes` launched this process for (one rank of it)."""
    if LAUNCHED_RUN not in os.environ:
        raise CifarexpError(
            f"launched-run is internal to `cifarexp compare-device {flag('gpus')}`, which starts it"
        )
    try:
        spec = json.loads(os.environ[LAUNCHED_RUN])
        return LaunchedRun(
            **spec | {"config": TrainConfig(**spec["config"]), "labels": Labels(**spec["labels"])}
        )
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, or not a LaunchedRun's fields
        raise CifarexpError(
            f"{LAUNCHED_RUN} does not say what to train ({type(exc).__name__}: {exc}); "
            f"launched-run is internal to `cifarexp compare-device {flag('gpus')}`, which sets it"
        ) from None


def train_launched(spec: LaunchedRun, session: Session) -> TrainingRun:
    """One rank (the session's world) of a launched run: a child of the comparison that
    launched it, tagged as the launcher tags its runs (the sweep of --workers best, the
    lab's preset)."""
    session.tracker.tag_later_runs(spec.tags)
    return run_training(spec.config, spec.labels, session, parent=spec.parent)
