"""`--profile`: after the timed epochs, never inside them, a short window of the same run's
training steps under torch.profiler, and what it says about them, for the run to log.

The window trains WARMUP_STEPS then ACTIVE_STEPS more batches through `engine.train_one_epoch`
(the run's loader, model, optimizer and execution settings: the study's path or the fast
path, timed as its epochs are); the active ones are recorded. From them come the trace
(gzipped Chrome JSON: Perfetto, chrome://tracing), the top operators and kernels, the
step's split into what the time went to (`profile_<part>_share`), where the device's kernel
time went by class of kernel, and a verdict naming what bounds the run, with the next thing
to try. The verdict weighs two sources: the run's timed epochs say whether it waits for data
(their data-loading share, the study's own measure: a window of a few steps after them may
find the loader's batches prefetched), the window says what happens inside the step.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.profiler import ProfilerActivity, record_function

from cifarexp.config import (
    GRAPHED_OPTIMIZERS,
    TrainConfig,
    fast_settings,
    flag,
    flags,
    plural,
)
from cifarexp.training.build import Training
from cifarexp.training.energy import joules_text
from cifarexp.training.engine import Batch, EpochResult, compiled_shapes_only, train_one_epoch

WARMUP_STEPS = 2  # run, not recorded: the loader's workers start again, the step settles
ACTIVE_STEPS = 5  # recorded: a few MB of trace on a GPU, a few seconds on a CPU
TOP = 10  # rows per ranking in the summary table
TRACE, SUMMARY = "profile_trace.json.gz", "profile_summary.csv"
DATA_WAIT = "cifarexp: data wait"  # the annotation around each wait for a batch

# The parts of a step, in the order a bar shows them. On a GPU the device's timeline decides:
# compute where a kernel runs (communication beside compute is hidden, so compute), comm
# where only NCCL runs, copy where only a copy or memset does; where the device is idle,
# data_wait if the host waits for a batch, else host (the device waits for the host's
# launches). On a CPU the step is data_wait or compute.
PARTS = ("data_wait", "host", "copy", "comm", "compute")
PART_NAMES = {
    "data_wait": "data wait",
    "host": "host, device idle",
    "copy": "copies",
    "comm": "communication not hidden",
    "compute": "compute",
}
# The epochs waiting this share of their time for data are input-bound; else a part of the
# step at least this large bounds it (the largest such part); below all of them the step is
# compute-bound.
INPUT_BOUND_SHARE = 0.2
HOST_BOUND_SHARE = 0.3
COMM_BOUND_SHARE = 0.2
BOUNDS = {"data_wait": INPUT_BOUND_SHARE, "host": HOST_BOUND_SHARE, "comm": COMM_BOUND_SHARE}
KINDS = {
    "data_wait": "input-bound",
    "host": "host-launch-bound",
    "comm": "communication-bound",
    "compute": "compute-bound",
}
# The device's kernels by class: the class of the first row one of whose patterns is in a
# kernel's name (lower case), else "other". cuDNN names convolution kernels by pass (fprop,
# dgrad, wgrad); "conv" alone comes late, after the casts Triton names "convert_element_type".
KERNEL_CLASSES = (
    ("batch-norm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("layout conversions", ("nchwtonhwc", "nhwctonchw")),
    ("convolutions backward", ("dgrad", "wgrad", "convolution_backward")),
    ("convolutions forward", ("fprop",)),
    ("optimizer", ("multi_tensor_apply", "foreach", "sgd", "adam", "adagrad", "adadelta")),
    ("elementwise", ("elementwise", "triton_poi", "relu", "clamp", "fill")),
    ("convolutions forward", ("conv",)),  # e.g. implicit_convolve_sgemm
)
# What this tool's settings measured on one H200 (docs/results.md), for the verdict's advice.
MEASURED = {
    "fast": "the fast path with it took 0.94 s per epoch on an H200, the standard path 5.36 s",
    "cuda_graph": "the fast path with it took 1.15 s per epoch on an H200, the standard path "
    "5.36 s",
    "compile": "the fast path with it took 1.52 s per epoch on an H200",
    "batch_size": "on an H200 the whole step took 2.06 ms per 128 images at batch 512, 2.95 ms "
    "at 128",
}
# The kineto line torch.profiler warns with once per process; the window has one cycle.
CLEARS_EVENTS = "Warning: Profiler clears events at the end of each cycle"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Epochs:
    """What a run's timed epochs measured, for the verdict: the share of their wall clock
    spent waiting for data (C2.1 over C2.3, summed over the epochs) and, where a counter
    measured it, their mean energy per epoch and power."""

    data_share: float
    energy_j: float | None = None
    power_w: float | None = None

    @classmethod
    def of(cls, results: Sequence[EpochResult]) -> Epochs:
        seconds = sum(r.epoch_time_s for r in results)
        data_share = sum(r.data_time_s for r in results) / seconds
        energies = [r.energy_j for r in results]
        if None in energies:
            return cls(data_share)
        per_epoch = [r.metrics()["energy_j"] for r in results]  # a partial epoch's, estimated
        return cls(data_share, sum(per_epoch) / len(results), sum(energies) / seconds)


@dataclass(frozen=True)
class Profile:
    """What the profile of a run found (see `profile_training`)."""

    split: dict[str, float]  # part -> share of the step, summing to 1
    kernels: dict[str, float]  # kernel class -> share of the kernels' time (GPU only)
    summary: pd.DataFrame  # the top operators and kernels
    verdict: str
    step_ms: float  # the mean recorded step
    profile_s: float  # what the profile cost the run (its logging not included)

    def metrics(self) -> dict[str, float]:
        """The step's split (`profile_<part>_share`) and the profile's cost (`profile_s`)."""
        return {f"profile_{part}_share": share for part, share in self.split.items()} | {
            "profile_s": self.profile_s
        }

    def description(self) -> str:
        """The profile as a paragraph of the run's description (markdown)."""
        return (
            f"**Profile** ({ACTIVE_STEPS} steps after the last epoch, {self.step_ms:.1f} ms "
            f"each): {self.verdict}. Split: {split_text(self.split)}. Trace: `{TRACE}` (opens "
            f"in ui.perfetto.dev); top operators and kernels: `{SUMMARY}`."
        )


