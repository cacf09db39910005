"""`cifarexp lab`: the whole study in order, each step as its own command would run it."""

from __future__ import annotations

from collections.abc import Callable

from cifarexp import comparisons, inspection, runs, tracking
from cifarexp.config import OPTIMIZERS, PRESETS, Preset, TrainConfig
from cifarexp.engine import resolve_device
from cifarexp.runs import Progress, Summarize


def run_lab(
    base: TrainConfig,
    preset: Preset,
    *,
    summarize: Summarize,
    experiment: str | None = None,
    progress: Progress | None = None,
    on_step: Callable[[str], None] = lambda title: None,
) -> None:
    """inspect, time, sweep-workers, then compare-device, compare-optim and no-bn with the
    best worker count, each into its command's experiment (or all into `experiment`);
    `on_step` is told each step's title as it starts."""
    sizes = PRESETS[preset]
    tracking.tag_later_runs({tracking.PRESET: preset})  # every report says which preset ran
    cfg = base.replace(
        train_size=sizes["train_size"], epochs=sizes["epochs"], batch_size=sizes["batch_size"]
    )
    on_cuda = resolve_device(cfg.device).type == "cuda"
    devices = ["cpu", "cuda"] if on_cuda else ["cpu"]

    def experiment_of(command: str) -> str:
        return experiment or tracking.default_experiment(command)

    steps = [
        ("Q1-Q4: inspect", lambda: inspection.run_inspection(
            cfg.replace(batch_size=8), ("sgd", "adam"), experiment=experiment_of("inspect"))),
        ("C2: time", lambda: runs.time_run(
            cfg, summarize=summarize, experiment=experiment_of("time"), progress=progress)),
        ("C3, C4: sweep-workers", lambda: comparisons.sweep_workers(
            cfg.replace(epochs=1), None, summarize=summarize, gpu_loader=on_cuda,
            experiment=experiment_of("sweep-workers"), progress=progress)),
    ]  # fmt: skip
    for title, step in steps:
        on_step(title)
        step()
    best = cfg.replace(workers=comparisons.resolve_best_workers(cfg.device, cfg.dataset))
    later = [
        ("C5: compare-device", lambda: comparisons.compare_device(
            best, devices, summarize=summarize, cpu_batches=sizes["cpu_batches"],
            experiment=experiment_of("compare-device"), progress=progress)),
        ("C6: compare-optim", lambda: comparisons.compare_optim(
            best, list(OPTIMIZERS), summarize=summarize,
            experiment=experiment_of("compare-optim"), progress=progress)),
        ("C7: no-bn", lambda: comparisons.no_bn(
            best, summarize=summarize, experiment=experiment_of("no-bn"), progress=progress)),
    ]  # fmt: skip
    for title, step in later:
        on_step(title)
        step()
