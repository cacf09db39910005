"""Where the fast path's epoch goes beyond its floor: the parts of an epoch added one at a
time to the floor, on one `--fast` training (compiled in its warm-up), alternated in rounds
(docs/results.md: "Where the fast path's last percent goes").

  floor     the captured step replayed on one fixed batch, `len(loader)` times (epoch_time's f)
  augment   the GPU loader alone: each batch shuffled, cropped, flipped and normalised
  +step     each augmented batch trained by the captured step
  -last     the same without the epoch's smaller last batch
  +stats    with each step's [loss, images right] kept on the device (`Execution.batch_stats`)
  engine    `engine.train`, events timing (wall, and the epoch_time_s it reports)
  augment*, +step*, engine*: the same with the augmentation eager (--fast compiles it on CUDA)

Each part ends with one wait for the device; its time is the wall clock from its start.
Every part runs as the engine runs an epoch: only what the warm-up compiled is compiled.
Printed: each part's median over the rounds, its difference from the part it adds to or
varies, and with --profile one profiled engine epoch: the device's busy time and its
costliest kernels.

    python benchmarks/epoch_parts.py --rounds 5 --profile          # on the GPU machine
    python benchmarks/epoch_parts.py --device cpu --train-size 256 --rounds 1
      (CPU: --fast's CPU settings, nothing compiled or captured: a smoke test, not a result)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from epoch_time import fixed_batch_epoch  # (d), (f)'s floor: the step on one fixed batch
from torch import nn

from cifarexp.config import TrainConfig, fast_settings
from cifarexp.training import gpu_loader
from cifarexp.training.build import Training, build_training
from cifarexp.training.engine import compiled_shapes_only, synchronize

Part = Callable[[], float | None]  # one epoch of a part; the epoch_time_s it logged, if any


def parts(training: Training, eager_augment: Callable) -> dict[str, tuple[Part, str | None]]:
    model, optimizer = training.train_model, training.optimizer
    execution, criterion = training.execution, nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return training.step(model, criterion, optimizer, images, labels, execution)

    def augment() -> None:
        for _ in training.loader:
            pass

    def trained(limit: int | None = None, stats: bool = False) -> None:
        kept = []
        for index, (images, labels) in enumerate(training.loader):
            if limit is not None and index >= limit:
                break
            loss, logits = step(images, labels)
            if stats:
                kept.append(execution.batch_stats(loss, logits, labels))
        if kept:
            torch.stack(kept).tolist()

    def engine() -> float:
        (result,) = training.train(lambda result: None, epochs=1)
        return result.epoch_time_s

    def eager(part: Part) -> Part:
        def run() -> float | None:
            with swapped_augment(training.loader, eager_augment):
                return part()

        return run

    return {  # name: (one epoch of it, the part it is compared with)
        "floor": (fixed_batch_epoch(training), None),
        "augment": (augment, None),
        "+step": (trained, "floor"),
        "-last": (lambda: trained(limit=len(training.loader) - 1), "+step"),
        "+stats": (lambda: trained(stats=True), "+step"),
        "engine": (engine, "+stats"),
        "augment*": (eager(augment), "augment"),
        "+step*": (eager(trained), "+step"),
        "engine*": (eager(engine), "engine"),
    }


@contextlib.contextmanager
def swapped_augment(loader: gpu_loader.GpuLoader, augment: Callable) -> Iterator[None]:
    """The GPU loader's augmentation replaced by `augment` inside."""
    own = loader.augment
    loader.augment = augment
    try:
        yield
    finally:
        loader.augment = own


def profiled_epoch(part: Part, device: torch.device, top: int) -> None:
    """One epoch of `part` under the profiler: the device's busy time, its costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        part()
        synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, start, end = 0.0, None, None
    for s, e in spans:  # the union of the kernels' intervals
        if end is None or s > end:
            busy += 0.0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += 0.0 if end is None else end - start
    span = spans[-1][1] - spans[0][0] if spans else 0.0
    print(f"\nprofiled engine epoch: the device busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms")
    totals: dict[str, list[float]] = {}
    for e in kernels:
        total = totals.setdefault(e.name[:80], [0, 0.0])
        total[0] += 1
        total[1] += e.time_range.end - e.time_range.start
    for name, (calls, us) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us / 1e3:9.2f} ms {calls:7d}x  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true", help="profile one engine epoch")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = TrainConfig(dataset="synthetic", train_size=args.train_size, device=args.device, seed=0)
    training = build_training(cfg.replace(**fast_settings(device.type, cfg.optimizer)))
    warmup_s = training.warm_up()  # compiles the loader's augmentation on CUDA
    epochs = parts(training, gpu_loader.crop_flip_normalize)
    walls: dict[str, list[float]] = {name: [] for name in epochs}
    logged: dict[str, list[float]] = {}
    for r in range(1, args.rounds + 1):
        for name, (part, _) in epochs.items():
            synchronize(device)
            start = time.perf_counter()
            with compiled_shapes_only(training.execution):
                reported = part()
            synchronize(device)
            walls[name].append(time.perf_counter() - start)
            if reported is not None:
                logged.setdefault(name, []).append(reported)
        print(f"round {r}: " + ", ".join(f"{n} {w[-1]:.3f}" for n, w in walls.items()), flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    warmup = "–" if warmup_s is None else f"{warmup_s:.1f} s"
    print(
        f"\n{name}, torch {torch.__version__}, {args.train_size:,} synthetic images, batch "
        f"{cfg.batch_size}, --fast (warm-up {warmup}); median of {args.rounds} rounds\n"
    )
    print(f"{'part':<9}  {'epoch s':>8}  {'logged s':>8}  {'ms more than':>18}")
    medians = {name: statistics.median(times) for name, times in walls.items()}
    for name, (_, base) in epochs.items():
        reported = f"{statistics.median(logged[name]):.4f}" if name in logged else "–"
        added = "" if base is None else f"{1000 * (medians[name] - medians[base]):+.1f} {base}"
        print(f"{name:<9}  {medians[name]:>8.4f}  {reported:>8}  {added:>18}")
    if args.profile and device.type == "cuda":
        profiled_epoch(epochs["engine"][0], device, top=25)


if __name__ == "__main__":
    main()
