"""`cifarexp lab`: the whole study in order, each step as its own command would run it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from cifarexp import tracking
from cifarexp.config import OPTIMIZERS, PRESETS, Preset, TrainConfig
from cifarexp.study import comparisons, inspection, runs
from cifarexp.study.session import Session
from cifarexp.training.engine import resolve_device


@dataclass(frozen=True)
class Step:
    """One step of the lab: its title, the item it answers, and how to run it (its run id)."""

    title: str
    item: str
    run: Callable[[], str | None]
    answered: bool = True  # whether its answer is built from the store after it has run


def steps(base: TrainConfig, preset: Preset, session: Session) -> Iterator[Step]:
    """inspect, time, sweep-workers, then compare-device, compare-optim and no-bn with the
    best worker count, each into its command's experiment (or all into the session's).

    Run each step, and log its answer, before asking for the next: the later steps take
    the best worker count from the sweep's answer in the store."""
    sizes = PRESETS[preset]
    session = replace(session, finished={})  # a variant the lab has trained already is reused
    session.tracker.tag_later_runs({tracking.PRESET: preset})  # each report names its preset
    cfg = base.replace(
        train_size=sizes["train_size"],
        epochs=sizes["epochs"],
        batch_size=sizes["batch_size"],
        lr=sizes["lr"],
    )
    on_cuda = resolve_device(cfg.device).type == "cuda"
    yield Step(
        "Q1-Q4: inspect",
        "Q1-Q4",
        lambda: (
            inspection.run_inspection(cfg.replace(batch_size=8), ("sgd", "adam"), session).run_id
        ),
        answered=False,
    )  # fmt: skip (inspect logs its answers as it runs)
    yield Step("C2: time", "C2", lambda: runs.time_run(cfg, session))
    yield Step("C3, C4: sweep-workers", "C3", lambda: comparisons.sweep_workers(
        cfg.replace(epochs=1), None, session))  # fmt: skip
    workers = comparisons.resolve_best_workers(session.tracker, cfg.device, cfg.dataset)
    best = cfg.replace(workers=workers)
    devices = ["cpu", "cuda"] if on_cuda else ["cpu"]
    yield Step("C5: compare-device", "C5", lambda: comparisons.compare_device(
        best, devices, session, cpu_batches=sizes["cpu_batches"]))  # fmt: skip
    yield Step("C6: compare-optim", "C6", lambda: comparisons.compare_optim(
        best, list(OPTIMIZERS), session))  # fmt: skip
    yield Step("C7: no-bn", "C7", lambda: comparisons.no_bn(best, session))
