"""What disturbs a run's timing: the CPU other processes used while its epochs ran, and how
much its epochs' times varied (docs/timing.md: "Disturbed timings").

The CPU times are read where an epoch starts and where it ends, outside its timing (never
inside a step): the busy time of the CPUs this process may run on (psutil: total less idle
and iowait), less the CPU time of this process tree (this process, its DataLoader workers,
and those already ended; under torchrun the whole job's, its launcher's tree), is what
other processes used. Over the epoch's wall clock, that is how many CPUs they kept busy.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from cifarexp.config import EPOCH_SPREAD_TOLERANCE, OTHER_CPU_SHARE

if TYPE_CHECKING:
    from cifarexp.training.engine import EpochResult


@dataclass(frozen=True)
class CpuTimes:
    """One reading: the wall clock, the CPUs' busy seconds, this process tree's CPU seconds."""

    wall_s: float
    busy_s: float
    own_s: float


Reader = Callable[[], CpuTimes]


def usable_cpus() -> list[int] | None:
    """The CPUs this process may run on (its affinity), where the system says."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def busy_seconds(cpus: Sequence[int] | None) -> float:
    """The busy seconds of `cpus` (all of the machine's if None) since boot: total less idle
    and iowait (a guest's time is in user already; a hypervisor's steal is counted busy)."""
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = [per_cpu[i] for i in cpus if i < len(per_cpu)] if cpus else per_cpu
    busy = 0.0
    for t in chosen:
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        busy += total - t.idle - getattr(t, "iowait", 0.0)
    return busy


def tree_seconds(root: psutil.Process) -> float:
    """The CPU seconds of `root` and of every process under it, living or ended (a process
    counts its ended children once it has waited for them)."""
    total = 0.0
    for process in [root, *_descendants(root)]:
        try:
            t = process.cpu_times()
        except psutil.Error:  # ended in between: its parent counts it once it has waited
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _descendants(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.Error:
        return []


def cpu_reader(*, whole_job: bool = False) -> Reader:
    """Reads the CPUs this process may run on and this process tree (with `whole_job`, under
    torchrun: its launcher's, every rank's)."""
    cpus = usable_cpus()
    root = psutil.Process()
    if whole_job:
        root = root.parent() or root

    def read() -> CpuTimes:
        return CpuTimes(time.perf_counter(), busy_seconds(cpus), tree_seconds(root))

    return read


class OtherLoad:
    """How many CPUs other processes kept busy, epoch by epoch: `start()` where an epoch
    starts, `since(start)` where it ends."""

    def __init__(self, read: Reader) -> None:
        self._read = read
        read()  # fails here, once, where the system cannot say

    def start(self) -> CpuTimes:
        return self._read()

    def since(self, start: CpuTimes) -> float | None:
        """The CPUs other processes used on average since `start` (None: no time passed)."""
        now = self._read()
        wall = now.wall_s - start.wall_s
        if wall <= 0:
            return None
        other = (now.busy_s - start.busy_s) - (now.own_s - start.own_s)
        return max(0.0, other / wall)


def find_other_load(*, whole_job: bool = False) -> OtherLoad | None:
    """The meter of other processes' CPU use, or None where the system cannot say."""
    try:
        return OtherLoad(cpu_reader(whole_job=whole_job))
    except (psutil.Error, OSError, AttributeError):
        return None


def disturbance(results: Sequence[EpochResult], cpus: int) -> str | None:
    """Why these epochs' timings cannot be trusted, in words, or None: other processes kept
    more than OTHER_CPU_SHARE of the `cpus` busy on average (weighted by each epoch's
    time), or the epoch times vary by more than EPOCH_SPREAD_TOLERANCE ((max - min) /
    median, over 2 epochs or more)."""
    reasons = []
    loads = [(r.other_cpu_load_cpus, r.epoch_time_s) for r in results]
    loads = [(load, seconds) for load, seconds in loads if load is not None]
    seconds = sum(s for _, s in loads)
    if loads and seconds > 0:
        average = sum(load * s for load, s in loads) / seconds
        if average > OTHER_CPU_SHARE * cpus:
            reasons.append(f"other processes used {average:.1f} of {cpus} CPUs")
    times = [r.epoch_time_s for r in results]
    if len(times) >= 2:
        spread = epoch_spread(times)
        if spread > EPOCH_SPREAD_TOLERANCE:
            reasons.append(
                f"its epoch times varied by {spread:.0%} ({min(times):.2f}–{max(times):.2f} s)"
            )
    return "; ".join(reasons) or None


def epoch_spread(times: Sequence[float]) -> float:
    """(max - min) / median of epoch times: 0 for one epoch."""
    middle = statistics.median(times)
    return (max(times) - min(times)) / middle if middle > 0 else 0.0
