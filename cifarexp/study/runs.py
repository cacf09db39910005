"""One tracked training run: build it (`build.build_training`), start its MLflow run, log
its summary, warm up, train, log each epoch as it ends, and its profile; the `time`
command's run (C2)."""

from __future__ import annotations

import logging
import math
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarexp import processes, tracking
from cifarexp.config import CifarexpError, TrainConfig, has_fast_settings, logged_params
from cifarexp.study.catalogue import Labels
from cifarexp.study.session import Session
from cifarexp.tracking import Tracker
from cifarexp.training import models, noise, profiling
from cifarexp.training.build import Training, build_training
from cifarexp.training.data import cpu_count
from cifarexp.training.engine import EpochResult, summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRun:
    run_id: str | None  # None on a rank other than 0 (only rank 0 logs)
    results: list[EpochResult]


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
    session: Session,
    *,
    run_name: str | None = None,
    parent: str | None = None,
) -> TrainingRun:
    """Train `cfg` inside an MLflow run, logging each epoch's metrics as soon as it ends.

    Everything that can fail on bad input (device, data) fails while the training is
    built, before the run starts. The session's progress shows it (on rank 0 only). The run
    is named `run_name`, else by `labels`, the dataset and device, and "fast" where it has
    every one of `--fast`'s settings.
    """
    tracker = session.tracker
    training = build_training(cfg, tracker.world)
    tags = {**labels.tags(), tracking.DATASET: cfg.dataset, **environment_tags(training.device)}
    tags[tracking.ENERGY] = energy_source(training, session)
    params = logged_params({**cfg.as_params(), **tracker.world.params(cfg)}, training.device.type)
    device_type = training.device.type
    fast = ["fast"] if has_fast_settings(cfg, device_type, several=tracker.world.joined) else []
    name = run_name or labels.run_name(cfg.dataset, device_type, *fast)
    run = tracker.start_run(
        session.experiment_of(labels.command), run_name=name, tags=tags, params=params,
        parent=parent, training=True, about=labels.about(),
    )  # fmt: skip
    with data_loader_errors(), run as run_id:
        log_summary(tracker, training)
        log_train_set(tracker, training)
        warm_up_before_epoch_1(tracker, training)
        with session.show(labels.variant, cfg.epochs, training.batches) as display:

            def on_epoch(result: EpochResult) -> None:
                tracker.log_epoch(result)
                note_divergence(tracker, result, labels)
                display.on_epoch(result)
                processes.raise_pending()  # a stop whose exception Python swallowed

            results = training.train(on_epoch, on_batch=display.on_batch)
            with processes.uninterruptible():  # a stop waits: never half-written into the store
                note_disturbance(tracker, results)
                tracker.log_metrics(summary(results))  # one chart per name in the UI
            if cfg.profile:  # after the last epoch is logged: never inside a timed epoch
                profile = profile_and_log(tracker, training, results)
                if profile is not None:
                    display.on_profile(profile)
    if session.finished is not None and run_id is not None and tracker.world.world_size == 1:
        session.finished[cfg] = run_id
    return TrainingRun(run_id, results)


def time_run(cfg: TrainConfig, session: Session, *, run_name: str | None = None) -> str | None:
    """C1, C2: train and time `cfg` as the `time` command's run; its run id (None on a rank
    of a torchrun job that does not write)."""
    return run_training(cfg, Labels("time", "C2"), session, run_name=run_name).run_id


def energy_source(training: Training, session: Session) -> str:
    """What counts each epoch's energy (the run's ENERGY tag); where nothing does, the tag
    says why, and so does the terminal, once per command."""
    counter = training.energy_counter
    if counter is not None:
        return counter.source
    session.say_once(f"Energy per epoch is not measured: {training.energy}.")
    return f"not measured: {training.energy}"


