"""Does cifarexp's harness slow training down? (issue 2; run on the GPU machine)

In one process, alternate epochs of a bare lab-style loop (no tracking, no progress bar,
one loss.item() per step as lab code does) with cifarexp's engine + MLflow tracking, on the
same data and worker count, and print each pair's ratio. Target: cifarexp <= 1.02x bare.

    python benchmarks/overhead.py --train-size 50000 --workers 8 --pairs 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from cifarexp import tracking
from cifarexp.config import TrainConfig
from cifarexp.data import load_split, make_loader
from cifarexp.engine import resolve_device, synchronize, train_one_epoch
from cifarexp.models import build_model
from cifarexp.optim import build_optimizer


def bare_epoch(model, loader, optimizer, device) -> tuple[float, float]:
    """The loop a lab handout would write; the epoch's wall-clock seconds and accuracy."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    running_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="bare/cifarexp epoch pairs")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    cfg = TrainConfig(
        dataset="synthetic", train_size=args.train_size, workers=args.workers, device=args.device
    )
    device = resolve_device(cfg.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    loader = make_loader(cfg, load_split(cfg, train=True), train=True)

    def setup():
        torch.manual_seed(cfg.seed)
        model = build_model().to(device)
        return model, build_optimizer(cfg.optimizer, model.parameters())

    bare, ours = setup(), setup()
    bare_epoch(bare[0], loader, bare[1], device)  # warm-up both: cudnn autotuning
    bare_epoch(ours[0], loader, ours[1], device)

    store = tempfile.mkdtemp()
    tracking.use_store(f"sqlite:///{store}/mlflow.db")
    rows = []
    with tracking.start_run("overhead-benchmark", params=cfg.as_params()):
        for epoch in range(1, args.pairs + 1):
            t_bare, _ = bare_epoch(bare[0], loader, bare[1], device)
            start = time.perf_counter()
            result = train_one_epoch(ours[0], loader, ours[1], device, epoch=epoch)
            tracking.log_epoch(result)
            t_ours = time.perf_counter() - start
            rows.append((epoch, t_bare, t_ours, t_ours / t_bare))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; {args.train_size} synthetic images, batch 128, {args.workers} workers")
    print(f"{'pair':>4} {'bare s':>8} {'cifarexp s':>11} {'ratio':>7}")
    for epoch, t_bare, t_ours, ratio in rows:
        print(f"{epoch:>4} {t_bare:>8.2f} {t_ours:>11.2f} {ratio:>7.3f}")
    median = statistics.median(r[3] for r in rows)
    print(f"median ratio cifarexp/bare: {median:.3f} (target <= 1.02)")


if __name__ == "__main__":
    main()
