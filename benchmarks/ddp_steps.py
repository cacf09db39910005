"""What DDP adds to a training step, unprofiled (issue 8). Run it under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/ddp_steps.py

Each way of running the step trains on one fixed batch already on the GPU (no data loading),
timed as the study times steps (synchronised, one by one). The ways take turns, --rounds
rounds of --steps steps each, so a drift of the machine touches them all alike. Prints, per
way, the median step of the slowest rank in ms and its ratio to the step with no DDP (every
rank training at once); one way trains on rank 0 while the others wait, to show what the
other processes cost it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from cifarexp import distributed
from cifarexp.engine import Execution, _train_step, synchronize
from cifarexp.models import build_model
from cifarexp.optim import build_optimizer

OPTIONS = distributed.DDP_OPTIONS
SOLO = "no DDP, rank 0 alone (the others idle)"
# name -> (DDP options or None for no DDP, comm hook, steps under no_sync)
WAYS: dict[str, tuple[dict | None, Callable | None, bool]] = {
    "no DDP": (None, None, False),
    SOLO: (None, None, False),
    "DDP, PyTorch's defaults": ({}, None, False),
    "DDP, cifarexp's options": (OPTIONS, None, False),
    "DDP under no_sync (no all-reduce)": (OPTIONS, None, True),
    "DDP + static_graph": ({**OPTIONS, "static_graph": True}, None, False),
    "DDP + one 100 MB bucket": ({**OPTIONS, "bucket_cap_mb": 100}, None, False),
    "DDP + bf16 gradients": (OPTIONS, default_hooks.bf16_compress_hook, False),
}


class Way:
    """One way of running the step: its own model and optimizer, the same start."""

    def __init__(self, name: str, device: torch.device, batch_size: int) -> None:
        options, hook, self.no_sync = WAYS[name]
        self.idle = name == SOLO and dist.get_rank() != 0
        torch.manual_seed(0)
        model = build_model("resnet18").to(device)
        self.optimizer = build_optimizer("sgd", model.parameters())
        if options is not None:
            model = distributed.wrap(model, device, options)
            if hook is not None:
                model.register_comm_hook(None, hook)
        self.model, self.device = model, device
        self.images = torch.randn(batch_size, 3, 32, 32, device=device)
        self.labels = torch.randint(0, 10, (batch_size,), device=device)
        self.criterion, self.steps_ms = nn.CrossEntropyLoss(), []

    def run(self, steps: int, *, record: bool = True) -> None:
        dist.barrier()
        if self.idle:
            return
        for _ in range(steps):
            start = time.perf_counter()
            with self.model.no_sync() if self.no_sync else contextlib.nullcontext():
                _train_step(
                    self.model, self.criterion, self.optimizer, self.images, self.labels,
                    Execution(),
                )  # fmt: skip
            synchronize(self.device)
            if record:
                self.steps_ms.append((time.perf_counter() - start) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    world, device = distributed.join("auto")
    torch.backends.cudnn.benchmark = True
    ways = {name: Way(name, device, args.batch_size) for name in WAYS}
    for way in ways.values():
        way.run(10, record=False)  # cuDNN choices, DDP's bucket rebuild
    for _ in range(args.rounds):
        for way in ways.values():
            way.run(args.steps)
    medians = torch.tensor(
        [statistics.median(way.steps_ms or [0.0]) for way in ways.values()], device=device
    )
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    if world.is_main:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPUs"
        print(
            f"{world.world_size} processes on {name}, batch "
            f"{args.batch_size}, {args.rounds} x {args.steps} steps per way, the slowest rank"
        )
        alone = medians[0].item()
        for name, ms in zip(ways, medians.tolist(), strict=True):
            print(f"{name:40} {ms:7.2f} ms/step  {ms / alone:5.2f}x")
    distributed.leave()


if __name__ == "__main__":
    main()
