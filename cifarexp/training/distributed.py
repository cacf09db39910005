"""Several processes, one run: DistributedDataParallel under `torchrun`.

Every process has a `World`. A plain process is a world of one, `World()`: nothing here
then does anything (no process group, no sampler, no DDP, epochs left as they are). Under
`torchrun` (RANK, WORLD_SIZE and LOCAL_RANK set) the process joins the process group
(NCCL on CUDA, gloo on CPU), trains on its shard of the data with the model under DDP,
and each epoch is combined over the ranks, with the gradient communication that backward
does not hide measured after it. Only rank 0 writes to the store.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from cifarexp.config import ConfigError, TrainConfig, plural
from cifarexp.processes import LAUNCH_VARIABLES, launched
from cifarexp.training.engine import (
    Batch,
    EpochResult,
    Execution,
    random_batch,
    resolve_device,
    synchronize,
)

# A collective that waits longer than this fails the run instead of hanging it (a crashed or
# stuck rank); well above one epoch's longest step, evaluation included.
TIMEOUT = timedelta(minutes=10)
COMM_PAIRS = 7  # the most pairs of passes measured after one epoch (see Combiner)
COMM_BUDGET = 0.1  # of an epoch's steps: what measuring comm_time_s may cost in passes
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
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes; `World()` is a process on its own."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None  # nccl or gloo under torchrun; None: no process group
    local_rank: int = 0

    @property
    def writes(self) -> bool:
        """Whether this process writes to the store (rank 0 alone)."""
        return self.rank == 0

    @property
    def joined(self) -> bool:
        """Whether this process trains in a process group (under torchrun)."""
        return self.backend is not None

    def params(self, cfg: TrainConfig) -> dict[str, object]:
        """What a run logs besides its config: nothing for a world of one."""
        if not self.joined:
            return {}
        return {"world_size": self.world_size, "backend": self.backend, "scaling": cfg.scaling}

    def batch_size(self, cfg: TrainConfig) -> int:
        """The batch of one process (see `per_process_batch`)."""
        return per_process_batch(cfg, self.world_size)

    def images(self, cfg: TrainConfig) -> int:
        """The training images of one process: its shard, padded as DistributedSampler pads."""
        return -(-cfg.images(train=True) // self.world_size)


def world_from_environment(device_name: str = "auto") -> World:
    """This process's world: `World()` unless torchrun started it, else its rank and size
    (RANK, WORLD_SIZE, LOCAL_RANK) and the backend for `device_name` (gloo on CPU, NCCL on
    CUDA). Torchrun's variables half set, or not numbers, are a ConfigError."""
    if not launched():
        return World()
    found = [name for name in LAUNCH_VARIABLES if name in os.environ]
    values = {}
    for name in LAUNCH_VARIABLES:
        text = os.environ.get(name, "0" if name == "LOCAL_RANK" else None)
        if text is None:
            raise ConfigError(
                f"{' and '.join(found)} set in the environment without {name}: torchrun sets "
                "RANK, WORLD_SIZE and LOCAL_RANK together (unset them to run as one process)",
                "world",
            )
        if not (text.isascii() and text.isdigit() and len(text) <= 6):
            raise ConfigError(f"{name}={text!r} in the environment is not a rank count", "world")
        values[name] = int(text)
    rank, size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if size < 1 or rank >= size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size}: RANK must be < WORLD_SIZE", "world")
    on_cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
    return World(rank, size, "gloo" if on_cpu else "nccl", local_rank)


def per_process_batch(cfg: TrainConfig, processes: int) -> int:
    """batch_size per process (weak scaling), or split over `processes` (strong scaling),
    which it must divide."""
    if cfg.scaling == "weak":
        return cfg.batch_size
    if cfg.batch_size % processes:
        raise ConfigError(
            f"{cfg.batch_size} does not split over {processes} processes (strong scaling); "
            "give a multiple of every process count",
            "batch_size",
        )
    return cfg.batch_size // processes


def join(world: World, device_name: str) -> torch.device:
    """This process's device, after joining the process group torchrun set up (once per
    process): cuda:LOCAL_RANK on CUDA (device auto or cuda), else the CPU. A world of one
    joins nothing: the device is `device_name`'s."""
    if not world.joined:
        return resolve_device(device_name)
    if world.backend == "gloo":
        device = torch.device("cpu")
    elif device_name in ("auto", "cuda"):
        resolve_device("cuda")  # fails if there is none
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        raise ConfigError(
            f"{device_name} names one device; under torchrun use auto or cuda (each process "
            "takes cuda:LOCAL_RANK) or cpu",
            "device",
        )
    if not dist.is_initialized():
        dist.init_process_group(
            world.backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None
        )
    return device


