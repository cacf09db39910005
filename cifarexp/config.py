"""The configuration of one training run: a frozen dataclass, validated once at the edge.

Nothing here imports torch: the command line reads the choices below before any heavy
library is loaded. Errors name config fields (`batch_size`), never command-line flags;
`flag` is the one table from a field to its flag (for the CLI's error line and for advice).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

Dataset = Literal["cifar10", "synthetic"]
Optimizer = Literal["sgd", "nesterov", "adagrad", "adadelta", "adam"]
Loader = Literal["torch", "gpu"]  # torch: DataLoader + PIL transforms; gpu: uint8 set on the device
Precision = Literal["fp32", "tf32", "bf16"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]
Timing = Literal["sync", "events"]  # sync: per-step synchronised (C2); events: CUDA events
Scaling = Literal["weak", "strong"]  # under torchrun: batch_size per process, or in total
Preset = Literal["full", "quick"]  # the lab's sizes

DATASETS: tuple[str, ...] = get_args(Dataset)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
LOADERS: tuple[str, ...] = get_args(Loader)
PRECISIONS: tuple[str, ...] = get_args(Precision)
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
TIMINGS: tuple[str, ...] = get_args(Timing)
SCALINGS: tuple[str, ...] = get_args(Scaling)
MODELS = ("resnet18",)
# What a captured step can train: optimizers whose state, once made by a warm step and
# zeroed, trains as a fresh one does, with no host-side step count (see warmup.GraphedStep).
GRAPHED_OPTIMIZERS = ("sgd", "nesterov")
CHOICES = {  # the fields with a fixed set of values
    "dataset": DATASETS,
    "optimizer": OPTIMIZERS,
    "loader": LOADERS,
    "precision": PRECISIONS,
    "compile": COMPILE_MODES,
    "timing": TIMINGS,
    "scaling": SCALINGS,
    "model": MODELS,
}

# The lab's presets: the study's sizes (full), or a demo that finishes in under 4 minutes on a
# 2-core CPU (quick): 70 steps of 16 images, at the study's step per image: lr 0.1 x 16/128
# (the linear scaling rule; the study's lr 0.1 at batch 16 throws the loss far up first).
STUDY_BATCH, STUDY_LR = 128, 0.1


def study_lr(batch_size: int) -> float:
    """The lr that takes the study's step per image at `batch_size` (STUDY_LR at STUDY_BATCH)."""
    return STUDY_LR * batch_size / STUDY_BATCH


PRESETS: dict[str, dict[str, float | None]] = {
    "full": {"train_size": None, "epochs": 5, "batch_size": STUDY_BATCH, "lr": STUDY_LR,
             "cpu_batches": 20},
    "quick": {"train_size": 224, "epochs": 5, "batch_size": 16, "lr": study_lr(16),
              "cpu_batches": 4},
}  # fmt: skip


# `--fast`: the fastest settings this tool has measured per device type (docs/results.md).
# On CUDA the compiled model's step captured whole (--compile default --cuda-graph): 15%
# faster an epoch on an H200 than the eager step captured, and training as it does.
FAST_SETTINGS: dict[str, dict[str, object]] = {
    "cuda": {
        "loader": "gpu",
        "precision": "bf16",
        "channels_last": True,
        "compile": "default",
        "cuda_graph": True,
        "timing": "events",
    },
    "cpu": {"loader": "gpu"},
}


def fast_settings(
    device_type: str,
    optimizer: str,
    *,
    several: bool = False,
    compile: str | None = None,
    compiles: bool | None = None,
) -> dict[str, object]:
    """`--fast`'s settings on a device type for an optimizer, for one process or `several`
    (under torchrun), beside a `compile` mode given: where a captured step cannot train (an
    optimizer not in GRAPHED_OPTIMIZERS, several processes, a mode that captures CUDA graphs
    of its own) the model is compiled with CUDA graphs instead. Where torch.compile cannot
    build (`compiles`, by default `can_compile(device_type)`) nothing is compiled."""
    settings = dict(FAST_SETTINGS[device_type])
    compiles = can_compile(device_type) if compiles is None else compiles
    own_graphs = compile not in (None, "none", "default")
    if settings.get("cuda_graph") and (
        several or own_graphs or optimizer not in GRAPHED_OPTIMIZERS
    ):
        settings |= {"cuda_graph": False, "compile": "reduce-overhead"}
    if not compiles:
        settings.pop("compile", None)
    return settings


def can_compile(device_type: str) -> bool:
    """Whether torch.compile can build for the device type: on CUDA it needs Triton."""
    return device_type != "cuda" or importlib.util.find_spec("triton") is not None


def has_fast_settings(cfg: TrainConfig, device_type: str, *, several: bool = False) -> bool:
    """Whether `cfg` has every one of `--fast`'s settings for the device (its run is named
    so), given or not: the settings where torch.compile builds, the same on every machine."""
    fast = fast_settings(device_type, cfg.optimizer, several=several, compiles=True)
    return all(getattr(cfg, field) == value for field, value in fast.items())


