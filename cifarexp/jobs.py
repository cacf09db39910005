"""One tracked training run: config -> data, model, optimizer -> engine -> MLflow."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torchinfo

from cifarexp import distributed, fastpath, tracking
from cifarexp.config import CifarexpError, TrainConfig
from cifarexp.console import epoch_progress
from cifarexp.data import cpu_count, load_split, make_loader
from cifarexp.engine import EpochResult, resolve_device, train, warm_up
from cifarexp.gpu_loader import GpuLoader
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
    run_id: str | None  # None on a rank other than 0 (only rank 0 logs)
    config: TrainConfig
    device: torch.device
    results: list[EpochResult]
    warmup_s: float | None = None  # untimed steps before epoch 1 (fast path on CUDA only)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment_tags(device: torch.device) -> dict[str, str]:
    """The environment beside the results: torch, CUDA, device name, CPU count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        tracking.DEVICE: device.type,
        tracking.TAG + "device_name": name,
        tracking.TAG + "torch_version": torch.__version__,
        tracking.TAG + "cuda_version": torch.version.cuda or "none",
        tracking.TAG + "cpu_count": str(cpu_count()),
    }


@contextmanager
def data_loader_errors(cfg: TrainConfig) -> Iterator[None]:
    """A stuck or dead DataLoader worker as one clear CifarexpError; the run, ended inside,
    keeps PyTorch's own message as its error tag."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)  # PyTorch's own messages for the two cases
        if text.startswith("DataLoader timed out"):
            raise CifarexpError(
                f"--loader-timeout: no batch from the DataLoader workers in "
                f"{cfg.loader_timeout:g} s (a worker is stuck); the run is FAILED. Raise "
                "--loader-timeout, or use --workers 0"
            ) from None
        if text.startswith("DataLoader worker (pid"):  # killed, or exited unexpectedly
            raise CifarexpError(
                f"--workers: {text.splitlines()[0].strip()}; the run is FAILED. Try fewer "
                "--workers (each needs memory and shared memory), or --workers 0"
            ) from None
        raise


def run_training(
    cfg: TrainConfig,
    labels: Labels,
    *,
    experiment: str,
    run_name: str | None = None,
    parent: str | None = None,
    quiet: bool = False,
) -> TrainingRun:
    """Train `cfg` inside an MLflow run, logging each epoch's metrics as soon as it ends.

    Everything that can fail on bad input (device, data) is checked before the run starts.
    """
    world = None
    if distributed.launched():
        world, device = distributed.join(cfg.device)
    else:
        device = resolve_device(cfg.device)
    local = world.local_config(cfg) if world is not None else cfg  # this process's batch
    cfg.check_device(device.type)
    train_set = load_split(cfg, train=True)
    test_set = load_split(cfg, train=False) if cfg.eval else None
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        fastpath.set_math_mode(cfg.precision)
    model = build_model(cfg.model, batch_norm=cfg.batch_norm)
    model = model.to(device, memory_format=fastpath.memory_format(cfg))
    optimizer = build_optimizer(
        cfg.optimizer,
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
    )
    if cfg.loader == "gpu":
        loader = GpuLoader(
            train_set,
            batch_size=local.batch_size,
            device=device,
            seed=cfg.seed,
            channels_last=cfg.channels_last,
            shard=(world.rank, world.world_size) if world is not None else (0, 1),
        )
    elif world is not None:
        shard = distributed.sampler(train_set, world, cfg.seed)
        loader = distributed.ShardedLoader(
            make_loader(local, train_set, train=True, sampler=shard), shard, world.rank
        )
    else:
        loader = make_loader(cfg, train_set, train=True)
    execution = fastpath.execution(cfg, model, device)
    ddp_model = distributed.wrap(model, device) if world is not None else model
    train_model = fastpath.compile_model(ddp_model, cfg.compile)  # shares model's parameters
    test_loader = make_loader(cfg, test_set, train=False) if test_set is not None else None
    tags = {**labels.tags(), tracking.DATASET: cfg.dataset, **environment_tags(device)}
    params = {**cfg.as_params(), **(world.params(cfg) if world is not None else {})}
    batches = min(len(loader), cfg.max_batches or len(loader))
    combine = None
    if world is not None:

        def combine(result: EpochResult) -> EpochResult:
            result = distributed.combine(result, world, execution)
            comm_time_s = distributed.measure_comm_time(
                ddp_model,
                device,
                world,
                batch_size=local.batch_size,
                steps_per_epoch=batches,
                execution=execution,
            )
            return replace(result, comm_time_s=comm_time_s)

    with (
        data_loader_errors(cfg),
        tracking.start_run(
            experiment, run_name=run_name, tags=tags, params=params, parent=parent
        ) as run_id,
    ):
        if tracking.is_writer():
            summary = torchinfo.summary(
                model, input_size=(local.batch_size, 3, 32, 32), device=device, verbose=0
            )
            tracking.log_text(str(summary), "model_summary.txt")
        tracking.log_metrics({"flops_per_image": execution.flops_per_image})
        warmup_s = None
        if device.type == "cuda" and cfg.fast_path:  # the study's own path keeps its epoch 1
            images = len(train_set) if world is None else -(-len(train_set) // world.world_size)
            sizes = fastpath.warmup_batch_sizes(images, local.batch_size, cfg.max_batches)
            warmup_s = warm_up(
                train_model, optimizer, device, batch_sizes=sizes, execution=execution
            )
            tracking.log_metrics({"warmup_s": warmup_s})
        with epoch_progress(
            labels.variant, batches, quiet=quiet or not tracking.is_writer()
        ) as on_batch:
            results = train(
                train_model,
                loader,
                optimizer,
                device,
                epochs=cfg.epochs,
                on_epoch=tracking.log_epoch,
                test_loader=test_loader,
                max_batches=cfg.max_batches,
                on_batch=on_batch,
                execution=execution,
                combine=combine,
            )
    return TrainingRun(run_id, cfg, device, results, warmup_s)


# ---------------------------------------------------------------- a run of several processes

LAUNCHED_RUN = "CIFAREXP_LAUNCHED_RUN"  # what `cifarexp launched-run` trains (JSON)


def run_processes(
    cfg: TrainConfig, labels: Labels, processes: int, *, parent: str, quiet: bool = False
) -> None:
    """Train `cfg` as `processes` data-parallel processes on this machine (one per GPU, or
    CPU processes with gloo), launched through torchrun, as a child run of `parent`; waits.
    The processes run the hidden command `cifarexp launched-run`, which reads this spec."""
    spec = {"config": cfg.as_params(), "labels": asdict(labels), "parent": parent, "quiet": quiet}
    env = {LAUNCHED_RUN: json.dumps(spec), "MLFLOW_TRACKING_URI": tracking.current_uri()}
    code = distributed.launch(processes, ["launched-run"], env)
    if code != 0:
        raise CifarexpError(
            f"{labels.variant}: its {processes} processes failed (torchrun exit status "
            f"{code}; the error is above)"
        )


def run_launched() -> TrainingRun:
    """The training `run_processes` launched this process for (one rank of it)."""
    if LAUNCHED_RUN not in os.environ:
        raise CifarexpError(
            "launched-run is internal to `cifarexp compare-device --gpus`, which starts it"
        )
    spec = json.loads(os.environ[LAUNCHED_RUN])
    labels = Labels(**spec["labels"])
    return run_training(
        TrainConfig(**spec["config"]),
        labels,
        experiment="",  # a child goes into its parent's experiment
        run_name=labels.variant,
        parent=spec["parent"],
        quiet=spec["quiet"],
    )
