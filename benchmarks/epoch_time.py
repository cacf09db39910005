"""How fast can an epoch be? The bare loop, cifarexp's standard path, its fast path and the
card's floor, alternated in rounds in one process (docs/results.md: "How fast is an epoch?").

One card, synthetic CIFAR-shaped images (the same for every path), batch 128:

  (a) a bare, lab-style loop: the DataLoader with the study's PIL transforms, a plain
      training loop; no cifarexp engine, no tracking
  (b) cifarexp's standard path: `engine.train` with the same workers, each epoch logged to a
      temporary sqlite store as `cifarexp time` logs it
  (c) cifarexp's fast path, `--fast`: --loader gpu --precision bf16 --channels-last
      --compile default --cuda-graph --timing events (the compiled model's step captured
      whole as one CUDA graph), trained and logged as (b)
  (d) the eager floor: what one step of the model and optimizer costs on one fixed batch
      already on the device, (g)'s captured step replayed: `len(loader)` replays, timed
      as one epoch
  (f) the compiled floor: (d) with (c)'s step, the compiled model's, captured whole
  (g) the fast path with the eager step captured: (c) with --compile none
  (e) optional: the fast path with --compile reduce-overhead instead of --cuda-graph

Every path is built through `build.build_training` and warmed up once (untimed); then each
round runs --epochs epochs of every path in turn, and a path's time in a round is the
median of its epochs there. Printed: each path's median and range over the rounds (the wall
clock of each epoch's call, logging included) and its median logged epoch (C2's), its
warm-up, its training accuracy after its first (untimed) epoch and at the end, and each
ratio's per-round values, median and range. A target is met when the median meets it:
(b)/(a) <= 1.02, (c)/(f) and (g)/(d) <= 1.10, (c)/(g) <= 1 (else --fast should not take
--compile default), (c)/(b) <= 1/3, (c)'s logged epoch <= 0.95 s; and (c)'s and (g)'s
accuracy after one epoch within 2 points of (b)'s (after many epochs every path reaches the
synthetic set's ceiling, which tells nothing).

    python benchmarks/epoch_time.py --workers 8                 # on the GPU machine
    python benchmarks/epoch_time.py --device cpu --train-size 256 --rounds 1 --workers 0

On CPU, (c) is `--fast` on CPU (--loader gpu) and (d), (f), (g) are skipped (CUDA only): a
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

from cifarexp.config import TrainConfig, fast_settings
from cifarexp.tracking import Tracker
from cifarexp.training.build import Training, build_training
from cifarexp.training.engine import EpochResult, synchronize

Epoch = Callable[[], tuple[float, float | None]]  # one epoch: (seconds, train accuracy)


@dataclass
class Path:
    name: str
    epoch: Epoch
    warmup_s: float | None = None
    rounds: list[float] = field(default_factory=list)  # per round: the median epoch
    first_acc: float | None = None  # after the first (untimed) epoch
    train_acc: float | None = None  # after the last epoch
    logged: list[float] = field(default_factory=list)  # cifarexp's: each epoch's epoch_time_s
    logging: list[float] = field(default_factory=list)  # cifarexp's: each epoch's log_epoch s


# ----------------------------------------------------------------- the paths


def bare_path(cfg: TrainConfig) -> Path:
    """(a): the model, optimizer and DataLoader cifarexp builds, trained by a lab's loop."""
    training = build_training(cfg)
    return Path(f"(a) bare loop, {cfg.workers} workers", lambda: bare_epoch(training))


def cifarexp_path(name: str, cfg: TrainConfig, tracker: Tracker) -> Path:
    """(b), (c), (e), (g): cifarexp's engine with its warm-up, each epoch logged to the store."""
    training = build_training(cfg)
    path = Path(name, lambda: (0.0, None), training.warm_up())

    def log_epoch(result: EpochResult) -> None:
        start = time.perf_counter()
        tracker.log_epoch(result)
        path.logging.append(time.perf_counter() - start)

    def epoch() -> tuple[float, float]:
        start = time.perf_counter()
        (result,) = training.train(log_epoch, epochs=1)
        seconds = time.perf_counter() - start
        path.logged.append(result.epoch_time_s)
        return seconds, result.train_acc

    path.epoch = epoch
    return path


def floor_path(name: str, cfg: TrainConfig) -> Path:
    """(d), (f): the captured step replayed on one batch that never changes; no loader, no
    timing of its own, one wait at the end."""
    training = build_training(cfg)
    warmup_s = training.warm_up()
    replay = fixed_batch_epoch(training)

    def epoch() -> tuple[float, None]:
        start = time.perf_counter()
        replay()
        synchronize(training.device)
        return time.perf_counter() - start, None

    return Path(name, epoch, warmup_s)


def fixed_batch_epoch(training: Training) -> Callable[[], None]:
    """An epoch's worth of steps (`len(loader)`) of a warmed-up training, each on the
    loader's first batch, already on the device; queued, not waited for."""
    images, labels = next(iter(training.loader))
    criterion, steps = nn.CrossEntropyLoss(), len(training.loader)
    model, optimizer, execution = training.train_model, training.optimizer, training.execution

    def epoch() -> None:
        for _ in range(steps):
            training.step(model, criterion, optimizer, images, labels, execution)

    return epoch