def fast_flags(device_type: str) -> list[str]:
    """`--fast`'s settings for a device type, as the options that set them."""
    return flags(FAST_SETTINGS[device_type])


def plural(count: float, word: str) -> str:
    """`count` and `word`, the word in the plural unless the count is 1: "1 epoch",
    "5 epochs", "0 workers"."""
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def preset_text(name: str) -> str:
    """What a lab preset trains, in one line (its lr against the study's where it differs)."""
    sizes = PRESETS[name]
    images = f"{sizes['train_size']:,} images" if sizes["train_size"] else "all 50,000 images"
    lr = f"lr {sizes['lr']:g}"
    if sizes["lr"] != STUDY_LR:
        lr += f" (the study's {STUDY_LR:g} x {sizes['batch_size']}/{STUDY_BATCH})"
    return f"{images}, batch {sizes['batch_size']}, {lr}, {plural(sizes['epochs'], 'epoch')}"


WORKERS_TOLERANCE = 0.03  # C3: a worker count must cut data-loading time by more than this
# A run's timing is disturbed (docs/timing.md: "Disturbed timings") when other processes kept
# more than this share of the CPUs it may run on busy, on average over its epochs...
OTHER_CPU_SHARE = 0.25
# ... or when its epoch times vary by more than this, (max - min) / median, over 2+ epochs.
EPOCH_SPREAD_TOLERANCE = 0.25

# A config field shown to the user as its flag: --field-name, except for these.
FLAGS = {
    "max_batches": "--cpu-batches",
    "batch_norm": "--bn/--no-bn",
    "world": "torchrun's environment",
}

CIFAR10_SIZES = {True: 50_000, False: 10_000}  # images in the train (True) and test split
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds alike
MAX_WORKERS = 256
MAX_BATCH = 2**16  # far past what a device trains at once; a typo's 10**12 fails at once
MAX_DEVICE_INDEX_DIGITS = 4
IMAGE_BYTES = 32 * 32 * 3  # one uint8 CIFAR image


class UserError(Exception):
    """An error meant for the user, shown as one line; `field` names the config field at
    fault, if any (the command line shows it as its option)."""

    exit_code = 1

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class ConfigError(UserError, ValueError):
    """Bad input (a usage error, exit 2): nothing has run."""

    exit_code = 2


