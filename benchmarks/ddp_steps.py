"""What DDP adds to a training step, unprofiled. Run it under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/ddp_steps.py

Each way of running the step trains on one fixed batch already on the GPU (no data loading),
timed as the study times steps (synchronised, one by one). The ways take turns, --rounds
rounds of --steps steps each, so a drift of the machine touches them all alike. Prints, per
way, the median step of the slowest rank in ms and its ratio to the step with no DDP (every
rank training at once); one way trains on rank 0 while the others wait, to show what the
other processes cost it. Then, per way, how steps spread: p90, and the mean over steps of
the slowest rank's step (what every step would cost if all ranks waited for the slowest, as
an all-reduce makes them), and each phase's median on the host's clock and on the GPU's
stream.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from cifarexp.training import distributed
from cifarexp.training.distributed import world_from_environment
from cifarexp.training.engine import Execution, synchronize, train_step
from cifarexp.training.models import build_model
from cifarexp.training.optim import build_optimizer

OPTIONS = distributed.DDP_OPTIONS
STUDY = Execution()  # the study's step: fp32, eager
# Per phase of a step: the host's time, then the GPU stream's (between events recorded at the
# same points: kernels and any idle wait for the host or for another stream, e.g. NCCL's).
PHASES = ("forward", "backward", "optimizer", "wait", "GPU fwd", "GPU bwd", "GPU opt")
HOST_PHASES = 4  # the first four: together, the step's wall time
# key -> (name, DDP options or None for no DDP, comm hook, steps under no_sync)
WAYS: dict[str, tuple[str, dict | None, Callable | None, bool]] = {
    "nodp": ("no DDP", None, None, False),
    "solo": ("no DDP, rank 0 alone (the others idle)", None, None, False),
    "defaults": ("DDP, PyTorch's defaults", {}, None, False),
    "options": ("DDP, cifarexp's options", OPTIONS, None, False),
    "nosync": ("DDP under no_sync (no all-reduce)", OPTIONS, None, True),
    "static": ("DDP + static_graph", {**OPTIONS, "static_graph": True}, None, False),
    "bucket": ("DDP + one 100 MB bucket", {**OPTIONS, "bucket_cap_mb": 100}, None, False),
    "bf16": ("DDP + bf16 gradients", OPTIONS, default_hooks.bf16_compress_hook, False),
    "priority": ("DDP + high-priority NCCL stream", OPTIONS, None, False),
}


class Way:
    """One way of running the step: its own model and optimizer, the same start."""

    def __init__(
        self, key: str, world: distributed.World, device: torch.device, batch_size: int
    ) -> None:
        self.name, options, hook, self.no_sync = WAYS[key]
        self.idle = key == "solo" and dist.get_rank() != 0
        torch.manual_seed(0)
        model = build_model("resnet18").to(device)
        self.optimizer = build_optimizer("sgd", model.parameters())
        if key == "priority":  # NCCL's kernels get the SMs first when they are launched
            group_options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
            group = dist.new_group(backend="nccl", pg_options=group_options)
            options = {**options, "process_group": group}
        if options is not None:
            model = distributed.wrap(model, device, world, options)
            if hook is not None:
                model.register_comm_hook(None, hook)
        self.model, self.device = model, device
        # The phases of the study's step (engine.train_step) end where these hooks fire:
        # forward (with zero_grad) at the model's output, backward at the optimizer's step.
        self.marks: Marks | None = None
        model.register_forward_hook(self.mark)
        self.optimizer.register_step_pre_hook(self.mark)
        self.optimizer.register_step_post_hook(self.mark)
        self.images = torch.randn(batch_size, 3, 32, 32, device=device)
        self.labels = torch.randint(0, 10, (batch_size,), device=device)
        self.criterion = nn.CrossEntropyLoss()
        self.phases_ms: list[list[float]] = []  # per step, per PHASES

    def run(self, steps: int, *, record: bool = True) -> None:
        dist.barrier()
        if self.idle:
            return
        for _ in range(steps):
            self.marks = Marks(cuda=self.device.type == "cuda")
            with self.model.no_sync() if self.no_sync else contextlib.nullcontext():
                train_step(
                    self.model, self.criterion, self.optimizer, self.images, self.labels, STUDY
                )
            synchronize(self.device)
            if record:
                self.phases_ms.append(self.marks.phases_ms())
            self.marks = None

    def mark(self, *hook_args: object) -> None:
        if self.marks is not None:
            self.marks()


class Marks:
    """Points in one step: the host's clock and, on CUDA, an event on the GPU's stream. The
    first is taken on creation; the last host time when the phases are asked for."""

    def __init__(self, *, cuda: bool) -> None:
        self.cuda, self.host, self.events = cuda, [], []
        self()

    def __call__(self) -> None:
        self.host.append(time.perf_counter())
        if self.cuda:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[-1].record()

    def phases_ms(self) -> list[float]:
        """The host's time per phase (the last one up to now), then the GPU's per phase (0
        off CUDA); the GPU must be synchronised."""
        host = [*self.host, time.perf_counter()]
        gpu = [a.elapsed_time(b) for a, b in itertools.pairwise(self.events)]
        return [(b - a) * 1000 for a, b in itertools.pairwise(host)] + (gpu or [0.0] * 3)


def pin_cores() -> list[int]:
    """Bind this process (and the threads and workers it starts) to its own share of the
    CPUs, disjoint from the other local ranks'; the CPUs it got."""
    cpus = sorted(os.sched_getaffinity(0))
    ranks, rank = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    share = len(cpus) // ranks
    mine = cpus[rank * share : (rank + 1) * share]
    os.sched_setaffinity(0, mine)
    return mine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ways", help="of: " + ", ".join(WAYS) + " (default: all)")
    parser.add_argument("--pin-cores", action="store_true", help="each rank on its own CPUs")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    keys = args.ways.split(",") if args.ways else [k for k in WAYS if cuda or k != "priority"]
    if keys[0] != "nodp" or set(keys) - set(WAYS):
        parser.error(f"--ways: nodp (the reference) first, then any of {', '.join(WAYS)}")
    if "priority" in keys and not cuda:
        parser.error("--ways: priority needs CUDA (an NCCL stream)")
    cpus = pin_cores() if args.pin_cores else None
    world = world_from_environment("auto")
    device = distributed.join(world, "auto")
    torch.backends.cudnn.benchmark = True
    ways = {key: Way(key, world, device, args.batch_size) for key in keys}
    for way in ways.values():
        way.run(10, record=False)  # cuDNN choices, DDP's bucket rebuild
    for _ in range(args.rounds):
        for way in ways.values():
            way.run(args.steps)
    gathered: list[list] = [[] for _ in range(world.world_size)]
    dist.all_gather_object(gathered, [way.phases_ms for way in ways.values()])
    if world.writes:
        report(ways, gathered, world, device, args, cpus)
    distributed.leave()