def profile_training(
    training: Training,
    folder: Path,
    best: tuple[int, str] | None = None,
    epochs: Epochs | None = None,
) -> Profile | None:
    """Profile a window of `training`'s steps after its epochs: the trace is written into
    `folder` (TRACE); the rest is returned, for the run to log. `best` is the latest C3
    sweep's best worker count on this device type and its run id, `epochs` what the run's
    timed epochs measured, for the verdict.
    Every process of a torchrun job trains the window (its all-reduces need them all); only
    the one that writes analyses it, and gets the Profile (the others None)."""
    start = time.perf_counter()
    device_type = training.device.type
    trace = folder / TRACE
    writes = training.world.writes
    averages = _record(training, trace if writes else None)
    if not writes:
        return None
    with gzip.open(trace, "rt") as file:
        events = json.load(file)["traceEvents"]
    if device_type == "cuda" and not any(e.get("cat") == "kernel" for e in events):
        log.warning("the profile's trace holds no GPU kernel (CUPTI unavailable?): its split "
                    "counts the GPU as idle")  # fmt: skip
    split, window_us = step_split(events, device_type, comm=training.world.world_size > 1)
    summary = top_operators(averages, window_us)
    kernels = kernel_classes(events) if device_type == "cuda" else {}
    text = verdict(
        split, training.cfg, device_type, best, training.world.world_size, epochs, kernels
    )
    step_ms = window_us / ACTIVE_STEPS / 1000
    return Profile(split, kernels, summary, text, step_ms, time.perf_counter() - start)


def _record(training: Training, trace: Path | None) -> torch.autograd.profiler_util.EventList:
    """Train the window under the profiler; the recorded steps' operator averages. The trace
    is exported to `trace` (gzipped, as its name ends) where one is given."""
    activities = [ProfilerActivity.CPU]
    if training.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    else:  # kineto's lines on a CPU run ("gpuGetDeviceCount failed", "profiler_start")
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above all its levels: none is of use
    steps = WARMUP_STEPS + ACTIVE_STEPS
    schedule = torch.profiler.schedule(wait=0, warmup=WARMUP_STEPS, active=ACTIVE_STEPS, repeat=1)
    # No shapes, no stacks: they would make the trace many times larger.
    with (
        _without(CLEARS_EVENTS),
        torch.profiler.profile(
            activities=activities, schedule=schedule, record_shapes=False, with_stack=False
        ) as profiler,
    ):
        with compiled_shapes_only(training.execution):
            train_one_epoch(
                training.train_model,
                _window(training.loader, steps, profiler),
                training.optimizer,
                training.device,
                epoch=0,  # not an epoch of the run: nothing of it is logged as one
                max_batches=steps,
                execution=training.execution,
                step=training.step,
            )
        profiler.step()  # the last step ends: the recording stops
    if trace is not None:
        profiler.export_chrome_trace(str(trace))
    return profiler.key_averages()


