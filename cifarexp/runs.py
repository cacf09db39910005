"""One tracked training run: build it (`build.build_training`), start its MLflow run, log
its summary, warm up, train; the `time` command's run (C2), described by its answer; and a
run trained by several processes, launched through torchrun as the child of a comparison."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import torch

from cifarexp import models, processes, profiling, tracking
from cifarexp.build import Training, build_training
from cifarexp.config import CifarexpError, TrainConfig, flag
from cifarexp.data import cpu_count
from cifarexp.distributed import World
from cifarexp.engine import EpochResult

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


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

    def run_name(self, *settings: str) -> str:
        """What the UI lists: the variant (a child), else the command and its main settings
        (e.g. `compare-optim synthetic cpu`)."""
        return self.variant or " ".join([self.command, *settings])


# The study's question per item, on each experiment and in each parent's description.
QUESTIONS = {
    "C2": "Where does the time of an epoch go: waiting for data, computing, in all?",
    "C3": "How many DataLoader workers load data fastest, and why does 1 worker lose (C4)?",
    "C5": "How much faster than the CPU does the GPU train an epoch?",
    "C5-scaling": "How does training scale over several GPUs (data-parallel)?",
    "C6": "How do SGD, Nesterov, Adagrad, Adadelta and Adam train with lr 0.1?",
    "C7": "What does BatchNorm change: the model with and without it?",
    "Q1-Q4": "What does ResNet-18 contain: conv layers, the last layer's input, parameters, "
    "gradients, optimizer state?",
    "report": "The study's tables and plots, built from the store.",
}


def description(exercise: str, answer: str, settings: Mapping[str, object]) -> str:
    """A run's description (markdown): the study's question, its answer, the settings."""
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"**{QUESTIONS[exercise]}**\n\n{answer}\n\nSettings: {shown}."


def experiment_about(labels: Labels) -> str:
    """A new experiment's description: the command and the question it answers."""
    return f"`cifarexp {labels.command}` ({labels.exercise}): {QUESTIONS[labels.exercise]}"


@dataclass(frozen=True)
class TrainingRun:
    run_id: str | None  # None on a rank other than 0 (only rank 0 logs)
    config: TrainConfig
    device: torch.device
    results: list[EpochResult]
    warmup_s: float | None = None  # untimed steps before epoch 1 (on CUDA, unless --no-warmup)


class Display(Protocol):
    """What shows a run's progress: told of every batch and every finished epoch."""

    def on_batch(self, index: int, loss: float, acc: float) -> None: ...

    def on_epoch(self, result: EpochResult) -> None: ...

    def on_profile(self, profile: profiling.Profile) -> None: ...


# (label, epochs, batches per epoch) -> a context that shows the run's progress
Progress = Callable[[str, int, int], AbstractContextManager[Display]]
log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment_tags(device: torch.device) -> dict[str, str]:
    """The environment beside the results: torch (and the CUDA it was built for, if any),
    device name, CPU count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        tracking.DEVICE: device.type,
        tracking.TAG + "device_name": name,
        tracking.TAG + "torch_version": torch.__version__,
        tracking.TAG + "cpu_count": str(cpu_count()),
    } | ({tracking.TAG + "torch_cuda_build": torch.version.cuda} if torch.version.cuda else {})


@contextmanager
def data_loader_errors() -> Iterator[None]:
    """A dead DataLoader worker as one clear CifarexpError; the run, ended inside, keeps
    PyTorch's own message as its error tag. (A stuck one is data.LoaderTimeout.)"""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)  # PyTorch's own message
        if text.startswith("DataLoader worker (pid"):  # killed, or exited unexpectedly
            raise CifarexpError(
                f"{text.splitlines()[0].strip()}; the run is FAILED. Try fewer workers (each "
                "needs memory and shared memory), or 0 workers",
                "workers",
            ) from None
        raise


def run_training(
    cfg: TrainConfig,
    labels: Labels,
    *,
    experiment: str,
    run_name: str | None = None,
    parent: str | None = None,
    world: World = World(),
    progress: Progress | None = None,
) -> TrainingRun:
    """Train `cfg` inside an MLflow run, logging each epoch's metrics as soon as it ends.

    Everything that can fail on bad input (device, data) fails while the training is
    built, before the run starts. `progress` shows it (on rank 0 only). The run is named
    `run_name`, else by `labels` and the dataset and device.
    """
    training = build_training(cfg, world)
    tags = {**labels.tags(), tracking.DATASET: cfg.dataset, **environment_tags(training.device)}
    params = {**cfg.as_params(), **world.params(cfg)}
    name = run_name or labels.run_name(cfg.dataset, training.device.type)
    run = tracking.start_run(
        experiment, run_name=name, tags=tags, params=params, parent=parent, training=True,
        about=experiment_about(labels),
    )  # fmt: skip
    with data_loader_errors(), run as run_id:
        log_summary(training)
        log_train_set(training)
        warmup_s = warm_up_before_epoch_1(training)
        show = progress if progress is not None and world.writes else _no_progress
        with show(labels.variant, cfg.epochs, training.batches) as display:

            def on_epoch(result: EpochResult) -> None:
                tracking.log_epoch(result)
                note_divergence(result, labels)
                display.on_epoch(result)
                processes.raise_pending()  # a stop whose exception Python swallowed

            results = training.train(on_epoch, on_batch=display.on_batch)
            if cfg.profile:  # after the last epoch is logged: never inside a timed epoch
                profile = profiling.profile_training(training)
                if profile is not None:
                    display.on_profile(profile)
    return TrainingRun(run_id, cfg, training.device, results, warmup_s)


