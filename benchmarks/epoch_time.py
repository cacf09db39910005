"""How fast can an epoch be? A bare loop vs cifarexp's standard path vs its fast path (issue 6).

One process, one card, synthetic CIFAR-shaped images (the same for every path), batch 128:

  (a) a bare, lab-style loop: torch DataLoader with the study's PIL transforms, a plain
      training loop; no cifarexp engine, no tracking
  (b) cifarexp's standard path: jobs.run_training with the same workers, tracked into a
      temporary sqlite store
  (c) cifarexp's fast path: --loader gpu --precision bf16 --channels-last --compile MODE
      --timing events

Prints each path's epoch time (median of epochs 2..N: epoch 1 of (a) and (b) holds their
warm-up), warm-up time, final train accuracy, and the ratios. Targets (issue 6): (c) <= 1.5 s
per epoch on an H100/H200 (stretch 1.0 s) and >= 3x faster than (b); (c)'s accuracy after
5 epochs within 2 points of (b)'s; (b) <= 1.02x (a).

    python benchmarks/epoch_time.py --workers 8                 # on the GPU machine
    python benchmarks/epoch_time.py --device cpu --train-size 256 --epochs 2 --workers 0

On CPU, (c) runs without compile and events timing (CUDA only): a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass

import torch
from overhead import bare_epoch  # the same bare loop as benchmarks/overhead.py

from cifarexp import tracking
from cifarexp.build import build_training
from cifarexp.config import TrainConfig
from cifarexp.jobs import Labels, run_training


@dataclass(frozen=True)
class Row:
    path: str
    epoch_times: list[float]
    train_acc: float  # after the last epoch
    warmup_s: float | None = None
    mfu: float | None = None  # median over the same epochs as the time

    @property
    def epoch_s(self) -> float:
        return statistics.median(self.epoch_times[1:] or self.epoch_times)


# ----------------------------------------------------------------- (a) the bare loop


def bare_loop(cfg: TrainConfig, epochs: int) -> Row:
    """(a): the model, optimizer and DataLoader cifarexp builds, trained by a lab's loop."""
    training = build_training(cfg)
    epoch_times, train_acc = [], 0.0
    for _ in range(epochs):
        seconds, train_acc = bare_epoch(training)
        epoch_times.append(seconds)
    return Row(f"(a) bare loop, {cfg.workers} workers", epoch_times, train_acc)


# ----------------------------------------------------------------- (b), (c) cifarexp


def cifarexp_path(name: str, cfg: TrainConfig) -> Row:
    run = run_training(cfg, Labels("benchmark", "C2", name), experiment="benchmark")
    results = run.results
    mfus = [r.mfu for r in results[1:] or results if r.mfu is not None]
    return Row(
        name,
        [r.epoch_time_s for r in results],
        results[-1].train_acc,
        run.warmup_s,
        statistics.median(mfus) if mfus else None,
    )


def fast_settings(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    if device.type != "cuda":  # compile, events and tf32 are CUDA only
        return {"loader": "gpu", "precision": "bf16", "channels_last": True}
    return {
        "loader": "gpu",
        "precision": "bf16",
        "channels_last": True,
        "compile": args.compile,
        "timing": "events",
    }


# ----------------------------------------------------------------- report


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def report(rows: dict[str, Row], args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\nResNet-18, {args.train_size:,} synthetic images, batch {args.batch_size}, "
        f"{args.epochs} epochs, {name}, torch {torch.__version__}"
    )
    print(f"epoch s = median of epochs 2..{args.epochs}\n")
    width = max(len(row.path) for row in rows.values())
    print(f"{'path':<{width}}  {'epoch s':>8}  {'warm-up s':>9}  {'train acc':>9}  {'mfu':>6}")
    for row in rows.values():
        mfu = "–" if row.mfu is None else f"{row.mfu:.1%}"
        print(
            f"{row.path:<{width}}  {row.epoch_s:>8.3f}  {seconds(row.warmup_s):>9}  "
            f"{row.train_acc:>9.1%}  {mfu:>6}"
        )
    print()
    a, b, c = rows.get("a"), rows.get("b"), rows.get("c")
    if b and c:
        print(f"c/b = {c.epoch_s / b.epoch_s:.3f}   (target <= 0.333: (c) >= 3x faster than (b))")
        gap = 100 * (c.train_acc - b.train_acc)
        print(f"c - b train accuracy = {gap:+.1f} points   (target: within 2)")
    if a and b:
        print(f"b/a = {b.epoch_s / a.epoch_s:.3f}   (target <= 1.02)")
    if c:
        print(f"c epoch = {c.epoch_s:.3f} s   (target <= 1.5 s on an H100/H200, stretch 1.0 s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of (a), (b)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        default="max-autotune",
        choices=["none", "default", "reduce-overhead", "max-autotune"],
        help="(c)'s torch.compile mode (SPEC §3: max-autotune ~220 s, reduce-overhead ~20 s)",
    )
    parser.add_argument("--paths", default="abc", help="which of a, b, c to run")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=args.train_size,
        batch_size=args.batch_size,
        workers=args.workers,
        epochs=args.epochs,
        device=args.device,
        seed=args.seed,
    )
    fast = fast_settings(args, device)
    described = ", ".join(f"{k}={v}" for k, v in fast.items())
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory() as store:
        tracking.use_store(f"sqlite:///{store}/mlflow.db")
        if "a" in args.paths:
            rows["a"] = bare_loop(cfg, args.epochs)
        if "b" in args.paths:
            rows["b"] = cifarexp_path(f"(b) cifarexp standard, {args.workers} workers", cfg)
        if "c" in args.paths:
            rows["c"] = cifarexp_path(f"(c) cifarexp fast: {described}", cfg.replace(**fast))
    report(rows, args, device)


if __name__ == "__main__":
    main()