@contextlib.contextmanager
def _without(warning: str) -> Iterator[None]:
    """Inside, the UserWarning whose message starts with `warning` is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(warning), category=UserWarning)
        yield


def _window(
    loader: Iterable[Batch], steps: int, profiler: torch.profiler.profile
) -> Iterator[Batch]:
    """`steps` batches of `loader` (started again as often as needed), each wait for one
    annotated as DATA_WAIT; asking for the next batch ends a profiler step."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for index in range(steps):
        if index:
            profiler.step()
        with record_function(DATA_WAIT):
            batch = next(batches)
        yield batch


def step_split(
    events: list[dict], device_type: str, *, comm: bool = False
) -> tuple[dict[str, float], float]:
    """The recorded steps' time split into PARTS (shares summing to 1; on a CPU data_wait
    and compute only; comm with several processes only), from a Chrome trace's events, and
    the window's length in µs: from the first recorded step's start to the end of its last
    step or of the device work it queued, whichever is later."""
    steps = [_span(e) for e in events if e.get("name", "").startswith("ProfilerStep#")]
    waits = [_span(e) for e in events if e.get("name") == DATA_WAIT]
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kernels = [_span(e) for e in device if e["cat"] == "kernel" and "nccl" not in e["name"]]
    nccl = [_span(e) for e in device if e["cat"] == "kernel" and "nccl" in e["name"]]
    copies = [_span(e) for e in device if e["cat"] != "kernel"]
    begin = min(s for s, _ in steps)
    end = max(e for _, e in steps + kernels + nccl + copies)
    spans = np.clip([(begin, end), *waits, *kernels, *nccl, *copies], begin, end)
    edges = np.unique(spans)  # the window cut into segments, each wholly in or out of a span
    lengths = np.diff(edges)

    def covered(intervals: list[tuple[float, float]]) -> np.ndarray:
        """Whether each segment lies in one of `intervals`."""
        depth = np.zeros(len(edges))
        for interval in np.clip(np.reshape(intervals, (-1, 2)), begin, end):
            np.add.at(depth, np.searchsorted(edges, interval), (1, -1))
        return np.cumsum(depth)[:-1] > 0

    waiting = covered(waits)
    if device_type != "cuda":
        parts = {"data_wait": waiting, "compute": ~waiting}
    else:
        computing = covered(kernels)
        communicating = covered(nccl) & ~computing  # beside compute it is hidden
        copying = covered(copies) & ~computing & ~communicating
        idle = ~(computing | communicating | copying)
        if not comm:  # one process: no NCCL kernel to speak of
            computing |= communicating
        parts = {"data_wait": idle & waiting, "host": idle & ~waiting, "copy": copying}
        parts |= {"comm": communicating} if comm else {}
        parts["compute"] = computing
    total = float(lengths.sum())
    return {part: float(lengths[mask].sum()) / total for part, mask in parts.items()}, total


def _span(event: Mapping) -> tuple[float, float]:
    return float(event["ts"]), float(event["ts"]) + float(event.get("dur", 0))


def top_operators(averages: Iterable, window_us: float) -> pd.DataFrame:
    """The TOP operators by host time and the TOP kernels (and copies) by device time of the
    recorded steps: calls in all of them, self time (a caller's leaves out its callees') per
    step and as a share of the step."""
    rows = []
    for kind, attribute in (("device", "self_device_time_total"), ("host", "self_cpu_time_total")):
        found = [
            a
            for a in averages
            if getattr(a, attribute) > 0
            and (a.device_type == torch.autograd.DeviceType.CPU) == (kind == "host")
            and not a.key.startswith("ProfilerStep")
        ]
        for a in sorted(found, key=lambda a: getattr(a, attribute), reverse=True)[:TOP]:
            us = getattr(a, attribute)
            rows.append(
                {
                    "by": kind,
                    "name": a.key,
                    "calls": a.count,
                    "ms per step": us / ACTIVE_STEPS / 1000,
                    "of step %": 100 * us / window_us,
                }
            )
    return pd.DataFrame(rows, columns=["by", "name", "calls", "ms per step", "of step %"])


