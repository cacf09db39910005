"""One tracked training run: config -> data, model, optimizer -> engine -> MLflow."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch
import torchinfo

from cifarexp import tracking
from cifarexp.config import TrainConfig
from cifarexp.console import epoch_progress
from cifarexp.data import load_split, make_loader
from cifarexp.engine import EpochResult, resolve_device, train
from cifarexp.models import build_model
from cifarexp.optim import build_optimizer


@dataclass(frozen=True)
class Labels:
    """Where a run sits in the study: the command, the exercise (C2…C7, Q1-Q4), the variant."""

    command: str
    exercise: str
    variant: str = ""

    def tags(self) -> dict[str, str]:
        return {
            tracking.COMMAND: self.command,
            tracking.EXERCISE: self.exercise,
            tracking.VARIANT: self.variant,
        }


@dataclass(frozen=True)
class TrainingRun:
    run_id: str
    config: TrainConfig
    device: torch.device
    results: list[EpochResult]


def cpu_count() -> int:
    """CPUs this process may use (its affinity), which is what DataLoader workers share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment_tags(device: torch.device) -> dict[str, str]:
    """The environment beside the results: torch, CUDA, device name, CPU count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        tracking.DEVICE: device.type,
        tracking.TAG + "device_name": name or platform.machine(),
        tracking.TAG + "torch_version": torch.__version__,
        tracking.TAG + "cuda_version": torch.version.cuda or "none",
        tracking.TAG + "cpu_count": str(cpu_count()),
    }


def run_training(
    cfg: TrainConfig,
    labels: Labels,
    *,
    experiment: str,
    run_name: str | None = None,
    nested: bool = False,
    quiet: bool = False,
) -> TrainingRun:
    """Train `cfg` inside an MLflow run, logging each epoch's metrics as soon as it ends.

    Everything that can fail on bad input (device, data) is checked before the run starts.
    """
    device = resolve_device(cfg.device)
    train_set = load_split(cfg, train=True)
    test_set = load_split(cfg, train=False) if cfg.eval else None
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build_model(cfg.model, batch_norm=cfg.batch_norm).to(device)
    optimizer = build_optimizer(
        cfg.optimizer,
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
    )
    loader = make_loader(cfg, train_set, train=True)
    test_loader = make_loader(cfg, test_set, train=False) if test_set is not None else None
    tags = {**labels.tags(), tracking.DATASET: cfg.dataset, **environment_tags(device)}
    batches = min(len(loader), cfg.max_batches or len(loader))

    with tracking.start_run(
        experiment, run_name=run_name, tags=tags, params=cfg.as_params(), nested=nested
    ) as run_id:
        summary = torchinfo.summary(
            model, input_size=(cfg.batch_size, 3, 32, 32), device=device, verbose=0
        )
        tracking.log_text(str(summary), "model_summary.txt")
        with epoch_progress(labels.variant, batches, quiet=quiet) as on_batch:
            results = train(
                model,
                loader,
                optimizer,
                device,
                epochs=cfg.epochs,
                on_epoch=tracking.log_epoch,
                test_loader=test_loader,
                max_batches=cfg.max_batches,
                on_batch=on_batch,
            )
    return TrainingRun(run_id, cfg, device, results)
