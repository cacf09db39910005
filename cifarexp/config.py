"""The configuration of one training run: a frozen dataclass, validated once at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DATASETS = ("cifar10", "synthetic")


class ConfigError(ValueError):
    """Bad input: the message names the option (shown as a usage error, exit 2)."""


class CifarexpError(RuntimeError):
    """A runtime failure with a message meant for the user (exit 1, no traceback)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; every field is logged as an MLflow param."""

    # data
    dataset: str = "cifar10"  # "cifar10" or "synthetic" (SPEC §5)
    data_dir: str = "./data"
    train_size: int | None = None  # first N training images; None = all 50,000
    test_size: int | None = None  # first N test images for --eval; None = all 10,000
    batch_size: int = 128
    workers: int = 2  # DataLoader num_workers
    pin_memory: bool = False
    persistent_workers: bool = False
    # model
    model: str = "resnet18"
    batch_norm: bool = True  # False = the C7 variant with every BatchNorm removed
    # optimisation
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9  # used by sgd/nesterov only
    weight_decay: float = 5e-4
    epochs: int = 5
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval: bool = False  # evaluate on the test split after each epoch, outside the timing
    max_batches: int | None = None  # stop each epoch after N batches (CPU estimates, C5)

    def __post_init__(self) -> None:
        from cifarexp.models import MODELS
        from cifarexp.optim import OPTIMIZERS

        _check(self.dataset in DATASETS, "--dataset", f"must be one of {', '.join(DATASETS)}")
        _check(self.train_size is None or self.train_size >= 1, "--train-size", "must be >= 1")
        _check(self.test_size is None or self.test_size >= 1, "--test-size", "must be >= 1")
        _check(self.batch_size >= 1, "--batch-size", "must be >= 1")
        _check(self.workers >= 0, "--workers", "must be >= 0")
        _check(
            not self.persistent_workers or self.workers > 0,
            "--persistent-workers",
            "needs --workers >= 1",
        )
        _check(self.model in MODELS, "--model", f"must be one of {', '.join(MODELS)}")
        _check(
            self.optimizer in OPTIMIZERS,
            "--optimizer",
            f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}",
        )
        _check(self.lr > 0, "--lr", "must be > 0")
        _check(self.momentum >= 0, "--momentum", "must be >= 0")
        _check(self.weight_decay >= 0, "--weight-decay", "must be >= 0")
        _check(self.epochs >= 1, "--epochs", "must be >= 1")
        _check(self.max_batches is None or self.max_batches >= 1, "--cpu-batches", "must be >= 1")
        _check(
            self.device in ("auto", "cpu", "cuda") or _is_cuda_index(self.device),
            "--device",
            f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N",
        )

    def replace(self, **changes: object) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_params(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _is_cuda_index(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind == "cuda" and index.isdigit()


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{option}: {message}")