def report(
    ways: dict[str, Way],
    gathered: list[list],
    world: distributed.World,
    device: torch.device,
    args: argparse.Namespace,
    cpus: list[int] | None,
) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPUs"
    pinned = f", each rank on {len(cpus)} CPUs of its own" if cpus else ""
    print(
        f"{world.world_size} processes on {name}, batch {args.batch_size}, "
        f"{args.rounds} x {args.steps} steps per way, the slowest rank{pinned}"
    )
    print(
        f"{'way':40} {'median':>7}  ratio  {'p90':>6} {'slowest':>7}  medians: "
        + " ".join(f"{p:>9}" for p in PHASES)
    )
    reference = None
    for index, way in enumerate(ways.values()):
        ranks = [gathered[r][index] for r in range(world.world_size)]
        ranks = [phases for phases in ranks if phases]  # the idle ranks have none
        steps = [[sum(p[:HOST_PHASES]) for p in phases] for phases in ranks]  # host wall time
        median = max(statistics.median(rank) for rank in steps)
        p90 = max(statistics.quantiles(rank, n=10)[-1] for rank in steps)
        by_step = zip(*steps, strict=True)
        slowest = statistics.mean(max(step) for step in by_step)
        phases = [
            max(statistics.median(p[i] for p in phases) for phases in ranks)
            for i in range(len(PHASES))
        ]
        reference = reference or median
        print(
            f"{way.name:40} {median:7.2f} {median / reference:5.2f}x {p90:6.2f} {slowest:7.2f}"
            "           " + " ".join(f"{p:9.2f}" for p in phases)
        )


if __name__ == "__main__":
    main()
