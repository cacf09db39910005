"""Several processes, one run (issue 8): DistributedDataParallel under `torchrun`.

`torchrun` starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; this module reads
them, joins the process group (NCCL on CUDA, gloo on CPU), shards the data, wraps the model,
combines each epoch's measurements over the ranks and measures the gradient communication
that backward does not hide. Without WORLD_SIZE nothing here is used: one process runs as
it always did. Only rank 0 talks to MLflow (see `tracking.is_writer`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import inspect
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from cifarexp.config import CifarexpError, ConfigError, TrainConfig
from cifarexp.engine import Batch, EpochResult, Execution, synchronize

# A collective that waits longer than this fails the run instead of hanging it (a crashed or
# stuck rank); well above one epoch's longest step, evaluation included.
TIMEOUT = timedelta(minutes=10)
COMM_PAIRS = 7  # steps with and without gradient all-reduce per epoch (see measure_comm_time)
# How cifarexp runs DDP: no broadcast of the BN buffers from rank 0 before every forward
# (a collective per step that the training maths does not need: each rank keeps its own
# running statistics, and rank 0's model is the one evaluated), and gradients that are views
# into the all-reduce buckets (no copy in and out of them). benchmarks/ddp_steps.py on 2 H200s
# (unprofiled): DDP adds 5-20% to a step with these options, 21-40% with PyTorch's defaults.
BUFFER_SYNC = (  # the option's name since torch 2.14 (the old one is deprecated there)
    "forward_sync_buffers"
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else "broadcast_buffers"
)
DDP_OPTIONS = {BUFFER_SYNC: False, "gradient_as_bucket_view": True}
LAUNCH_GRACE_S = 30  # after Ctrl-C, how long a launched job gets to end its runs
# Test hook: a folder where each rank writes the sample indices its sampler gave it, per epoch.
RECORD_INDICES = "CIFAREXP_RECORD_INDICES"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets
    WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # nccl or gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def params(self, cfg: TrainConfig) -> dict[str, object]:
        """What the run logs besides the config."""
        return {"world_size": self.world_size, "backend": self.backend, "scaling": cfg.scaling}

    def local_config(self, cfg: TrainConfig) -> TrainConfig:
        """The config one process trains with (see `per_process_batch`)."""
        return cfg.replace(batch_size=per_process_batch(cfg, self.world_size))


def per_process_batch(cfg: TrainConfig, processes: int) -> int:
    """--batch-size per process (weak scaling), or split over `processes` (strong scaling),
    which it must divide."""
    if cfg.scaling == "weak":
        return cfg.batch_size
    if cfg.batch_size % processes:
        raise ConfigError(
            f"--batch-size: {cfg.batch_size} does not split over {processes} processes "
            "(--scaling strong); give a multiple of every process count"
        )
    return cfg.batch_size // processes


def join(device_name: str) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (once per process) and pick this process's
    device: cuda:LOCAL_RANK on CUDA (--device auto or cuda), else the CPU."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available()):
        device, backend = torch.device("cpu"), "gloo"
    elif device_name in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda was asked for but no CUDA device is available")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        raise ConfigError(
            f"--device: {device_name} names one device; under torchrun use auto or cuda "
            "(each process takes cuda:LOCAL_RANK) or cpu"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return World(rank, world_size, local_rank, backend), device


def leave() -> None:
    """Leave the process group, if this process joined one (as PyTorch asks before exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(
    model: nn.Module, device: torch.device, options: Mapping[str, object] = DDP_OPTIONS
) -> DistributedDataParallel:
    """The model under DDP (with DistributedDataParallel's `options`): gradients are
    averaged over the ranks during backward."""
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **options
    )