def note_divergence(tracker: Tracker, result: EpochResult, labels: Labels) -> None:
    """The first epoch whose training loss is not finite, as a tag and a notice: the run
    goes on (lr 0.1 is the study's setting for every optimizer), the report marks it."""
    if math.isfinite(result.train_loss) or tracker.has_tag(tracking.DIVERGED):
        return
    tracker.set_tags({tracking.DIVERGED: result.epoch})
    name = f"{labels.variant}: " if labels.variant else ""
    log.warning(
        f"{name}the training loss is {result.train_loss} in epoch {result.epoch}: the run "
        "diverged (it goes on; the report marks it)"
    )


def note_disturbance(tracker: Tracker, results: list[EpochResult]) -> None:
    """Why the run's timing cannot be trusted, if it cannot (`noise.disturbance`: other
    processes' CPU use, its epochs' spread), as the TIMING_DISTURBED tag; the answer built
    from the store says it."""
    reason = noise.disturbance(results, cpu_count())
    if reason is not None:
        tracker.set_tags({tracking.TIMING_DISTURBED: reason})


def log_summary(tracker: Tracker, training: Training) -> None:
    """The model's torchinfo summary and its FLOPs per image, on the run."""
    if tracker.writes:
        summary = models.summary(training.model, training.batch_size, training.device)
        tracker.log_text(summary, "model_summary.txt")
        tracker.log_params({"flops_per_image": training.execution.flops_per_image})


def log_train_set(tracker: Tracker, training: Training) -> None:
    """The run's training set as its MLflow dataset input: `synthetic` (made from the seed)
    or `cifar10` (read from the data folder), by its labels."""
    cfg = training.cfg
    source = {"dataset": cfg.dataset, "split": "train", "images": str(len(training.train_set))}
    if cfg.dataset == "synthetic":
        source["seed"] = str(cfg.seed)
    else:
        source["data_dir"] = str(Path(cfg.data_dir).resolve())
    tracker.log_dataset(
        np.asarray(training.train_set.targets, dtype=np.int64),
        name=f"{cfg.dataset}-train-{len(training.train_set)}",
        source=source,
    )


def warm_up_before_epoch_1(tracker: Tracker, training: Training) -> None:
    """The untimed warm-up before epoch 1 (`Training.warm_up`), logged as warmup_s: CUDA's
    lazy start-up, cuDNN autotuning, compilation and graph capture, which would otherwise
    land in epoch 1's times (docs/timing.md: "Warm-up"). A compilation, the long part, is
    announced: it may take tens of seconds with an empty compile cache."""
    compile_mode = training.cfg.compile
    if training.warms_up and compile_mode != "none" and tracker.writes:
        log.info("Compiling the model (--compile %s) in the untimed warm-up...", compile_mode)
    warmup_s = training.warm_up()
    if warmup_s is not None:
        tracker.log_metrics({"warmup_s": warmup_s})


def profile_and_log(
    tracker: Tracker, training: Training, results: list[EpochResult]
) -> profiling.Profile | None:
    """`--profile`: the profile of a window of steps after the last epoch, logged on the run:
    its trace and summary table (artifacts), its split and cost (metrics), its verdict (tag
    and a paragraph of the description), which weighs the timed epochs (`results`: their
    data-loading share, their energy) with the window. The verdict's advice names the best
    worker count of the latest sweep on this device type, where the store has one."""
    sweep = (
        tracking.latest_sweep(training.device.type, training.cfg.dataset)
        if tracker.writes
        else None
    )
    best = None if sweep is None else (int(sweep["metrics.best_workers"]), str(sweep["run_id"]))
    with tempfile.TemporaryDirectory() as folder:
        epochs = profiling.Epochs.of(results)
        profile = profiling.profile_training(training, Path(folder), best, epochs)
        tracker.log_artifacts(Path(folder))
    if profile is not None:
        tracker.log_table(profile.summary, profiling.SUMMARY.removesuffix(".csv"))
        tracker.set_tags({tracking.VERDICT: profile.verdict})
        tracker.append_description(profile.description())
        tracker.log_metrics(profile.metrics())
    return profile