def kernel_classes(events: Iterable[Mapping]) -> dict[str, float]:
    """The device's kernel time in the trace's `events` by KERNEL_CLASSES (and "other"), as
    shares of it, largest first. Only kernels count: not copies, memsets, NCCL's kernels, nor
    the GPU-side mirrors of annotated ranges (`gpu_user_annotation`), which span kernels."""
    times: dict[str, float] = {}
    for event in events:
        name = event.get("name", "").lower()
        if event.get("cat") != "kernel" or "nccl" in name:
            continue
        kind = next(
            (k for k, patterns in KERNEL_CLASSES if any(p in name for p in patterns)),
            "other",
        )
        times[kind] = times.get(kind, 0.0) + float(event.get("dur", 0.0))
    total = sum(times.values())
    ranked = sorted(times.items(), key=lambda item: item[1], reverse=True)
    return {kind: us / total for kind, us in ranked} if total else {}


def verdict(
    split: Mapping[str, float],
    cfg: TrainConfig,
    device_type: str,
    best: tuple[int, str] | None = None,
    world_size: int = 1,
    epochs: Epochs | None = None,
    kernels: Mapping[str, float] | None = None,
) -> str:
    """What bounds the run, as one sentence naming its sources: the kind (KINDS), the
    numbers behind it, the next thing to try, and the epochs' energy where measured.

    Input-bound is judged from the timed `epochs` (their data-loading share; the window's
    `split` where there are none), the rest from the window's `split`; where the two disagree
    on the wait for data, it says so. A compute-bound GPU step says where its kernel time went
    (`kernels`). The advice comes from the run's settings (and its processes), what the
    study measured (`best`: the latest C3 sweep's best worker count on this device type, and
    its run id) and what this tool's settings measured (MEASURED)."""
    device = "GPU" if device_type == "cuda" else "CPU"
    window_wait = split.get("data_wait", 0.0)
    step = f"in the profiled steps the {device} {_inside(split)}"
    waited = window_wait if epochs is None else epochs.data_share
    if epochs is None:
        sources = [step]
    else:
        loader = (
            "batches made on the device" if cfg.loader == "gpu" else plural(cfg.workers, "worker")
        )
        sources = [f"the epochs waited {waited:.0%} of their time for data ({loader})", step]
        if waited >= INPUT_BOUND_SHARE > window_wait:
            sources[1] += ": its batches were ready, the epochs' were not"
        elif window_wait >= INPUT_BOUND_SHARE > waited:
            sources[1] += ": the window waited, having started its loader again"
    if waited >= INPUT_BOUND_SHARE:
        part, advice = "data_wait", _more_data(cfg, device_type, best)
    else:
        sources.reverse()  # what happens inside the step comes first
        over = {p: split.get(p, 0.0) for p in ("host", "comm")}
        over = {p: share for p, share in over.items() if share >= BOUNDS[p]}
        part = max(over, key=over.__getitem__) if over else "compute"
        if part == "host":
            advice = _fewer_launches(cfg, world_size)
        elif part == "comm":
            advice = (
                f"try more images per GPU ({_try(scaling='weak')}, a larger "
                f"{flag('batch_size')}): more compute to hide the all-reduce behind"
            )
        else:
            if kernels:
                shares = ", ".join(f"{kind} {share:.0%}" for kind, share in kernels.items())
                sources.insert(1, f"its kernel time: {shares}")
            advice = _faster_compute(cfg, device_type, world_size)
    text = f"{KINDS[part]}: {'; '.join(sources)}; {advice}"
    if epochs is not None and epochs.energy_j is not None:
        text += f"; the epochs used {joules_text(epochs.energy_j)} each ({epochs.power_w:.0f} W)"
    return text


def _inside(split: Mapping[str, float]) -> str:
    """What the device did in the profiled steps: "computed 23%, waited 70% for the host's
    launches, 2% for copies, 5% for data" (the parts the split has)."""
    waits = {"host": "the host's launches", "copy": "copies", "comm": "communication"}
    waits["data_wait"] = "data"
    waited = [f"{split[p]:.0%} for {what}" for p, what in waits.items() if p in split]
    return f"computed {split.get('compute', 0.0):.0%}, waited {', '.join(waited)}"


