"""How fast can an epoch be? The bare loop, cifarexp's standard path, its fast path and the
card's floor, alternated in rounds in one process (docs/results.md: "How fast is an epoch?").

One card, synthetic CIFAR-shaped images (the same for every path), batch 128:

  (a) a bare, lab-style loop: the DataLoader with the study's PIL transforms, a plain
      training loop; no cifarexp engine, no tracking
  (b) cifarexp's standard path: `engine.train` with the same workers, each epoch logged to a
      temporary sqlite store as `cifarexp time` logs it
  (c) cifarexp's fast path: --loader gpu --precision bf16 --channels-last --cuda-graph
      --timing events, trained and logged as (b)
  (d) the floor: what one step of the same model and optimizer costs on one fixed batch
      already on the device, the whole step captured as one CUDA graph (bf16 autocast,
      channels_last): `len(loader)` replays, timed as one epoch
  (e) optional: the fast path with --compile reduce-overhead instead of --cuda-graph

Every path is built through `build.build_training` and warmed up once (untimed); then each
round runs --epochs epochs of every path in turn, and a path's time in a round is the
median of its epochs there. Printed: each path's median and range over the rounds, its warm-up
and final training accuracy, and each ratio's per-round values, median and range. A target
is met when the median meets it: (b)/(a) <= 1.02, (c)/(d) <= 1.10, (c)/(b) <= 1/3, (c)'s
accuracy within 2 points of (b)'s (both have trained the same epochs).

    python benchmarks/epoch_time.py --workers 8                 # on the GPU machine
    python benchmarks/epoch_time.py --device cpu --train-size 256 --rounds 1 --workers 0

On CPU, (c) runs without CUDA graph and events timing and (d) is skipped (CUDA only): a
smoke test, not a result.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from overhead import bare_epoch, ratios_line  # the same bare loop as benchmarks/overhead.py
from torch import nn

from cifarexp.config import TrainConfig
from cifarexp.tracking import Tracker
from cifarexp.training.build import build_training
from cifarexp.training.engine import synchronize

Epoch = Callable[[], tuple[float, float | None]]  # one epoch: (seconds, train accuracy)


@dataclass
class Path:
    name: str
    epoch: Epoch
    warmup_s: float | None = None
    rounds: list[float] = field(default_factory=list)  # per round: the median epoch
    train_acc: float | None = None  # after the last epoch


# ----------------------------------------------------------------- the paths


def bare_path(cfg: TrainConfig) -> Path:
    """(a): the model, optimizer and DataLoader cifarexp builds, trained by a lab's loop."""
    training = build_training(cfg)
    return Path(f"(a) bare loop, {cfg.workers} workers", lambda: bare_epoch(training))


def cifarexp_path(name: str, cfg: TrainConfig, tracker: Tracker) -> Path:
    """(b), (c), (e): cifarexp's engine with its warm-up, each epoch logged to the store."""
    training = build_training(cfg)
    warmup_s = training.warm_up()

    def epoch() -> tuple[float, float]:
        start = time.perf_counter()
        (result,) = training.train(tracker.log_epoch, epochs=1)
        return time.perf_counter() - start, result.train_acc

    return Path(name, epoch, warmup_s)


def floor_path(cfg: TrainConfig) -> Path:
    """(d): the captured step replayed on one batch that never changes; no loader, no timing
    of its own, one wait at the end."""
    training = build_training(cfg)
    warmup_s = training.warm_up()
    images, labels = next(iter(training.loader))
    criterion, steps = nn.CrossEntropyLoss(), len(training.loader)
    model, optimizer, execution = training.train_model, training.optimizer, training.execution

    def epoch() -> tuple[float, None]:
        start = time.perf_counter()
        for _ in range(steps):
            training.step(model, criterion, optimizer, images, labels, execution)
        synchronize(training.device)
        return time.perf_counter() - start, None

    return Path("(d) floor: one batch, whole step as one CUDA graph", epoch, warmup_s)


