"""The configuration of one training run: a frozen dataclass, validated once at the edge."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DATASETS = ("cifar10", "synthetic")
# The fast path (issue 6); each tuple's first value is the study's behaviour and the default.
LOADERS = ("torch", "gpu")
PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
TIMINGS = ("sync", "events")
# Under torchrun (issue 8): --batch-size per process (weak) or in total, split (strong).
SCALINGS = ("weak", "strong")


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
    loader_timeout: float = 600.0  # s a worker may take for a batch before the run fails; 0 = none
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
    # fast path (issue 6)
    loader: str = "torch"  # torch: DataLoader + PIL transforms; gpu: uint8 set on the device
    precision: str = "fp32"  # fp32 (PyTorch's defaults), tf32, or bf16 via autocast
    channels_last: bool = False  # NHWC memory order for the model and its inputs
    compile: str = "none"  # torch.compile mode, or none
    timing: str = "sync"  # sync: per-step synchronised (C2); events: CUDA events, no waits
    # several processes (issue 8; used only under torchrun)
    scaling: str = "weak"  # weak: batch_size per process; strong: batch_size in total

    def __post_init__(self) -> None:
        from cifarexp.models import MODELS
        from cifarexp.optim import OPTIMIZERS

        _check(self.dataset in DATASETS, "--dataset", f"must be one of {', '.join(DATASETS)}")
        _check(self.train_size is None or self.train_size >= 1, "--train-size", "must be >= 1")
        _check(self.test_size is None or self.test_size >= 1, "--test-size", "must be >= 1")
        _check(self.batch_size >= 1, "--batch-size", "must be >= 1")
        _check(self.workers >= 0, "--workers", "must be >= 0")
        _check(self.loader_timeout >= 0, "--loader-timeout", "must be >= 0 (0 = no timeout)")
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
        check_device_name(self.device)
        for option, value, choices in (
            ("--loader", self.loader, LOADERS),
            ("--precision", self.precision, PRECISIONS),
            ("--compile", self.compile, COMPILE_MODES),
            ("--timing", self.timing, TIMINGS),
            ("--scaling", self.scaling, SCALINGS),
        ):
            _check(value in choices, option, f"{value!r} is not one of {', '.join(choices)}")

    @property
    def fast_path(self) -> bool:
        """Whether any fast-path setting is on (such a run warms up before epoch 1 on CUDA)."""
        return (self.loader, self.precision, self.channels_last, self.compile, self.timing) != (
            LOADERS[0],
            PRECISIONS[0],
            False,
            COMPILE_MODES[0],
            TIMINGS[0],
        )

    def check_device(self, device_type: str) -> None:
        """The settings that need CUDA, checked once the device is known (off CUDA they
        would crash or silently mean nothing)."""
        if device_type == "cuda":
            return
        on = f"needs a CUDA device (this run is on {device_type})"
        _check(self.timing == "sync", "--timing", f"events {on}; use --timing sync")
        _check(self.compile == "none", "--compile", f"{self.compile} {on}; use --compile none")
        _check(self.precision != "tf32", "--precision", f"tf32 {on}; use fp32 or bf16")

    def replace(self, **changes: object) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_params(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def check_device_name(device: str, option: str = "--device") -> None:
    """auto, cpu, cuda or cuda:N, else a ConfigError naming `option`."""
    kind, colon, index = device.partition(":")
    ok = device in ("auto", "cpu", "cuda") or (kind == "cuda" and colon and index.isdigit())
    _check(ok, option, f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{option}: {message}")
