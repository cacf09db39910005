"""Everything one run trains with, built from its config and its world.

`build_training` is the one place where a config becomes data, a loader, a model, an
optimizer and the settings of its steps. It writes nothing to the store and nothing to the
terminal; `runs.run_training` tracks what it builds, the tests and benchmarks train it
directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from cifarexp.config import TrainConfig
from cifarexp.training import distributed, fastpath
from cifarexp.training.data import ImageArrayDataset, load_split, make_loader
from cifarexp.training.distributed import Combiner, World
from cifarexp.training.energy import EnergyCounter, find_counter
from cifarexp.training.engine import (
    Batch,
    EpochResult,
    Execution,
    OnBatch,
    Step,
    batches_per_epoch,
    train,
    train_step,
)
from cifarexp.training.gpu_loader import GpuLoader
from cifarexp.training.models import build_model
from cifarexp.training.noise import OtherLoad, find_other_load
from cifarexp.training.optim import build_optimizer
from cifarexp.training.warmup import GraphedStep, warm_up


@dataclass(frozen=True)
class Training:
    """What a run trains with: built by `build_training`, trained by `train`."""

    cfg: TrainConfig
    world: World
    device: torch.device
    train_set: ImageArrayDataset
    loader: Iterable[Batch]  # this process's batches: a DataLoader, its shard, or a GpuLoader
    test_loader: DataLoader | None  # with cfg.eval only
    model: nn.Module  # the model itself (its summary, its state)
    train_model: nn.Module  # what trains: the model, under DDP in a process group, compiled
    optimizer: torch.optim.Optimizer
    execution: Execution
    step: Step  # one batch's training step: engine.train_step, or a GraphedStep (cuda_graph)
    combine: Combiner  # this process's epoch -> the run's
    energy: EnergyCounter | str  # the device's energy counter, or why it has none
    other_load: OtherLoad | None = None  # the CPUs other processes use (None: cannot say)

    @property
    def energy_counter(self) -> EnergyCounter | None:
        """The counter that measures each epoch's energy, where there is one."""
        return self.energy if isinstance(self.energy, EnergyCounter) else None

    @property
    def batch_size(self) -> int:
        """The batch of this process."""
        return self.world.batch_size(self.cfg)

    @property
    def batches(self) -> int:
        """The batches an epoch trains (all of the loader's, or max_batches)."""
        return batches_per_epoch(self.loader, self.cfg.max_batches)

    def warmup_batch_sizes(self) -> list[int]:
        """The batch sizes an epoch of this process will see (see fastpath)."""
        images = self.world.images(self.cfg)
        return fastpath.warmup_batch_sizes(images, self.batch_size, self.cfg.max_batches)

    @property
    def warms_up(self) -> bool:
        """Whether `warm_up` runs: on CUDA, unless cfg.warmup is off."""
        return self.device.type == "cuda" and self.cfg.warmup

    def warm_up(self) -> float | None:
        """`warmup.warm_up` of what this run trains (where `warms_up`), and the GPU loader's
        augmentation, for the batch sizes its epochs will see: the seconds it took; None
        where none runs."""
        if not self.warms_up:
            return None
        sizes = self.warmup_batch_sizes()
        start = time.perf_counter()
        if isinstance(self.loader, GpuLoader):
            self.loader.warm_up(sizes)  # a compiled augmentation compiles here
        loader_s = time.perf_counter() - start
        model_s = warm_up(
            self.train_model,
            self.optimizer,
            self.device,
            batch_sizes=sizes,
            execution=self.execution,
            step=self.step,
        )
        return loader_s + model_s

    def train(
        self,
        on_epoch: Callable[[EpochResult], None],
        *,
        epochs: int | None = None,
        on_batch: OnBatch | None = None,
    ) -> list[EpochResult]:
        """`engine.train` of this run: cfg.epochs epochs (or `epochs`), each evaluated (with
        cfg.eval) and made the run's (`combine`) before `on_epoch` gets it."""
        return train(
            self.train_model,
            self.loader,
            self.optimizer,
            self.device,
            epochs=epochs or self.cfg.epochs,
            on_epoch=on_epoch,
            test_loader=self.test_loader,
            max_batches=self.cfg.max_batches,
            on_batch=on_batch,
            execution=self.execution,
            step=self.step,
            combine=self.combine,
            energy=self.energy_counter,
            other_load=self.other_load,
        )


def build_training(cfg: TrainConfig, world: World = World()) -> Training:
    """Device, data, loader, model (under DDP, compiled), optimizer and step settings for
    `cfg` in `world`. Everything that can fail on bad input fails here, before a run starts."""
    device = distributed.join(world, cfg.device)
    cfg.check_device(device.type)
    cfg.check_processes(several=world.joined)
    batch_size = world.batch_size(cfg)  # may not split: fails before the data is made
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
        fused=cfg.cuda_graph,
    )
    loader = train_loader(cfg, world, train_set, device)
    execution = fastpath.execution(cfg, model, device)
    ddp_model = distributed.wrap(model, device, world)
    combine = Combiner(
        world,
        ddp_model,
        device,
        execution,
        batch_size=batch_size,
        steps_per_epoch=batches_per_epoch(loader, cfg.max_batches),
    )
    return Training(
        cfg=cfg,
        world=world,
        device=device,
        train_set=train_set,
        loader=loader,
        test_loader=make_loader(cfg, test_set, train=False) if test_set is not None else None,
        model=model,
        train_model=fastpath.compile_model(ddp_model, cfg.compile),  # shares model's parameters
        optimizer=optimizer,
        execution=execution,
        step=GraphedStep() if cfg.cuda_graph else train_step,
        combine=combine,
        energy=find_counter(device, world.world_size),
        other_load=find_other_load(whole_job=world.joined),
    )


def train_loader(
    cfg: TrainConfig, world: World, train_set: ImageArrayDataset, device: torch.device
) -> Iterable[Batch]:
    """This process's training batches: made on the device (loader gpu) or by the study's
    DataLoader, over its shard of the set."""
    local = cfg.replace(batch_size=world.batch_size(cfg))
    if cfg.loader == "gpu":
        return GpuLoader(
            train_set,
            batch_size=local.batch_size,
            device=device,
            seed=cfg.seed,
            channels_last=cfg.channels_last,
            shard=(world.rank, world.world_size),
            compiled=cfg.compile != "none",
        )
    return distributed.shard(
        lambda sampler: make_loader(local, train_set, train=True, sampler=sampler),
        train_set,
        world,
        cfg.seed,
    )