class Answer(Protocol):
    """An item's answer, built from the store: its tables, plots, text and headline metrics
    (logged on a comparison's parent; a time run takes its description from it)."""

    tables: dict[str, pd.DataFrame]
    figures: dict[str, Figure]
    text: str
    notes: list[str]  # what makes it less than a result

    @property
    def answer(self) -> str: ...  # the answer in one or two sentences

    def metrics(self) -> dict[str, float]: ...

    def tags(self) -> dict[str, str]: ...  # answers that are no numbers (a best optimizer)


A = TypeVar("A", bound=Answer)
Summarize = Callable[[str, str], A]  # (exercise, parent run id) -> its answer, from the store


def time_run(
    cfg: TrainConfig,
    *,
    summarize: Summarize[A],
    experiment: str,
    run_name: str | None = None,
    world: World = World(),
    progress: Progress | None = None,
) -> A | None:
    """C1, C2: train and time `cfg` as the `time` command's run; its answer, logged as the
    run's description (None on a rank of a torchrun job that does not write)."""
    labels = Labels("time", "C2")
    run = run_training(
        cfg, labels, experiment=experiment, run_name=run_name, world=world, progress=progress
    )
    if run.run_id is None:
        return None
    answer = summarize(labels.exercise, run.run_id)
    tracking.describe(run.run_id, description(labels.exercise, answer.answer, cfg.as_params()))
    return answer


def note_divergence(result: EpochResult, labels: Labels) -> None:
    """The first epoch whose training loss is not finite, as a tag and a notice: the run
    goes on (lr 0.1 is the study's setting for every optimizer), the report marks it."""
    if math.isfinite(result.train_loss) or tracking.has_tag(tracking.DIVERGED):
        return
    tracking.set_tags({tracking.DIVERGED: result.epoch})
    name = f"{labels.variant}: " if labels.variant else ""
    log.warning(
        f"{name}the training loss is {result.train_loss} in epoch {result.epoch}: the run "
        "diverged (it goes on; the report marks it)"
    )


def log_summary(training: Training) -> None:
    """The model's torchinfo summary and its FLOPs per image, on the run."""
    if training.world.writes:
        summary = models.summary(training.model, training.batch_size, training.device)
        tracking.log_text(summary, "model_summary.txt")
        tracking.log_params({"flops_per_image": training.execution.flops_per_image})


def log_train_set(training: Training) -> None:
    """The run's training set as its MLflow dataset input: `synthetic` (made from the seed)
    or `cifar10` (read from the data folder), by its labels."""
    cfg = training.cfg
    source = {"dataset": cfg.dataset, "split": "train", "images": str(len(training.train_set))}
    if cfg.dataset == "synthetic":
        source["seed"] = str(cfg.seed)
    else:
        source["data_dir"] = str(Path(cfg.data_dir).resolve())
    tracking.log_dataset(
        np.asarray(training.train_set.targets, dtype=np.int64),
        name=f"{cfg.dataset}-train-{len(training.train_set)}",
        source=source,
    )


def warm_up_before_epoch_1(training: Training) -> float | None:
    """The untimed warm-up before epoch 1 (`Training.warm_up`), logged as warmup_s: CUDA's
    lazy start-up, cuDNN autotuning, compilation and graph capture, which would otherwise
    land in epoch 1's times (README: "Warm-up")."""
    warmup_s = training.warm_up()
    if warmup_s is not None:
        tracking.log_metrics({"warmup_s": warmup_s})
    return warmup_s


class _Silent:
    def on_batch(self, index: int, loss: float, acc: float) -> None:
        pass

    def on_epoch(self, result: EpochResult) -> None:
        pass

    def on_profile(self, profile: profiling.Profile) -> None:
        pass


@contextmanager
def _no_progress(label: str, epochs: int, batches: int) -> Iterator[Display]:
    yield _Silent()


# ---------------------------------------------------------------- a run of several processes

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
    cfg: TrainConfig, labels: Labels, nproc: int, *, parent: str, quiet: bool = False
) -> None:
    """Train `cfg` as `nproc` data-parallel processes on this machine (one per GPU, or
    CPU processes with gloo), launched through torchrun, as a child run of `parent`; waits.
    The processes run the hidden command `cifarexp launched-run`, which reads this spec."""
    spec = LaunchedRun(
        cfg, labels, parent, quiet, tracking.logs_system_metrics(), tracking.later_run_tags()
    )
    env = {LAUNCHED_RUN: json.dumps(asdict(spec)), "MLFLOW_TRACKING_URI": tracking.current_uri()}
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
    spec = json.loads(os.environ[LAUNCHED_RUN])
    return LaunchedRun(
        **spec | {"config": TrainConfig(**spec["config"]), "labels": Labels(**spec["labels"])}
    )


def train_launched(spec: LaunchedRun, world: World, progress: Progress | None) -> TrainingRun:
    """One rank (`world`) of a launched run: a child of the comparison that launched it,
    tagged as the launcher tags its runs (the sweep of --workers best, the lab's preset)."""
    tracking.tag_later_runs(spec.tags)
    return run_training(
        spec.config,
        spec.labels,
        experiment="",  # a child goes into its parent's experiment
        parent=spec.parent,
        world=world,
        progress=progress,
    )
