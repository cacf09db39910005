"""The training engine: one honestly timed epoch (C2), evaluation, and the epoch loop.

It knows nothing of MLflow or of the terminal: it reports through callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from cifarexp.config import ConfigError, check_device_name

if TYPE_CHECKING:
    from cifarexp.training.energy import EnergyCounter
    from cifarexp.training.noise import OtherLoad

Batch = tuple[torch.Tensor, torch.Tensor]
OnBatch = Callable[[int, float, float], None]  # (batch index, batch loss, batch accuracy)
# One training step: (model, criterion, optimizer, images, labels, execution) -> (loss, logits);
# `train_step`, or the fast path's captured one (GraphedStep).
Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EpochResult:
    """One epoch's measurements, named as the study names them (docs/timing.md: "How the time is
    measured")."""

    epoch: int  # 1-based
    data_time_s: float  # C2.1: waiting for the next batch, host->device copy excluded
    train_time_s: float  # C2.2: forward, loss, backward, step; device synchronised
    epoch_time_s: float  # C2.3: wall clock of the whole epoch
    train_loss: float  # mean over the epoch's images
    train_acc: float  # top-1, fraction 0-1
    images: int
    test_loss: float | None = None
    test_acc: float | None = None
    estimated_epoch_s: float | None = None  # a whole epoch, from its first max_batches
    # The estimate's range: its batches after the first at their fastest and slowest.
    estimate_low_s: float | None = None
    estimate_high_s: float | None = None
    mfu: float | None = None  # model FLOPs / epoch time / device peak; None where unknown
    comm_time_s: float | None = None  # DDP: gradient all-reduce not hidden by backward
    energy_j: float | None = None  # the device's energy counter over the epoch (see energy)
    # CPUs that other processes kept busy on average while the epoch ran (see noise)
    other_cpu_load_cpus: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.epoch_time_s

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics (test metrics only when evaluation ran; energy_j, power_w
        and energy_per_image_mj only where a counter measured them). A partial epoch
        (max_batches) logs its own times, energy and communication as partial_*, and its
        whole-epoch estimates as epoch_time_s, energy_j and comm_time_s (the last two scaled
        as its time is): a metric named like an epoch's is an epoch's."""
        values = {k: v for k, v in asdict(self).items() if k not in ("epoch", "images")}
        values["images_per_s"] = self.images_per_s
        if self.energy_j is not None:
            values["power_w"] = self.energy_j / self.epoch_time_s
            values["energy_per_image_mj"] = self.energy_j / self.images * 1000
        estimate = values.pop("estimated_epoch_s")
        if estimate is not None:
            values["partial_data_s"] = values.pop("data_time_s")
            values["partial_train_s"] = values.pop("train_time_s")
            values["partial_total_s"] = values["epoch_time_s"]
            values["epoch_time_s"] = estimate
            for name, partial in (
                ("energy_j", "partial_energy_j"),
                ("comm_time_s", "partial_comm_s"),
            ):
                if values[name] is not None:
                    values[partial] = values[name]
                    values[name] = values[name] * estimate / self.epoch_time_s
        return {k: float(v) for k, v in values.items() if v is not None}


def summary(results: list[EpochResult]) -> dict[str, float]:
    """A run's summary under the same names for every run (a comparison's children side by
    side in MLflow's charts): the last epoch's loss and accuracy and the epochs' mean times
    (a partial epoch's as the whole epoch its total estimates, its parts scaled alike) and,
    where every epoch measured it, energy."""
    if not results:
        return {}
    epochs = [(m := result.metrics()) | whole_epoch_times(m) for result in results]

    def mean(key: str) -> float:
        return sum(m[key] for m in epochs) / len(epochs)

    values = {
        "final_loss": results[-1].train_loss,
        "final_acc": results[-1].train_acc,
        "avg_epoch_time_s": mean("epoch_time_s"),
        "avg_train_time_s": mean("train_time_s"),
        "avg_data_time_s": mean("data_time_s"),
    }
    if all("energy_j" in m for m in epochs):
        values["avg_energy_j"] = mean("energy_j")
    return values


def whole_epoch_times(metrics: Mapping) -> dict:
    """A partial epoch's (max_batches) data-loading and training times scaled, as its total
    was, to the whole epoch that its epoch_time_s estimates, as data_time_s and train_time_s;
    nothing for a whole epoch. `metrics`: one epoch's metrics, or a DataFrame of them."""
    if "partial_total_s" not in metrics:
        return {}
    scale = metrics["epoch_time_s"] / metrics["partial_total_s"]
    return {
        "data_time_s": metrics["partial_data_s"] * scale,
        "train_time_s": metrics["partial_train_s"] * scale,
    }


@dataclass(frozen=True)
class Execution:
    """How each training step runs: the fast path's settings.

    The defaults are the study's: fp32, NCHW memory order, eager, per-step synchronised timing.
    """

    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16: forward and loss in autocast
    channels_last: bool = False  # inputs go to the device in NHWC memory order, as the model
    compiled: bool = False  # the model is torch.compile'd, and warmed up (see warm_up)
    timing: str = "sync"  # sync: per-step synchronised (C2); events: CUDA events, one wait
    flops_per_image: float | None = None  # forward + backward FLOPs per trained image
    peak_flops: float | None = None  # the device's peak FLOP/s at this precision

    def autocast(
        self, device_type: str, *, cache: bool = True
    ) -> contextlib.AbstractContextManager:
        """bf16 autocast, or nothing; `cache` False inside a CUDA-graph capture (the cast
        weights are then made by the graph itself at each replay)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.autocast_dtype, cache_enabled=cache)

    def to_device(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The copy to the device (a no-op for a batch already there, in the right order)."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return images.to(device, non_blocking=True, memory_format=memory_format)

    def batch_stats(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """[loss, images right] of one step, on its device; with a compiled model, compiled
        too (one kernel where eager runs five: for each of an epoch's steps). `warm_up`
        compiles it per batch size. Detached first: a captured step's outputs are, and the
        compiled code is specialised to whether its inputs require grad."""
        stats = compiled_for_shapes(batch_stats) if self.compiled else batch_stats
        return stats(loss.detach(), logits.detach(), labels)

    def mfu(self, images: int, seconds: float) -> float | None:
        """Model FLOPs utilisation of `images` trained in `seconds`; None where unknown."""
        if self.flops_per_image is None or self.peak_flops is None:
            return None
        return self.flops_per_image * images / seconds / self.peak_flops


def batch_stats(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss, how many of the batch's images the logits got right], as float32."""
    return torch.stack([loss.float(), (logits.argmax(1) == labels).sum().float()])


@functools.cache
def compiled_for_shapes(function: Callable) -> Callable:
    """`function` torch.compile'd for fixed shapes (one compilation per shape), made once."""
    return torch.compile(function, dynamic=False)


def random_batch(
    size: int, device: torch.device, execution: Execution, generator: torch.Generator
) -> Batch:
    """`size` random CIFAR-shaped images, in the memory order batches will have, all of
    class 0: a batch for untimed steps (warm-up, probes) that draws nothing from the global
    RNG."""
    images = torch.randn(size, 3, 32, 32, device=device, generator=generator)
    labels = torch.zeros(size, dtype=torch.long, device=device)
    return execution.to_device(images, device), labels


def resolve_device(name: str, field: str = "device") -> torch.device:
    """auto -> CUDA when available, else CPU; asking for an absent CUDA device is an error
    (naming `field`)."""
    check_device_name(name, field)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{name} was asked for but no CUDA device is available", field)
        if device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"{name} does not exist ({count} CUDA devices)", field)
    return device


def batches_per_epoch(loader: Sized, max_batches: int | None) -> int:
    """The batches an epoch trains: all of the loader's, or the first `max_batches`."""
    return min(len(loader), max_batches or len(loader))


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer read next counts it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    execution: Execution,
    *,
    autocast_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward, optimizer step: the computation C2.2 times. Returns the loss
    and the logits, to be read before the next step."""
    if execution.compiled:
        # CUDA graphs (compile modes reduce-overhead, max-autotune) reuse their output memory
        # at each replay: mark the start of a step, the previous step's outputs being read.
        torch.compiler.cudagraph_mark_step_begin()
    optimizer.zero_grad(set_to_none=True)
    with execution.autocast(images.device.type, cache=autocast_cache):
        logits = model(images)
        loss = criterion(logits, labels)
    loss.backward()
    optimizer.step()
    return loss, logits


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int,
    max_batches: int | None = None,
    on_batch: OnBatch | None = None,
    execution: Execution = Execution(),
    step: Step = train_step,
    energy: EnergyCounter | None = None,
) -> EpochResult:
    """Train one epoch and time it exactly as C2 defines (data wait, computation, wall clock).

    `step` trains one batch (default `train_step`). With `execution.timing == "events"` see
    `_train_one_epoch_events`. With an `energy` counter the epoch's energy is read where its
    wall clock starts and stops, the device idle at both (no cost inside the epoch).
    """
    model.train()
    if execution.timing == "events":
        return _train_one_epoch_events(
            model,
            loader,
            optimizer,
            device,
            epoch=epoch,
            max_batches=max_batches,
            on_batch=on_batch,
            execution=execution,
            step=step,
            energy=energy,
        )
    criterion = nn.CrossEntropyLoss()
    data_time = train_time = loss_sum = 0.0
    correct = seen = 0
    ends: list[float] = []  # each batch's end, for a partial epoch's estimate
    start_j = _start_energy(energy, device)
    epoch_start = time.perf_counter()
    wait_start = epoch_start
    batches = iter(loader)  # starting the workers is part of waiting for the first batch
    for index, (images, labels) in enumerate(batches):
        synchronize(device)  # a batch made on the GPU (--loader gpu) is ready when its kernels are
        data_time += time.perf_counter() - wait_start
        # The host->device copy is in neither part (C2.1 excludes it), only in the total.
        images = execution.to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        synchronize(device)
        compute_start = time.perf_counter()
        loss, logits = step(model, criterion, optimizer, images, labels, execution)
        synchronize(device)  # GPU work is asynchronous: count it in the step that queued it
        ends.append(time.perf_counter())
        train_time += ends[-1] - compute_start

        n = labels.size(0)
        batch_loss, batch_correct = execution.batch_stats(loss, logits, labels).tolist()
        loss_sum += batch_loss * n
        correct += int(batch_correct)
        seen += n
        if on_batch is not None:
            on_batch(index, batch_loss, batch_correct / n)
        if max_batches is not None and index + 1 >= max_batches:
            break
        wait_start = time.perf_counter()
    epoch_time = time.perf_counter() - epoch_start  # the last step was synchronised
    energy_j = _energy_since(energy, start_j)
    if seen == 0:
        raise RuntimeError("the training set produced no batches")
    batches = len(loader) if isinstance(loader, Sized) else index + 1
    estimate = estimate_epoch([t - epoch_start for t in ends], batches, epoch_time)
    return EpochResult(
        epoch=epoch,
        data_time_s=data_time,
        train_time_s=train_time,
        epoch_time_s=epoch_time,
        train_loss=loss_sum / seen,
        train_acc=correct / seen,
        images=seen,
        **estimate,
        mfu=execution.mfu(seen, epoch_time),
        energy_j=energy_j,
    )


def estimate_epoch(ends: list[float], batches: int, total: float) -> dict[str, float | None]:
    """A whole epoch of `batches` from its first ones, which ended `ends` seconds after it
    started, in `total` seconds: the first batch once (it holds the workers' start), then the
    later ones' mean time for each remaining batch, with its range (their fastest and
    slowest time for each); when only one ran, the partial epoch's time for each batch (no
    range). Nothing for a whole epoch."""
    if not ends or len(ends) >= batches:
        return {"estimated_epoch_s": None, "estimate_low_s": None, "estimate_high_s": None}
    if len(ends) == 1:
        return {"estimated_epoch_s": total * batches, "estimate_low_s": None,
                "estimate_high_s": None}  # fmt: skip
    times = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    first, rest = ends[0], batches - 1
    return {
        "estimated_epoch_s": first + rest * sum(times) / len(times),
        "estimate_low_s": first + rest * min(times),
        "estimate_high_s": first + rest * max(times),
    }


def _train_one_epoch_events(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int,
    max_batches: int | None,
    on_batch: OnBatch | None,
    execution: Execution,
    step: Step,
    energy: EnergyCounter | None,
) -> EpochResult:
    """`train_one_epoch` timed with CUDA events: the host queues work and waits once, at the end.

    Each step records four events on the device's stream: batch asked for, batch ready, batch
    on the device, step done. C2.1 is the device's time from asked to ready: its idle wait
    for the host's batch, plus the kernels of a batch made on the GPU; a host-side wait that
    overlaps the previous step's device work costs the device nothing and is not counted.
    C2.2 is from on-the-device to done. The copy is in neither, as in sync mode. Loss and
    accuracy stay on the device until the epoch ends; `on_batch` then gets every batch.
    """
    criterion = nn.CrossEntropyLoss()
    stream = torch.cuda.current_stream(device)
    marks: list[tuple[torch.cuda.Event, ...]] = []
    stats: list[torch.Tensor] = []  # per step: [loss, correct], on the device
    sizes: list[int] = []
    start_j = _start_energy(energy, device)
    epoch_start = time.perf_counter()
    asked = _event(stream)
    for index, (images, labels) in enumerate(loader):
        ready = _event(stream)
        images = execution.to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        start = _event(stream)
        loss, logits = step(model, criterion, optimizer, images, labels, execution)
        marks.append((asked, ready, start, _event(stream)))
        stats.append(execution.batch_stats(loss, logits, labels))
        sizes.append(labels.size(0))
        if max_batches is not None and index + 1 >= max_batches:
            break
        asked = _event(stream)
    synchronize(device)  # the epoch's only wait
    epoch_time = time.perf_counter() - epoch_start
    energy_j = _energy_since(energy, start_j)
    if not sizes:
        raise RuntimeError("the training set produced no batches")
    per_batch = torch.stack(stats).tolist()
    if on_batch is not None:
        for index, ((loss, correct), n) in enumerate(zip(per_batch, sizes, strict=True)):
            on_batch(index, loss, correct / n)
    seen = sum(sizes)
    batches = len(loader) if isinstance(loader, Sized) else len(sizes)
    # A partial epoch's step ends, on the device's clock from its first event.
    ends = [marks[0][0].elapsed_time(m[3]) / 1000 for m in marks] if len(sizes) < batches else []
    return EpochResult(
        epoch=epoch,
        data_time_s=sum(a.elapsed_time(r) for a, r, _, _ in marks) / 1000,  # ms -> s
        train_time_s=sum(s.elapsed_time(d) for _, _, s, d in marks) / 1000,
        epoch_time_s=epoch_time,
        train_loss=sum(loss * n for (loss, _), n in zip(per_batch, sizes, strict=True)) / seen,
        train_acc=sum(correct for _, correct in per_batch) / seen,
        images=seen,
        **estimate_epoch(ends, batches, epoch_time),
        mfu=execution.mfu(seen, epoch_time),
        energy_j=energy_j,
    )


def _start_energy(energy: EnergyCounter | None, device: torch.device) -> float | None:
    """The counter's joules as an epoch starts, the device idle (nothing earlier in it)."""
    if energy is None:
        return None
    synchronize(device)
    return energy.joules()


