"""`cifarexp lab`: the whole study in order, each step as its own command would run it."""

from __future__ import annotations

from collections.abc import Callable

from cifarexp import experiments, inspection, tracking
from cifarexp.config import OPTIMIZERS, TrainConfig
from cifarexp.engine import resolve_device
from cifarexp.experiments import Summarize
from cifarexp.jobs import Labels, Progress, run_training

# preset -> the study's sizes (full) or a demo that finishes in minutes on a 2-core CPU:
# batches of 16, so that its 80 steps (at the study's lr 0.1) get past the first steps'
# jump in loss and show the study's shapes (measured: SGD 63% after 5 epochs, no-BN at
# chance, Adam behind SGD)
PRESETS: dict[str, dict[str, int | None]] = {
    "full": {"train_size": None, "epochs": 5, "batch_size": 128, "cpu_batches": 20},
    "quick": {"train_size": 256, "epochs": 5, "batch_size": 16, "cpu_batches": 1},
}


def run_lab(
    base: TrainConfig,
    preset: str,
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
    named = experiment

    def experiment(command: str) -> str:
        return named or tracking.default_experiment(command)

    steps = [
        ("Q1-Q4: inspect", lambda: inspection.run_inspection(
            cfg.replace(batch_size=8), ("sgd", "adam"), experiment=experiment("inspect"))),
        ("C2: time", lambda: run_training(
            cfg, Labels("time", "C2"), experiment=experiment("time"), progress=progress)),
        ("C3, C4: sweep-workers", lambda: experiments.sweep_workers(
            cfg.replace(epochs=1), None, summarize=summarize, gpu_loader=on_cuda,
            experiment=experiment("sweep-workers"), progress=progress)),
    ]  # fmt: skip
    for title, step in steps:
        on_step(title)
        step()
    best = cfg.replace(workers=experiments.resolve_best_workers(cfg.device, cfg.dataset))
    later = [
        ("C5: compare-device", lambda: experiments.compare_device(
            best, devices, summarize=summarize, cpu_batches=sizes["cpu_batches"],
            experiment=experiment("compare-device"), progress=progress)),
        ("C6: compare-optim", lambda: experiments.compare_optim(
            best, list(OPTIMIZERS), summarize=summarize,
            experiment=experiment("compare-optim"), progress=progress)),
        ("C7: no-bn", lambda: experiments.no_bn(
            best, summarize=summarize, experiment=experiment("no-bn"), progress=progress)),
    ]  # fmt: skip
    for title, step in later:
        on_step(title)
        step()