class ShardedLoader:
    """A DataLoader over this rank's shard (DistributedSampler), reshuffled every epoch:
    each iteration is one epoch and calls `set_epoch` first, so all ranks draw the same
    permutation of the whole set and each takes its own disjoint part of it."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler, rank: int) -> None:
        self.loader, self.sampler, self.rank, self.epoch = loader, sampler, rank, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.set_epoch(self.epoch)
        folder = os.environ.get(RECORD_INDICES)
        if folder:
            line = " ".join(map(str, self.sampler))
            with (Path(folder) / f"rank{self.rank}.txt").open("a") as record:
                record.write(line + "\n")
        self.epoch += 1
        return iter(self.loader)


def sampler(dataset: torch.utils.data.Dataset, world: World, seed: int) -> DistributedSampler:
    return DistributedSampler(
        dataset, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=seed
    )


# ---------------------------------------------------------------- one epoch over all ranks


def combine(result: EpochResult, world: World, execution: Execution) -> EpochResult:
    """This rank's epoch -> the run's: the slowest rank's times (all-reduce MAX), loss and
    accuracy over every rank's images (sums of loss * n, correct and n)."""
    device = _collective_device(world)
    times = [result.data_time_s, result.train_time_s, result.epoch_time_s]
    times.append(result.est_epoch_time_s or 0.0)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    n = result.images
    sums = torch.tensor(
        [result.train_loss * n, result.train_acc * n, n], dtype=torch.float64, device=device
    )
    dist.all_reduce(sums)
    data_time, train_time, epoch_time, est = slowest.tolist()
    loss_sum, correct, images = sums.tolist()
    mfu = execution.mfu(int(images), epoch_time)
    return replace(
        result,
        data_time_s=data_time,
        train_time_s=train_time,
        epoch_time_s=epoch_time,
        est_epoch_time_s=est if result.est_epoch_time_s is not None else None,
        train_loss=loss_sum / images,
        train_acc=correct / images,
        images=round(images),
        mfu=mfu / world.world_size if mfu is not None else None,
    )


def measure_comm_time(
    model: DistributedDataParallel,
    device: torch.device,
    world: World,
    *,
    batch_size: int,
    steps_per_epoch: int,
    execution: Execution,
    pairs: int = COMM_PAIRS,
) -> float:
    """Seconds per epoch that gradient communication adds to the steps, as the slowest rank
    sees it, measured outside the timed epoch.

    `pairs` times, one forward + backward pass on a fixed random batch as DDP runs it
    (all-reducing gradient buckets while backward goes on), then one under `no_sync()`
    (no all-reduce), each synchronised and started together on every rank. The median of
    the differences, times the epoch's steps, is the communication that backward did not
    hide; alternating the two and taking the median keeps drifts and one-off stalls out.
    The model's weights and buffers are put back as they were; no optimizer step is taken.
    """
    saved = copy.deepcopy(model.state_dict())
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, device=device, generator=generator)
    images = execution.to_device(images, device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    model.train()

    def timed(sync: bool) -> float:
        model.zero_grad(set_to_none=True)
        dist.barrier()  # every rank starts together: no wait for a late peer counted
        synchronize(device)
        start = time.perf_counter()
        with contextlib.nullcontext() if sync else model.no_sync():
            _backward(model, criterion, images, labels, execution)
        synchronize(device)
        return time.perf_counter() - start

    timed(sync=True), timed(sync=False)  # untimed: allocations, cuDNN choices
    exposed = statistics.median(timed(sync=True) - timed(sync=False) for _ in range(pairs))
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    per_epoch = torch.tensor(
        [max(0.0, exposed) * steps_per_epoch],
        dtype=torch.float64,
        device=_collective_device(world),
    )
    dist.all_reduce(per_epoch, op=dist.ReduceOp.MAX)
    return per_epoch.item()


def _backward(
    model: nn.Module,
    criterion: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    execution: Execution,
) -> None:
    with execution.autocast(images.device.type):
        loss = criterion(model(images), labels)
    loss.backward()


def _collective_device(world: World) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if world.backend == "nccl"
        else torch.device("cpu")
    )