def leave() -> None:
    """Leave the process group, if this process joined one (as PyTorch asks before exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(
    model: nn.Module,
    device: torch.device,
    world: World,
    options: Mapping[str, object] = DDP_OPTIONS,
) -> nn.Module:
    """The model under DDP (with DistributedDataParallel's `options`) in a process group:
    gradients are averaged over the ranks during backward. Alone, the model itself."""
    if not world.joined:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **options
    )


class ShardedLoader:
    """A DataLoader over this rank's shard (DistributedSampler), reshuffled every epoch:
    each iteration is one epoch and calls `set_epoch` first, so all ranks draw the same
    permutation of the whole set and each takes its own disjoint part of it."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler) -> None:
        self.loader, self.sampler, self.epoch = loader, sampler, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


def shard(
    make: Callable[[DistributedSampler | None], DataLoader],
    dataset: object,
    world: World,
    seed: int,
) -> DataLoader | ShardedLoader:
    """The DataLoader `make(sampler)` builds: over the whole set for a world of one, else
    over this rank's shard, reshuffled every epoch (ShardedLoader)."""
    if not world.joined:
        return make(None)
    sampler = DistributedSampler(
        dataset, num_replicas=world.world_size, rank=world.rank, shuffle=True, seed=seed
    )
    return ShardedLoader(make(sampler), sampler)


# ---------------------------------------------------------------- one epoch over all ranks


class Combiner:
    """Turns this process's epoch into the run's: the identity for a world of one; in a
    process group, `combine` over the ranks, with the gradient communication that backward
    does not hide (comm_time_s) added.

    That is measured after the epoch, outside its timing, in pairs of passes (see
    `measure_pairs`) that cost at most COMM_BUDGET of the steps trained: each epoch earns
    COMM_BUDGET x its steps in passes, spent two at a time, at most COMM_PAIRS pairs after
    one epoch. comm_time_s is the median difference of all pairs so far, times the epoch's
    steps; an epoch too short to have earned a pair yet logs none.
    """

    def __init__(
        self,
        world: World,
        model: nn.Module,
        device: torch.device,
        execution: Execution,
        *,
        batch_size: int,
        steps_per_epoch: int,
    ) -> None:
        self.world, self.model, self.device, self.execution = world, model, device, execution
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.earned = 0.0  # passes the epochs so far allow, less those made
        self.passes = 0  # passes made so far
        self.differences: list[float] = []  # s per step: with all-reduce less without

    def __call__(self, result: EpochResult) -> EpochResult:
        if not self.world.joined:
            return result
        result = combine(result, self.world, self.execution)
        return replace(result, comm_time_s=self.comm_time_s(result.epoch))

    def comm_time_s(self, epoch: int) -> float | None:
        self.earned += COMM_BUDGET * self.steps_per_epoch
        pairs = min(COMM_PAIRS, int(self.earned // 2))  # the same on every rank
        if pairs:
            if not self.differences and self.world.writes:
                log.info(
                    f"comm_time_s: measured after each epoch in pairs of passes with and "
                    f"without all-reduce, within {COMM_BUDGET:.0%} of its steps "
                    f"({plural(pairs, 'pair')} after epoch {epoch})"
                )
            self.differences += measure_pairs(
                self.model, self.device, self.execution, batch_size=self.batch_size, pairs=pairs
            )
            self.earned -= 2 * pairs
            self.passes += 2 * pairs
        if not self.differences:
            return None
        per_epoch = max(0.0, statistics.median(self.differences)) * self.steps_per_epoch
        slowest = torch.tensor(
            [per_epoch], dtype=torch.float64, device=_collective_device(self.world)
        )
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return slowest.item()


def combine(result: EpochResult, world: World, execution: Execution) -> EpochResult:
    """This rank's epoch -> the run's: the slowest rank's times (all-reduce MAX; a partial
    epoch's whole-epoch estimate and its range too), loss and accuracy over every rank's
    images (sums of loss * n, correct and n), energy over every rank's device (a sum, where
    every rank measured it)."""
    device = _collective_device(world)
    times = [result.data_time_s, result.train_time_s, result.epoch_time_s]
    times += [result.estimated_epoch_s or 0.0, result.estimate_low_s or 0.0]
    times.append(result.estimate_high_s or 0.0)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    n = result.images
    measured = result.energy_j is not None
    sums = torch.tensor(
        [result.train_loss * n, result.train_acc * n, n, result.energy_j or 0.0, measured],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(sums)
    data_time, train_time, epoch_time, est, low, high = slowest.tolist()
    loss_sum, correct, images, energy_j, ranks_measured = sums.tolist()
    mfu = execution.mfu(int(images), epoch_time)
    return replace(
        result,
        data_time_s=data_time,
        train_time_s=train_time,
        epoch_time_s=epoch_time,
        estimated_epoch_s=est if result.estimated_epoch_s is not None else None,
        estimate_low_s=low if result.estimate_low_s is not None else None,
        estimate_high_s=high if result.estimate_high_s is not None else None,
        train_loss=loss_sum / images,
        train_acc=correct / images,
        images=round(images),
        mfu=mfu / world.world_size if mfu is not None else None,
        energy_j=energy_j if ranks_measured == world.world_size else None,
    )


def measure_pairs(
    model: nn.Module,
    device: torch.device,
    execution: Execution,
    *,
    batch_size: int,
    pairs: int,
) -> list[float]:
    """`pairs` times, one forward + backward pass on a fixed random batch as DDP runs it
    (all-reducing gradient buckets while backward goes on), then one under `no_sync()` (no
    all-reduce), each synchronised and started together on every rank (barrier): the
    differences in seconds, i.e. the communication that backward did not hide, per step.
    Alternating the two keeps drifts out; the caller takes a median against one-off stalls.
    The model's weights and buffers are put back as they were; no optimizer step is taken.
    """
    saved = copy.deepcopy(model.state_dict())
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator(device).manual_seed(0)
    images, labels = random_batch(batch_size, device, execution, generator)
    model.train()

    def timed(sync: bool) -> float:
        model.zero_grad(set_to_none=True)
        dist.barrier()  # every rank starts together: no wait for a late peer counted
        synchronize(device)
        start = time.perf_counter()
        with contextlib.nullcontext() if sync else model.no_sync():
            with execution.autocast(device.type):
                loss = criterion(model(images), labels)
            loss.backward()
        synchronize(device)
        return time.perf_counter() - start

    differences = [timed(sync=True) - timed(sync=False) for _ in range(pairs)]
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    return differences


def _collective_device(world: World) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if world.backend == "nccl"
        else torch.device("cpu")
    )
