"""The training engine: one honestly timed epoch (C2), evaluation, and the epoch loop.

It knows nothing of MLflow or of the terminal: it reports through callbacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from cifarexp.config import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
OnBatch = Callable[[int, float, float], None]  # (batch index, batch loss, batch accuracy)


@dataclass(frozen=True)
class EpochResult:
    """One epoch's measurements, named as the study names them (SPEC §1, §4)."""

    epoch: int  # 1-based
    data_time_s: float  # C2.1: waiting for the next batch, host->device copy excluded
    train_time_s: float  # C2.2: forward, loss, backward, step; device synchronised
    epoch_time_s: float  # C2.3: wall clock of the whole epoch
    train_loss: float  # mean over the epoch's images
    train_acc: float  # top-1, fraction 0-1
    images: int
    test_loss: float | None = None
    test_acc: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.epoch_time_s

    def metrics(self) -> dict[str, float]:
        """The SPEC §4 per-epoch metrics (test metrics only when evaluation ran)."""
        values = {k: v for k, v in asdict(self).items() if k not in ("epoch", "images")}
        values["images_per_s"] = self.images_per_s
        return {k: float(v) for k, v in values.items() if v is not None}


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when available, else CPU; asking for an absent CUDA device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {name} was asked for but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device: {name} does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer read next counts it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int,
    max_batches: int | None = None,
    on_batch: OnBatch | None = None,
) -> EpochResult:
    """Train one epoch and time it exactly as C2 defines (data wait, computation, wall clock)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    data_time = train_time = loss_sum = 0.0
    correct = seen = 0
    epoch_start = time.perf_counter()
    wait_start = epoch_start
    batches = iter(loader)  # starting the workers is part of waiting for the first batch
    for index, (images, labels) in enumerate(batches):
        data_time += time.perf_counter() - wait_start
        # The host->device copy is in neither part (C2.1 excludes it), only in the total.
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        synchronize(device)
        compute_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = criterion(logits, labels)
        loss.backward()
        optimizer.step()
        synchronize(device)  # GPU work is asynchronous: count it in the step that queued it
        train_time += time.perf_counter() - compute_start

        n = labels.size(0)
        batch_loss, batch_correct = torch.stack(
            [loss.detach().float(), (logits.argmax(1) == labels).sum().float()]
        ).tolist()
        loss_sum += batch_loss * n
        correct += int(batch_correct)
        seen += n
        if on_batch is not None:
            on_batch(index, batch_loss, batch_correct / n)
        if max_batches is not None and index + 1 >= max_batches:
            break
        wait_start = time.perf_counter()
    epoch_time = time.perf_counter() - epoch_start
    if seen == 0:
        raise RuntimeError("the training set produced no batches")
    return EpochResult(
        epoch=epoch,
        data_time_s=data_time,
        train_time_s=train_time,
        epoch_time_s=epoch_time,
        train_loss=loss_sum / seen,
        train_acc=correct / seen,
        images=seen,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Batch], device: torch.device
) -> tuple[float, float]:
    """Mean loss and top-1 accuracy on a held-out split (never inside a timed epoch)."""
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
) -> list[EpochResult]:
    """Train for `epochs`, reporting each finished epoch to `on_epoch` as soon as it ends."""
    results = []
    for epoch in range(1, epochs + 1):
        result = train_one_epoch(
            model,
            loader,
            optimizer,
            device,
            epoch=epoch,
            max_batches=max_batches,
            on_batch=on_batch,
        )
        if test_loader is not None:
            test_loss, test_acc = evaluate(model, test_loader, device)
            result = replace(result, test_loss=test_loss, test_acc=test_acc)
        on_epoch(result)
        results.append(result)
    return results