class CifarexpError(UserError, RuntimeError):
    """A runtime failure with a message meant for the user (exit 1, no traceback)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; every field is logged as an MLflow param."""

    # data
    dataset: Dataset = "cifar10"  # see docs/data.md
    data_dir: str = "./data"
    train_size: int | None = None  # first N training images; None = the whole split
    test_size: int | None = None  # first N test images for eval; None = the whole split
    batch_size: int = 128
    workers: int = 2  # DataLoader num_workers
    pin_memory: bool = False
    persistent_workers: bool = False
    loader_timeout: float = 600.0  # s a worker may take for a batch before the run fails; 0 = none
    # model
    model: str = "resnet18"
    batch_norm: bool = True  # False = the C7 variant with every BatchNorm removed
    # optimisation
    optimizer: Optimizer = "sgd"
    lr: float = STUDY_LR
    momentum: float = 0.9  # used by sgd/nesterov only
    weight_decay: float = 5e-4
    epochs: int = 5
    # execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval: bool = False  # evaluate on the test split after each epoch, outside the timing
    max_batches: int | None = None  # stop each epoch after N batches (CPU estimates, C5)
    profile: bool = False  # after the timed epochs, profile a few steps (see profiling)
    # the fast path (docs/timing.md: "The fast path")
    loader: Loader = "torch"
    precision: Precision = "fp32"  # fp32 (PyTorch's defaults), tf32, or bf16 via autocast
    channels_last: bool = False  # NHWC memory order for the model and its inputs
    compile: CompileMode = "none"  # torch.compile mode, or none
    cuda_graph: bool = False  # the whole step (forward, backward, SGD) as one CUDA graph
    timing: Timing = "sync"
    warmup: bool = True  # on CUDA: untimed steps before epoch 1 (state put back), warmup_s
    # several processes (docs/scaling-out.md; used only under torchrun)
    scaling: Scaling = "weak"

    def __post_init__(self) -> None:
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            _check(
                value in choices,
                name,
                f"{value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}",
            )
        for name in ("lr", "momentum", "weight_decay", "loader_timeout"):
            value = getattr(self, name)
            _check(math.isfinite(value), name, f"must be a finite number, got {value}")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.momentum >= 0, "momentum", "must be >= 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.loader_timeout >= 0, "loader_timeout", "must be >= 0 (0 = no timeout)")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(0 <= self.seed <= MAX_SEED, "seed", f"must be between 0 and {MAX_SEED}")
        _check(
            1 <= self.batch_size <= MAX_BATCH, "batch_size", f"must be between 1 and {MAX_BATCH:,}"
        )
        _check(0 <= self.workers <= MAX_WORKERS, "workers", f"must be between 0 and {MAX_WORKERS}")
        _check(
            not self.persistent_workers or self.workers > 0,
            "persistent_workers",
            "needs workers >= 1",
        )
        _check(self.max_batches is None or self.max_batches >= 1, "max_batches", "must be >= 1")
        if self.cuda_graph:
            _check(
                self.compile in ("none", "default"),
                "cuda_graph",
                f"captures the eager or the default-compiled step, not compile {self.compile} "
                "(which captures CUDA graphs of its own)",
            )
            _check(
                self.optimizer in GRAPHED_OPTIMIZERS,
                "cuda_graph",
                f"captures {' and '.join(GRAPHED_OPTIMIZERS)} steps only, not {self.optimizer}",
            )
        for needs_warmup in ("compile", "cuda_graph"):
            _check(
                self.warmup or getattr(self, needs_warmup) in ("none", False),
                "warmup",
                f"cannot be off with {needs_warmup}: the model is compiled or captured "
                "during the warm-up",
            )
        for train in (True, False):
            _check_size(self, train)
        check_device_name(self.device)

    def images(self, *, train: bool) -> int:
        """How many images of a split the run uses."""
        size = self.train_size if train else self.test_size
        return size if size is not None else CIFAR10_SIZES[train]

    def check_device(self, device_type: str) -> None:
        """The settings that need CUDA, checked once the device is known (off CUDA they
        would crash or silently mean nothing)."""
        if device_type == "cuda":
            return
        on = f"needs a CUDA device (this run is on {device_type})"
        _check(self.timing == "sync", "timing", f"events {on}; use sync")
        _check(self.compile == "none", "compile", f"{self.compile} {on}; use none")
        _check(not self.cuda_graph, "cuda_graph", on)
        _check(self.precision != "tf32", "precision", f"tf32 {on}; use fp32 or bf16")

    def check_processes(self, *, several: bool) -> None:
        """The settings that only one process can train with, checked when `several` train
        together (under torchrun)."""
        _check(
            not (several and self.cuda_graph),
            "cuda_graph",
            "captures one process's step; not under torchrun",
        )

    def replace(self, **changes: object) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_params(self) -> dict[str, object]:
        """Every field as an MLflow param, resolved: split sizes in images, max_batches
        "all" (never the string "None")."""
        return dataclasses.asdict(self) | {
            "train_size": self.images(train=True),
            "test_size": self.images(train=False),
            "max_batches": "all" if self.max_batches is None else self.max_batches,
        }


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """' (did you mean 'adam'?)' for a name close to one of `choices` (a typo), else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def logged_params(params: dict[str, object], device_type: str) -> dict[str, object]:
    """A run's params as they say what ran: `device` resolved ("auto" -> cpu or cuda, what
    the user asked kept as `device_requested`), `test_size` only where evaluation is on.
    Comparisons find their runs again by the settings as given (`settings_digest`), never
    by these."""
    logged = dict(params)
    if logged.get("device") == "auto":
        logged |= {"device": device_type, "device_requested": "auto"}
    if not logged.get("eval", True):
        logged.pop("test_size", None)
    return logged


def flag(field: str) -> str:
    """The command-line flag of a config field (or of a command's own option)."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def flags(settings: Mapping[str, object]) -> list[str]:
    """Settings as the options that set them: {workers: 8, pin_memory: True} ->
    ["--workers 8", "--pin-memory"]."""
    return [flag(k) if v is True else f"{flag(k)} {v}" for k, v in settings.items()]


def check_device_name(device: str, field: str = "device") -> None:
    """auto, cpu, cuda or cuda:N (N in ASCII digits), else a ConfigError naming `field`."""
    kind, colon, index = device.partition(":")
    ok = device in ("auto", "cpu", "cuda") or (
        kind == "cuda"
        and colon
        and index.isascii()
        and index.isdigit()
        and len(index) <= MAX_DEVICE_INDEX_DIGITS
    )
    _check(bool(ok), field, f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def memory_bytes() -> int | None:
    """This machine's physical memory, where the system says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _check_size(cfg: TrainConfig, train: bool) -> None:
    """A split's size: at least 1; no more than CIFAR-10 has; a synthetic set that fits in
    memory (its uint8 images, and as much again while they are made)."""
    field = "train_size" if train else "test_size"
    size = getattr(cfg, field)
    if size is None:
        return
    _check(size >= 1, field, "must be >= 1")
    if cfg.dataset == "cifar10":
        most = CIFAR10_SIZES[train]
        split = "train" if train else "test"
        _check(size <= most, field, f"{size:,} is more than CIFAR-10's {most:,} {split} images")
        return
    memory = memory_bytes()
    if memory is not None:
        _check(
            2 * size * IMAGE_BYTES <= memory,
            field,
            f"{size:,} synthetic images ({size * IMAGE_BYTES / 2**30:,.1f} GiB) do not fit "
            f"in this machine's {memory / 2**30:.0f} GiB of memory",
        )


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, field)