def _energy_since(energy: EnergyCounter | None, start_j: float | None) -> float | None:
    """The joules counted since `start_j`, the device synchronised just before."""
    return None if energy is None or start_j is None else energy.joules() - start_j


def _event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def compiled_shapes_only(execution: Execution) -> contextlib.AbstractContextManager:
    """Inside, a compiled model runs only code compiled already (by `warm_up`, for the full
    batch) and runs any other shape (an epoch's smaller last batch) eagerly: one compilation
    per run, never one inside an epoch. It compiles nothing itself: warm up first."""
    if not execution.compiled or not hasattr(torch.compiler, "set_stance"):  # torch < 2.6
        return contextlib.nullcontext()
    return torch.compiler.set_stance("eager_on_recompile")


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Batch], device: torch.device
) -> tuple[float, float]:
    """Mean loss and top-1 accuracy on a held-out split (never inside a timed epoch)."""
    # A compiled model is evaluated eagerly: eval mode would otherwise compile it again.
    model = getattr(model, "_orig_mod", model)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss_sum += criterion(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.size(0)
    return loss_sum / seen, correct / seen


def train(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epochs: int,
    on_epoch: Callable[[EpochResult], None],
    test_loader: Iterable[Batch] | None = None,
    max_batches: int | None = None,
    on_batch: OnBatch | None = None,
    execution: Execution = Execution(),
    step: Step = train_step,
    combine: Callable[[EpochResult], EpochResult] | None = None,
    energy: EnergyCounter | None = None,
    other_load: OtherLoad | None = None,
) -> list[EpochResult]:
    """Train for `epochs`, reporting each finished epoch to `on_epoch` as soon as it ends.

    A compiled model (`execution.compiled`) and a `GraphedStep` must have been through
    `warm_up`; `step` trains one batch (see `train_one_epoch`). `combine`
    turns this process's epoch into the run's (several processes: see `distributed`); it
    runs after the timed epoch and the evaluation, on every process. `energy`, a counter,
    measures each epoch's energy (see `train_one_epoch`); `other_load`, the CPUs other
    processes used while it ran, read just before and after it (see `noise`).
    """
    results = []
    for epoch in range(1, epochs + 1):
        cpu_start = other_load.start() if other_load is not None else None
        with compiled_shapes_only(execution):
            result = train_one_epoch(
                model,
                loader,
                optimizer,
                device,
                epoch=epoch,
                max_batches=max_batches,
                on_batch=on_batch,
                execution=execution,
                step=step,
                energy=energy,
            )
        if other_load is not None and cpu_start is not None:  # outside the timed epoch
            result = replace(result, other_cpu_load_cpus=other_load.since(cpu_start))
        if test_loader is not None:
            test_loss, test_acc = evaluate(model, test_loader, device)
            result = replace(result, test_loss=test_loss, test_acc=test_acc)
        if combine is not None:
            result = combine(result)
        on_epoch(result)
        results.append(result)
    return results