def fast_settings(device: torch.device, compile: str = "none") -> dict[str, object]:
    settings: dict[str, object] = {"loader": "gpu", "precision": "bf16", "channels_last": True}
    if device.type == "cuda":  # graphs, compile and events are CUDA only
        graph = {"cuda_graph": True} if compile == "none" else {"compile": compile}
        settings |= graph | {"timing": "events"}
    return settings


def described(settings: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("loader", "precision"))


# ----------------------------------------------------------------- rounds and report


def run_rounds(paths: dict[str, Path], rounds: int, epochs: int) -> None:
    """One untimed epoch of every path, then `rounds` rounds of `epochs` epochs each, in turn."""
    for path in paths.values():
        path.epoch()
    for r in range(1, rounds + 1):
        for key, path in paths.items():
            runs = [path.epoch() for _ in range(epochs)]
            path.rounds.append(statistics.median(seconds for seconds, _ in runs))
            path.train_acc = runs[-1][1]
            print(f"round {r}: ({key}) {path.rounds[-1]:.3f} s", flush=True)


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def report(paths: dict[str, Path], args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\nResNet-18, {args.train_size:,} synthetic images, batch {args.batch_size}, "
        f"{name}, torch {torch.__version__}; {args.rounds} rounds of {args.epochs} epochs, "
        "a round's time = the median of its epochs\n"
    )
    width = max(len(p.name) for p in paths.values())
    header = f"{'path':<{width}}  {'epoch s':>8}  {'range':>13}  {'warm-up s':>9}  {'train acc':>9}"
    print(header)
    for p in paths.values():
        spread = f"{min(p.rounds):.3f}-{max(p.rounds):.3f}"
        acc = "–" if p.train_acc is None else f"{p.train_acc:.1%}"
        median = statistics.median(p.rounds)
        print(
            f"{p.name:<{width}}  {median:>8.3f}  {spread:>13}  {seconds(p.warmup_s):>9}  {acc:>9}"
        )
    print()
    for top, bottom, target in (("b", "a", 1.02), ("c", "d", 1.10), ("c", "b", 0.333)):
        if top in paths and bottom in paths:
            ratios = [t / b for t, b in zip(paths[top].rounds, paths[bottom].rounds, strict=True)]
            print(f"  per round: {', '.join(f'{x:.3f}' for x in ratios)}")
            print(ratios_line(f"({top})/({bottom})", ratios, target))
    b, c = paths.get("b"), paths.get("c")
    if b and c and b.train_acc is not None and c.train_acc is not None:
        gap = 100 * (c.train_acc - b.train_acc)
        verdict = "met" if abs(gap) <= 2 else "NOT met"
        print(f"(c) - (b) train accuracy: {gap:+.1f} points (target: within 2: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of (a), (b)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each path per round")
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="abcd", help="which of a, b, c, d, e to run")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=args.train_size,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        seed=args.seed,
    )
    fast, compiled = fast_settings(device), fast_settings(device, "reduce-overhead")
    with tempfile.TemporaryDirectory() as store:
        tracker = Tracker.open(f"sqlite:///{store}/mlflow.db")
        # A training run, as `cifarexp time` starts it: MLflow's system-metrics sampler on.
        with tracker.start_run("benchmark", params=cfg.as_params(), training=True):
            builders: dict[str, Callable[[], Path]] = {
                "a": lambda: bare_path(cfg),
                "b": lambda: cifarexp_path(
                    f"(b) cifarexp standard, {args.workers} workers", cfg, tracker
                ),
                "c": lambda: cifarexp_path(
                    f"(c) cifarexp fast: {described(fast)}", cfg.replace(**fast), tracker
                ),
                "d": lambda: floor_path(cfg.replace(**fast)),
                "e": lambda: cifarexp_path(
                    f"(e) cifarexp fast: {described(compiled)}", cfg.replace(**compiled), tracker
                ),
            }
            wanted = [k for k in args.paths if k in builders]
            if device.type != "cuda" and "d" in wanted:
                wanted.remove("d")  # a CUDA graph
            paths = {key: builders[key]() for key in wanted}
            run_rounds(paths, args.rounds, args.epochs)
    report(paths, args, device)


if __name__ == "__main__":
    main()