def described(settings: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("loader", "precision"))


# ----------------------------------------------------------------- rounds and report


def run_rounds(paths: dict[str, Path], rounds: int, epochs: int) -> None:
    """One untimed epoch of every path, then `rounds` rounds of `epochs` epochs each, in turn."""
    for path in paths.values():
        path.first_acc = path.epoch()[1]
        path.logged.clear()  # the untimed epoch's
        path.logging.clear()
    for r in range(1, rounds + 1):
        for key, path in paths.items():
            runs = [path.epoch() for _ in range(epochs)]
            path.rounds.append(statistics.median(seconds for seconds, _ in runs))
            path.train_acc = runs[-1][1]
            print(f"round {r}: ({key}) {path.rounds[-1]:.3f} s", flush=True)


def seconds(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report(paths: dict[str, Path], args: argparse.Namespace, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\nResNet-18, {args.train_size:,} synthetic images, batch {args.batch_size}, "
        f"{name}, torch {torch.__version__}; {args.rounds} rounds of {args.epochs} epochs, "
        "a round's time = the median of its epochs\n"
    )
    width = max(len(p.name) for p in paths.values())
    header = (
        f"{'path':<{width}}  {'epoch s':>8}  {'range':>13}  {'logged s':>8}  {'log ms':>6}  "
        f"{'warm-up s':>9}  {'acc ep. 1':>9}  {'acc last':>9}"
    )
    print(header)
    for p in paths.values():
        spread = f"{min(p.rounds):.3f}-{max(p.rounds):.3f}"
        median = statistics.median(p.rounds)
        logged = statistics.median(p.logged) if p.logged else None
        log_ms = 1000 * statistics.median(p.logging) if p.logging else None
        print(
            f"{p.name:<{width}}  {median:>8.3f}  {spread:>13}  {seconds(logged, 3):>8}  "
            f"{seconds(log_ms, 1):>6}  {seconds(p.warmup_s):>9}  {percent(p.first_acc):>9}  "
            f"{percent(p.train_acc):>9}"
        )
    print(
        "(epoch s: the wall clock of a whole epoch's call, logging included; logged s: the "
        "median epoch_time_s that cifarexp logged for the same epochs, C2's epoch; log ms: "
        "the median time its log_epoch took, the store's write and check)\n"
    )
    targets = (("b", "a", 1.02), ("c", "f", 1.10), ("g", "d", 1.10), ("c", "g", 1.0))
    targets += (("c", "b", 0.333),)
    for top, bottom, target in targets:
        if top in paths and bottom in paths:
            ratios = [t / b for t, b in zip(paths[top].rounds, paths[bottom].rounds, strict=True)]
            print(f"  per round: {', '.join(f'{x:.3f}' for x in ratios)}")
            print(ratios_line(f"({top})/({bottom})", ratios, target))
    c = paths.get("c")
    if c:
        wall, logged = statistics.median(c.rounds), statistics.median(c.logged)
        met = "met" if logged <= 0.95 else "NOT met"
        print(f"(c): {logged:.3f} s an epoch logged (target <= 0.95 s: {met}), {wall:.3f} s wall")
    b = paths.get("b")
    for key in "cg":
        path = paths.get(key)
        if b and path and b.first_acc is not None and path.first_acc is not None:
            gap = 100 * (path.first_acc - b.first_acc)
            verdict = "met" if abs(gap) <= 2 else "NOT met"
            print(f"({key}) - (b) train accuracy after epoch 1: {gap:+.1f} points (target: "
                  f"within 2: {verdict})")  # fmt: skip


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of (a), (b)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each path per round")
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", default="abcdfg", help="which of a-g to run")
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
    fast = fast_settings(device.type, cfg.optimizer)  # what --fast trains with
    eager = fast | ({"compile": "none"} if device.type == "cuda" else {})
    overhead = fast | (
        {"compile": "reduce-overhead", "cuda_graph": False} if device.type == "cuda" else {}
    )
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
                    f"(c) cifarexp --fast: {described(fast)}", cfg.replace(**fast), tracker
                ),
                "d": lambda: floor_path(
                    "(d) eager floor: one batch, (g)'s step as one graph", cfg.replace(**eager)
                ),
                "f": lambda: floor_path(
                    "(f) compiled floor: one batch, (c)'s step as one graph", cfg.replace(**fast)
                ),
                "e": lambda: cifarexp_path(
                    f"(e) cifarexp fast: {described(overhead)}", cfg.replace(**overhead), tracker
                ),
                "g": lambda: cifarexp_path(
                    f"(g) cifarexp fast: {described(eager)}", cfg.replace(**eager), tracker
                ),
            }
            wanted = [k for k in args.paths if k in builders]
            if device.type != "cuda":  # a CUDA graph each; (g) is (c) there
                wanted = [k for k in wanted if k not in ("d", "f", "g")]
            paths = {key: builders[key]() for key in wanted}
            run_rounds(paths, args.rounds, args.epochs)
    report(paths, args, device)


if __name__ == "__main__":
    main()
