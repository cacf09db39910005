"""`cifarexp lab`: the whole study in order, then its report."""

from __future__ import annotations

from analysis import report
from cifarexp import experiments, inspection
from cifarexp.config import TrainConfig
from cifarexp.console import console
from cifarexp.engine import resolve_device
from cifarexp.jobs import Labels, run_training
from cifarexp.optim import OPTIMIZERS

# preset -> the study's sizes (full) or a demo that finishes in minutes on a 2-core CPU
PRESETS: dict[str, dict[str, int | None]] = {
    "full": {"train_size": None, "epochs": 5, "cpu_batches": 20},
    "quick": {"train_size": 512, "epochs": 2, "cpu_batches": 1},
}


def experiment(command: str) -> str:
    """Each command's default MLflow experiment."""
    return f"cifarexp-{command}"


def run_lab(base: TrainConfig, preset: str, *, quiet: bool = False) -> list[report.Section]:
    """inspect, time, sweep-workers, then compare-device, compare-optim and no-bn with the
    best worker count; returns the report's sections, built from the store."""
    sizes = PRESETS[preset]
    cfg = base.replace(train_size=sizes["train_size"], epochs=sizes["epochs"])
    on_cuda = resolve_device(cfg.device).type == "cuda"
    devices = ["cpu", "cuda"] if on_cuda else ["cpu"]
    steps = [
        ("Q1-Q4: inspect", lambda: inspection.run_inspection(
            cfg.replace(batch_size=8), ("sgd", "adam"), experiment=experiment("inspect"))),
        ("C2: time", lambda: run_training(
            cfg, Labels("time", "C2"), experiment=experiment("time"), quiet=quiet)),
        ("C3, C4: sweep-workers", lambda: experiments.sweep_workers(
            cfg.replace(epochs=1), None, gpu_loader=on_cuda,
            experiment=experiment("sweep-workers"), quiet=quiet)),
    ]  # fmt: skip
    for title, step in steps:
        console.rule(title)
        step()
    best = cfg.replace(workers=experiments.resolve_best_workers(cfg.device, cfg.dataset))
    later = [
        ("C5: compare-device", lambda: experiments.compare_device(
            best, devices, cpu_batches=sizes["cpu_batches"],
            experiment=experiment("compare-device"), quiet=quiet)),
        ("C6: compare-optim", lambda: experiments.compare_optim(
            best, list(OPTIMIZERS), experiment=experiment("compare-optim"), quiet=quiet)),
        ("C7: no-bn", lambda: experiments.no_bn(
            best, experiment=experiment("no-bn"), quiet=quiet)),
    ]  # fmt: skip
    for title, step in later:
        console.rule(title)
        step()
    return report.build_report()