def _more_data(cfg: TrainConfig, device_type: str, best: tuple[int, str] | None) -> str:
    if cfg.loader == "gpu":
        return f"the batches are made on the device already: try a larger {flag('batch_size')}"
    if best is None:
        return f"no C3 sweep on {device_type} in this store yet: run `cifarexp sweep-workers`"
    count, run_id = best
    if count != cfg.workers:
        sweep = f"the C3 sweep on this machine (run {run_id}) found {plural(count, 'worker')} best"
        return f"{sweep}: try {_try(workers=count)}"
    gpu = (
        f", or {_try(loader='gpu')} (the data kept on the device)" if device_type == "cuda" else ""
    )
    best_now = f"{plural(count, 'worker')} is the C3 sweep's best"
    return f"{best_now}: try {_try(persistent_workers=True, pin_memory=True)}{gpu}"


def _graphable(cfg: TrainConfig, world_size: int) -> bool:
    """Whether cuda_graph could run this run (see config.GRAPHED_OPTIMIZERS)."""
    return cfg.optimizer in GRAPHED_OPTIMIZERS and world_size == 1


def _fast(cfg: TrainConfig, world_size: int) -> str | None:
    """`cifarexp time --fast`, where a run on CUDA lacks more than one of its settings."""
    if world_size != 1:
        return None
    fast = fast_settings("cuda", cfg.optimizer)
    missing = {k: v for k, v in fast.items() if getattr(cfg, k) != v}
    if len(missing) < 2:
        return None
    measured = MEASURED["fast" if fast.get("cuda_graph") else "compile"]
    return f"`cifarexp time --fast` ({_try(**missing)}; {measured})"


def _fewer_launches(cfg: TrainConfig, world_size: int) -> str:
    fast = _fast(cfg, world_size)
    if fast is not None:
        return f"try {fast}"
    events = f" with {_try(timing='events')}" if cfg.timing == "sync" else ""
    reduce_overhead = _try(compile="reduce-overhead")
    if not cfg.cuda_graph and cfg.compile in ("none", "default"):
        if not _graphable(cfg, world_size):
            return f"try {reduce_overhead}{events} (CUDA graphs launch a step at once)"
        return (
            f"try {_try(cuda_graph=True)}{events} (the whole step launched at once; or "
            f"{reduce_overhead})"
        )
    if cfg.timing == "sync":
        return f"try {_try(timing='events')} (no wait for the device after each step)"
    return f"try a larger {flag('batch_size')} (more work per launch)"


def _faster_compute(cfg: TrainConfig, device_type: str, world_size: int) -> str:
    """The settings of this tool not yet on that shorten a compute-bound step, each with
    what it measured where known (MEASURED)."""
    if device_type != "cuda":
        return "try a GPU (`cifarexp compare-device` measures how much faster it is)"
    fast = _fast(cfg, world_size)
    if fast is not None:
        return f"try {fast}"
    tries = []
    if cfg.precision != "bf16" or not cfg.channels_last:
        tries.append(f"{_try(precision='bf16', channels_last=True)} (tensor cores)")
    if cfg.compile == "none" and not cfg.cuda_graph:
        if _graphable(cfg, world_size):
            tries.append(f"{_try(cuda_graph=True)} ({MEASURED['cuda_graph']})")
        tries.append(f"{_try(compile='reduce-overhead')} ({MEASURED['compile']})")
    if cfg.loader != "gpu":
        tries.append(f"{_try(loader='gpu')} (the batches made on the device)")
    tries.append(f"a larger {flag('batch_size')} than {cfg.batch_size} ({MEASURED['batch_size']})")
    return f"try {'; or '.join(tries[:2])}"


def _try(**settings: object) -> str:
    """Settings as the flags that set them: workers=8, pin_memory=True -> "--workers 8
    --pin-memory"."""
    return " ".join(flags(settings))


def split_text(split: Mapping[str, float]) -> str:
    """The split in words: "data wait 58%, host, device idle 10%, ..." in PARTS' order."""
    return ", ".join(f"{PART_NAMES[p]} {split[p]:.0%}" for p in PARTS if p in split)
