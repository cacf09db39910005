"""Where a data-parallel training step's time goes on each GPU. Run it under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 4 benchmarks/ddp_probe.py

For each way of running the step (DDP with PyTorch's defaults; DDP as cifarexp runs it,
see distributed.DDP_OPTIONS; each rank alone, no DDP) it trains
--warmup steps, then profiles --steps steps timed as the study times them (synchronised per
step) and prints, per rank and in ms per step: the wall time, the wait for the batch, the
time the GPU ran any kernel, compute kernels only, NCCL kernels that no compute kernel
overlapped (exposed communication) and the GPU's idle time (wall - busy: the host's share);
first, how long one all-reduce of the model's gradients takes on its own.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

from cifarexp.config import TrainConfig
from cifarexp.training import distributed
from cifarexp.training.build import train_loader
from cifarexp.training.data import load_split
from cifarexp.training.distributed import world_from_environment
from cifarexp.training.engine import Execution, synchronize, train_step
from cifarexp.training.models import build_model
from cifarexp.training.optim import build_optimizer

WAYS = {
    "ddp, PyTorch's defaults": {},
    "ddp, cifarexp's options": distributed.DDP_OPTIONS,
    "alone (no DDP)": None,
}


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals given in microseconds, in ms."""
    total, end = 0.0, -1.0
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000


def probe(
    way: str,
    cfg: TrainConfig,
    world: distributed.World,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
) -> dict[str, object]:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    options = WAYS[way]
    if options is not None:
        model = distributed.wrap(model, device, world, options)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())  # the study's defaults
    loader = train_loader(cfg, world, load_split(cfg, train=True), device)  # this rank's shard
    criterion, execution = nn.CrossEntropyLoss(), Execution()
    batches = iter(loader)
    wait = wall = 0.0

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        images, labels = next(batches)
        waited = time.perf_counter() - start
        images, labels = images.to(device), labels.to(device)
        train_step(model, criterion, optimizer, images, labels, execution)
        synchronize(device)
        return waited, time.perf_counter() - start

    for _ in range(warmup):
        step()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            waited, took = step()
            wait, wall = wait + waited, wall + took
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    compute = [
        (e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()
    ]
    busy, computing = union_ms(spans), union_ms(compute)
    ms = 1000 / steps
    return {
        "way": way,
        "rank": world.rank,
        "step": wall * ms,
        "data wait": wait * ms,
        "GPU busy": busy / steps,
        "compute": computing / steps,
        "exposed NCCL": (busy - computing) / steps,
        "GPU idle": wall * ms - busy / steps,
    }


def allreduce_ms(numel: int, device: torch.device, repeats: int = 20) -> float:
    """Milliseconds one all-reduce of `numel` fp32 values takes (all ranks started together)."""
    values = torch.ones(numel, device=device)
    for _ in range(3):
        dist.all_reduce(values)
    dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(values)
    synchronize(device)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--train-size", type=int, default=50_000)
    args = parser.parse_args()
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=args.train_size,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    world = world_from_environment("auto")
    device = distributed.join(world, "auto")
    torch.backends.cudnn.benchmark = True
    grads = sum(p.numel() for p in build_model(cfg.model).parameters())
    took = allreduce_ms(grads, device)
    rows: list[dict[str, object]] = [
        probe(way, cfg, world, device, steps=args.steps, warmup=args.warmup) for way in WAYS
    ]
    gathered: list[list[dict]] = [[] for _ in range(world.world_size)]
    dist.all_gather_object(gathered, rows)
    if world.writes:
        print(f"{world.world_size} processes, batch {args.batch_size}, {args.workers} workers each")
        print(
            f"all-reduce of the {grads * 4 / 2**20:.1f} MiB of fp32 gradients alone: {took:.2f} ms"
        )
        names = list(rows[0])
        print(" | ".join(names))
        for row in sorted((r for ranks in gathered for r in ranks), key=lambda r: r["way"]):
            print(" | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    distributed.leave()


if __name__ == "__main__":
    main()
