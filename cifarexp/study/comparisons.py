"""The study's comparisons (C3-C7): each a parent MLflow run with one child run per variant.

Each command builds configs, runs its variants as children of an open parent, and returns
the parent's run id; the layer above builds the answer from the store and logs it there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from cifarexp import tracking
from cifarexp.config import (
    WORKERS_TOLERANCE,
    CifarexpError,
    ConfigError,
    TrainConfig,
    logged_params,
)
from cifarexp.study.catalogue import Labels
from cifarexp.study.launch import run_processes
from cifarexp.study.runs import environment_tags, run_training
from cifarexp.study.session import Session
from cifarexp.tracking import Tracker
from cifarexp.tracking.lifecycle import owner_tag
from cifarexp.tracking.names import SETTINGS
from cifarexp.tracking.queries import settings_digest, with_settings
from cifarexp.training import distributed
from cifarexp.training.data import cpu_count
from cifarexp.training.engine import resolve_device

WORKERS_STEP = 4
NO_CUDA = (
    "No CUDA device was found: C5 compares a CUDA GPU with the CPU and needs one (an NVIDIA "
    "GPU, its driver and a CUDA build of torch); here it times the CPU alone, with no speedup."
)
log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """An open parent run that runs variants as its children (recorded in `variants` as they
    run, and on the parent once they all have)."""

    labels: Labels
    session: Session
    parent_id: str
    reused: dict[str, str]  # variant -> finished child of a resumed run
    variants: list[str] = field(default_factory=list)  # those run (or reused), in order
    finished: bool = False  # --resume found it finished: every variant is reused, none run

    def run(self, variant: str, cfg: TrainConfig, nproc: int = 1) -> str:
        """Train one variant as a child run (or reuse its finished run); its run id. With
        `nproc` > 1 it trains data-parallel in that many processes under torchrun."""
        self.variants.append(variant)
        if variant in self.reused:
            if not self.finished:  # else "Already finished" said it for all of them
                log.info(f"{variant}: reusing finished run {self.reused[variant]}")
            return self.reused[variant]
        if self.finished:
            raise CifarexpError(
                f"run {self.parent_id} finished, but its run of {variant} is no longer in "
                "the store (deleted?); run the command without --resume for a new comparison"
            )
        labels = Labels(self.labels.command, self.labels.exercise, variant)
        same = (self.session.finished or {}).get(cfg) if nproc == 1 else None
        if same is not None:  # the lab trained this config already
            log.info(f"{variant}: the same settings as finished run {same}: reused")
            return self.session.tracker.copy_run(
                same, run_name=labels.run_name(), tags=labels.tags(), parent=self.parent_id
            )
        if nproc == 1:
            run = run_training(cfg, labels, self.session, parent=self.parent_id)
            return run.run_id
        run_processes(cfg, labels, nproc, self.session, parent=self.parent_id)
        children = tracking.finished_children(self.parent_id)
        found = children[children[f"tags.{tracking.VARIANT}"] == variant]
        if found.empty:
            raise CifarexpError(f"{variant}: its processes ended without a finished run")
        return str(found["run_id"].iloc[0])


@contextmanager
def comparison(
    labels: Labels,
    base: TrainConfig,
    options: dict[str, object],
    session: Session,
    *,
    varies: tuple[str, ...],
    tags: dict[str, str] | None = None,
) -> Iterator[Comparison]:
    """Open the parent run (or, with the session's `resume`, reopen the unfinished one with
    the same settings; if the newest with these settings has finished, it is the answer and
    nothing trains) and yield a Comparison to run the variants in; the parent records the
    variants it ran, so that one whose run is missing later is seen. The parent's params are
    `base`'s less the fields its variants vary, and `options` (which say over what they
    vary). `tags` are set on the parent beside its own."""
    tracker = session.tracker
    device = resolve_device(base.device)
    shared = {k: v for k, v in base.as_params().items() if k not in varies}
    params = {**shared, **{k: "all" if v is None else v for k, v in options.items()}}
    previous = with_settings(labels.exercise, params) if session.resume else None
    if previous is not None and previous["status"] == "FINISHED":
        log.warning(
            f"Already finished: run {previous['run_id']} has these settings; nothing to "
            "train. Its answer:"
        )
        yield Comparison(labels, session, previous["run_id"], _finished_variants(previous),
                         finished=True)  # fmt: skip
        return
    if session.resume and previous is None:
        log.warning("Nothing to resume: no run with these settings; starting a new one.")
    reopen = None if previous is None else previous["run_id"]
    tags = {
        **labels.tags(), tracking.DATASET: base.dataset, **environment_tags(device),
        tracking.DEVICE: str(options.get("devices", device.type)),
        SETTINGS: settings_digest(params), **owner_tag(), **(tags or {}),
    }  # fmt: skip
    name = labels.run_name(base.dataset, str(options.get("devices", device.type)))
    with tracker.start_run(
        session.experiment_of(labels.command), run_name=name, tags=tags,
        params=logged_params(params, device.type), reopen=reopen, about=labels.about(),
    ) as parent_id:  # fmt: skip
        reused = {} if reopen is None else _finished_variants(previous)
        comp = Comparison(labels, session, parent_id, reused)
        yield comp
        tracker.set_tags({tracking.VARIANTS: tracking.VARIANTS_SEPARATOR.join(comp.variants)})


def _finished_variants(parent: pd.Series) -> dict[str, str]:
    """variant -> its finished child run, of the comparison `parent`."""
    children = tracking.finished_children(parent["run_id"])
    return dict(zip(children[f"tags.{tracking.VARIANT}"], children["run_id"], strict=True))


# ---------------------------------------------------------------- C3, C4: sweep-workers


def max_workers() -> int:
    """The automatic sweep stops here: one step past the CPUs this process may use."""
    return WORKERS_STEP * math.ceil(cpu_count() / WORKERS_STEP) + WORKERS_STEP


def sweep_workers(
    base: TrainConfig,
    workers: list[int] | None,
    session: Session,
    *,
    gpu_loader: bool | None = None,
) -> str:
    """C3/C4: one child per worker count; the parent's run id. Without a list: 1 (for C4),
    then 0, 4, 8, ... (and the CPU count between them) until data-loading time stops falling
    by more than WORKERS_TOLERANCE.
    With `gpu_loader` (by default on CUDA), a last child with the data kept on the device:
    what no count can reach."""
    if gpu_loader is None:
        gpu_loader = resolve_device(base.device).type == "cuda"
    options = {
        "workers_list": ",".join(map(str, workers)) if workers else "auto",
        "gpu_loader": gpu_loader,
    }
    labels = Labels("sweep-workers", "C3")
    varies = ("workers", "persistent_workers") + (("loader",) if gpu_loader else ())
    with comparison(labels, base, options, session, varies=varies) as comp:

        def run_count(n: int) -> float:  # persistent workers mean nothing with 0 workers
            cfg = base.replace(workers=n, persistent_workers=base.persistent_workers and n > 0)
            return _data_time(comp.run(f"workers={n}", cfg))

        for count in workers or [1]:
            run_count(count)
        if workers is None:
            auto_sweep(run_count, max_workers(), cpus=cpu_count())
        if gpu_loader:
            comp.run("loader=gpu", base.replace(loader="gpu", workers=0, persistent_workers=False))
    return comp.parent_id


def auto_sweep(measure: Callable[[int], float], limit: int, cpus: int | None = None) -> list[int]:
    """Measure 0, 4, 8, ... workers until the data-loading time stops falling by more than
    WORKERS_TOLERANCE (or `limit` is passed); the counts measured. The CPU count `cpus`,
    where it falls between two steps (2 on a 2-CPU machine), is measured too, in its place:
    one worker per CPU is the count to try there; it joins the best but never ends the sweep
    (the study's steps do)."""
    counts, best = [], math.inf
    for count in range(0, limit + 1, WORKERS_STEP):
        if cpus is not None and count - WORKERS_STEP < cpus < count and cpus <= limit:
            counts.append(cpus)
            best = min(best, measure(cpus))
        counts.append(count)
        data_time = measure(count)
        if count > 0 and data_time > best * (1 - WORKERS_TOLERANCE):
            break
        best = min(best, data_time)
    return counts


def _data_time(run_id: str) -> float:
    return float(tracking.metric_history(run_id, ["data_time_s"])["data_time_s"].mean())


def resolve_best_workers(tracker: Tracker, device: str, dataset: str) -> int:
    """workers "best": best_workers of the newest finished sweep for this device type and
    dataset, that sweep's run id tagged on the runs `tracker` starts from now on; a clear
    error when there is none."""
    device_type = resolve_device(device).type
    sweep = tracking.latest_sweep(device_type, dataset)
    if sweep is None:
        raise ConfigError(
            f"best: no finished sweep-workers run for {device_type} and {dataset} in "
            f"{tracking.shown_uri()}; run `cifarexp sweep-workers` first",
            "workers",
        )
    best = int(sweep["metrics.best_workers"])
    log.info(f"workers best = {best}, from sweep-workers run {sweep['run_id']}")
    tracker.tag_later_runs({tracking.WORKERS_FROM: sweep["run_id"]})
    return best


# ---------------------------------------------------------------- C5, C6, C7


def _compare(
    labels: Labels,
    base: TrainConfig,
    variants: dict[str, TrainConfig],
    options: dict[str, object],
    session: Session,
    tags: dict[str, str] | None = None,
) -> str:
    """One child per variant; the parent's params leave out the fields they differ in, its
    tags add `tags`. The parent's run id."""
    varies = tuple(
        k
        for k, v in base.as_params().items()
        if any(cfg.as_params()[k] != v for cfg in variants.values())
    )
    with comparison(labels, base, options, session, varies=varies, tags=tags) as comp:
        for variant, cfg in variants.items():
            comp.run(variant, cfg)
    return comp.parent_id


def compare_device(
    base: TrainConfig, devices: list[str], session: Session, *, cpu_batches: int | None = None
) -> str:
    """C5: the same training on each device; on CPU optionally only the first `cpu_batches`
    batches per epoch, the epoch time then estimated from their throughput."""
    for device in devices:
        resolve_device(device, "devices")
    if not torch.cuda.is_available():
        log.warning(NO_CUDA)
    variants = {
        f"device={d}": base.replace(device=d, max_batches=cpu_batches if d == "cpu" else None)
        for d in devices
    }
    options = {"devices": ",".join(devices), "cpu_batches": cpu_batches}
    tags = {tracking.CUDA_DEVICES: str(torch.cuda.device_count())}
    return _compare(Labels("compare-device", "C5"), base, variants, options, session, tags)


def compare_gpus(
    base: TrainConfig,
    gpus: list[int],
    scalings: list[str],
    session: Session,
    *,
    device: str = "cuda",
    cpu_batches: int | None = None,
) -> str:
    """C5 extended: the same training on 1 GPU, then data-parallel on each other count in
    `gpus`, one torchrun process per GPU, in each scaling mode (weak: batch_size per GPU,
    strong: in total). With device cpu the counts are CPU processes (gloo) and `cpu_batches`
    limits every epoch, to try it where there is no GPU."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"with gpus give one device, cuda or cpu, not {device!r}", "devices")
    if any(n < 1 for n in gpus) or 1 not in gpus:
        raise ConfigError(f"counts are >= 1 and include 1, the baseline; got {gpus}", "gpus")
    if device == "cuda" and max(gpus) > torch.cuda.device_count():
        raise ConfigError(
            f"{max(gpus)} GPUs asked for, this machine has {torch.cuda.device_count()} "
            "(devices cpu runs CPU processes instead)",
            "gpus",
        )
    base.check_processes(several=True)  # fails now, not in every torchrun child
    for scaling in scalings:  # a batch that does not split fails now, not in a child
        for n in gpus:
            distributed.per_process_batch(base.replace(scaling=scaling), n)
    base = base.replace(device=device, max_batches=cpu_batches if device == "cpu" else None)
    options = {
        "gpus": ",".join(map(str, gpus)),
        "scaling": ",".join(scalings),  # the modes run, not the base config's one
        "devices": device,
        "cpu_batches": cpu_batches,
    }
    labels = Labels("compare-device", "C5-scaling")
    with comparison(labels, base, options, session, varies=("scaling",)) as comp:
        comp.run("gpus=1", base)  # the baseline: one process, no DDP
        for scaling in scalings:
            for n in sorted(set(gpus) - {1}):
                comp.run(f"gpus={n},scaling={scaling}", base.replace(scaling=scaling), n)
    return comp.parent_id


def compare_optim(base: TrainConfig, optimizers: list[str], session: Session) -> str:
    """C6: the same training with each optimizer; the parent's run id."""
    variants = {f"optimizer={name}": base.replace(optimizer=name) for name in optimizers}
    options = {"optimizers": ",".join(optimizers)}
    return _compare(Labels("compare-optim", "C6"), base, variants, options, session)


def no_bn(base: TrainConfig, session: Session, *, baseline: bool = True) -> str:
    """C7: the model without BatchNorm and, unless baseline=False, the BN model; the
    parent's run id."""
    variants = {"model=no-bn": base.replace(batch_norm=False)}
    if baseline:
        variants["model=bn"] = base.replace(batch_norm=True)
    options = {"models": ",".join(v.removeprefix("model=") for v in variants)}
    return _compare(Labels("no-bn", "C7"), base, variants, options, session)
