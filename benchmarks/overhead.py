"""Does cifarexp's harness slow training down? (run on the GPU machine)

In one process, alternate epochs of a bare lab-style loop (no tracking, no progress, one
loss.item() per step as lab code does) with cifarexp's engine and MLflow tracking, on the
same data, model and worker count (both built by `build.build_training`), --rounds times,
and print each round's ratio, then their median and range. Target: the median of
cifarexp / bare <= 1.02.

    python benchmarks/overhead.py --train-size 50000 --workers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from cifarexp.config import TrainConfig
from cifarexp.tracking import Tracker
from cifarexp.training.build import Training, build_training
from cifarexp.training.engine import synchronize, train_one_epoch


def bare_epoch(training: Training) -> tuple[float, float]:
    """The loop a lab handout would write; the epoch's wall-clock seconds and accuracy."""
    model, optimizer, device = training.train_model, training.optimizer, training.device
    criterion = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    running_loss, correct, seen = 0.0, 0, 0
    for images, labels in training.loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
        correct += outputs.argmax(1).eq(labels).sum().item()
        seen += labels.size(0)
    synchronize(device)
    return time.perf_counter() - start, correct / seen


def ours_epoch(training: Training, epoch: int, tracker: Tracker) -> float:
    """One epoch of cifarexp's engine, logged as cifarexp logs it; its wall-clock seconds."""
    start = time.perf_counter()
    result = train_one_epoch(
        training.train_model, training.loader, training.optimizer, training.device, epoch=epoch
    )
    tracker.log_epoch(result)
    return time.perf_counter() - start


def ratios_line(name: str, ratios: list[float], target: float) -> str:
    """A ratio's median and range over rounds, and whether the median meets `target`."""
    median = statistics.median(ratios)
    met = "met" if median <= target else "NOT met"
    return (
        f"{name}: median {median:.3f}, range {min(ratios):.3f}-{max(ratios):.3f} over "
        f"{len(ratios)} rounds (target <= {target}: {met})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="bare/cifarexp epoch pairs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    cfg = TrainConfig(
        dataset="synthetic", train_size=args.train_size, workers=args.workers, device=args.device
    )
    bare, ours = build_training(cfg), build_training(cfg)  # the same model, data and loader
    bare_epoch(bare)  # warm-up both: cuDNN autotuning, the workers' first start
    bare_epoch(ours)

    tracker = Tracker.open(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    rows = []
    # As a training run: with MLflow's system-metrics sampler on, as cifarexp runs train.
    with tracker.start_run("overhead-benchmark", params=cfg.as_params(), training=True):
        for epoch in range(1, args.rounds + 1):
            t_bare, _ = bare_epoch(bare)
            t_ours = ours_epoch(ours, epoch, tracker)
            rows.append((epoch, t_bare, t_ours, t_ours / t_bare))

    device = ours.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; {args.train_size} synthetic images, batch 128, {args.workers} workers")
    print(f"{'round':>5} {'bare s':>8} {'cifarexp s':>11} {'ratio':>7}")
    for epoch, t_bare, t_ours, ratio in rows:
        print(f"{epoch:>5} {t_bare:>8.2f} {t_ours:>11.2f} {ratio:>7.3f}")
    print(ratios_line("cifarexp / bare", [r[3] for r in rows], target=1.02))


if __name__ == "__main__":
    main()