# ---------------------------------------------------------------- crashes and --nproc


class Stopped(CifarexpError):
    """torchrun stopped this process (SIGTERM): another rank failed, or the job was stopped."""


def handle_stops() -> None:
    """How a process under torchrun stops (see `stop_on_sigint`, `stop_on_sigterm`)."""
    signal.signal(signal.SIGINT, stop_on_sigint)
    signal.signal(signal.SIGTERM, stop_on_sigterm)


def stop_on_sigint(signum: int, frame: object) -> None:
    """SIGINT under torchrun: a Ctrl-C that torchrun passed on, or the death of the command
    that launched the job (see `_interrupt_on_parent_death`); the run ends KILLED."""
    _ignore_stops()
    raise KeyboardInterrupt


def stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM under torchrun: the launcher stops every process once one has failed, so the
    run ends FAILED (not KILLED, as a user's Ctrl-C on one process would)."""
    _ignore_stops()
    raise Stopped(
        "torchrun stopped this process: another rank failed (its error is in torchrun's "
        "output) or the job was stopped; the run is FAILED"
    )


def _ignore_stops() -> None:
    """Once stopping, ignore further SIGINTs and SIGTERMs, so that nothing interrupts the run
    while it ends. torchrun may send several: a parent's death reaches it once per thread
    of that parent, and each one makes it signal the ranks again. It SIGKILLs a rank that
    has not exited after its grace period."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def relaunch(nproc: int, argv: list[str]) -> None:
    """Run this command again as `nproc` processes on this machine, through torchrun's own
    launcher (torch.distributed.run), in place of this process; never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, torchrun_command(nproc, without_nproc(argv)))


def launch(nproc: int, argv: list[str], env: dict[str, str]) -> int:
    """Run `cifarexp ARGV` as `nproc` processes on this machine through torchrun's launcher,
    with `env` added to this environment, and wait; their exit code. They run in a process
    group of their own, which this process stops if it is stopped (see `_stop`), or which
    stops itself if this process is killed outright (see `_interrupt_on_parent_death`)."""
    environment = {**os.environ, **env}
    environment.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run is this process's, not theirs
    command = torchrun_command(nproc, argv)
    process = subprocess.Popen(
        command, env=environment, start_new_session=True, preexec_fn=_interrupt_on_parent_death()
    )
    try:
        return process.wait()
    except BaseException:  # Ctrl-C, a SIGTERM (see cli.main), or any other exit
        _stop(process)
        raise


PR_SET_PDEATHSIG = 1  # prctl(2)


def _interrupt_on_parent_death() -> Callable[[], None] | None:
    """On Linux, what the launched torchrun runs before it starts: ask the kernel for a SIGINT
    when this process dies, even killed outright (SIGKILL), so that the job stops as on a
    Ctrl-C (every rank ends its run KILLED) rather than training on with no one waiting.
    prctl is looked up here, in this process: the child calls it and nothing else."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGINT))
        if os.getppid() != parent:  # it died before the request: nothing waits for the job
            os._exit(1)

    return set_parent_death_signal


def _stop(process: subprocess.Popen) -> None:
    """Stop a launched job as Ctrl-C stops a run: SIGINT to torchrun, which passes it on to
    every rank (each ends its run KILLED). If the job has not ended LAUNCH_GRACE_S later (or
    on another Ctrl-C): SIGTERM to torchrun, then SIGKILL to the job's whole group."""
    for stop in (
        lambda: process.send_signal(signal.SIGINT),
        process.terminate,
        lambda: os.killpg(process.pid, signal.SIGKILL),
    ):
        with contextlib.suppress(ProcessLookupError):
            stop()
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            process.wait(timeout=LAUNCH_GRACE_S)
            return


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run` running `cifarexp ARGV` as `nproc` processes here."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cifarexp",
        *argv,
    ]


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` less `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
