"""The `cifarexp` command line: parses options, builds configs, delegates, prints the answer.

Each command lists its options (the aliases of `options`) and imports what it runs only
when it runs, so that `--help` and a usage error answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cifarexp import __version__, processes
from cifarexp import options as opt
from cifarexp.config import OPTIMIZERS, SCALINGS, ConfigError, TrainConfig, UserError, flag

if TYPE_CHECKING:
    from cifarexp.distributed import World
    from cifarexp.runs import Progress

app = typer.Typer(
    help="Where the time of a ResNet-18 / CIFAR-10 training run goes, tracked with MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
D = TrainConfig()  # the study's defaults, shown by --help
CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}
ALL_OPTIMIZERS, ALL_SCALINGS = ",".join(OPTIMIZERS), ",".join(SCALINGS)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cifarexp {__version__}")
        raise typer.Exit()


@app.callback()
def _app(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Where the time of a ResNet-18 / CIFAR-10 training run goes, tracked with MLflow."""


# ---------------------------------------------------------------- what every command shares


@dataclass(frozen=True)
class Session:
    """What a command runs with besides its config: its process's world, where it logs,
    and how it shows progress."""

    world: World
    experiment: str
    progress: Progress | None


def command(name: str, *, under_torchrun: bool = False) -> Callable:
    """Register `fn` as the command `name`. Errors meant for the user become one line: bad
    input exits 2, runtime failures exit 1, Ctrl-C exits 130; never a traceback. Only an
    `under_torchrun` command runs under torchrun (or --nproc N)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)  # typer reads fn's own signature through it
        def run(*args: Any, **kwargs: Any) -> Any:
            with user_errors():
                if processes.launched() and not under_torchrun:
                    raise ConfigError(
                        f"{name} does not run under torchrun; run it as one process (the "
                        "`time` command runs under torchrun and --nproc)"
                    )
                return fn(*args, **kwargs)

        return app.command(name)(run)

    return decorate


def open_session(
    command: str,
    *,
    tracking_uri: str | None,
    experiment: str | None,
    quiet: bool,
    device: str = "auto",
    nproc: int = 1,
    system_metrics: bool = True,
) -> Session:
    """Relaunch under torchrun for --nproc N; else this process's world, its store, its
    experiment and its progress display."""
    if nproc > 1 and not processes.launched():
        processes.relaunch(nproc, sys.argv[1:])
    from cifarexp import console, distributed, tracking

    console.show_notices()
    world = distributed.world_from_environment(device)
    tracking.use_store(tracking_uri, world, system_metrics=system_metrics)
    return Session(
        world,
        experiment or tracking.default_experiment(command),
        None if quiet else console.progress,
    )


def training_config(values: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a command's options (`values`: its locals; those that are config
    fields); workers "best" is resolved from the store."""
    given = {k: v for k, v in values.items() if k in CONFIG_FIELDS}
    workers = given.get("workers")
    if workers == "best":
        from cifarexp.comparisons import resolve_best_workers

        given["workers"] = resolve_best_workers(given.get("device", "auto"), given["dataset"])
    elif isinstance(workers, str):
        given["workers"] = parse_int("workers", workers)
    return TrainConfig(**given)


def parse_int(field: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a whole number", field) from None


def parse_list(field: str, text: str, choices: Iterable[str] | None = None) -> list[str]:
    """A comma-separated list: no empty items, no duplicates, each one of `choices`."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or "" in items:
        raise ConfigError(f"empty item in {text!r}; give a comma-separated list", field)
    if len(set(items)) < len(items):
        raise ConfigError(f"duplicate item in {text!r}", field)
    allowed = list(choices) if choices is not None else None
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown:
        raise ConfigError(f"unknown {unknown[0]!r}; choose from {', '.join(allowed)}", field)
    return items


def _message(exc: UserError) -> str:
    return f"{flag(exc.field)}: {exc.message}" if exc.field else exc.message


@contextmanager
def user_errors() -> Iterator[None]:
    """Turns the project's errors into one clear line and an exit code."""
    try:
        yield
    except ConfigError as exc:
        raise typer.BadParameter(_message(exc)) from None
    except UserError as exc:
        _print_error(_message(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _print_interrupted()
        raise typer.Exit(130) from None
    except Exception as exc:
        from cifarexp import tracking

        if not isinstance(exc, tracking.STORE_ERRORS):
            raise
        _print_error(str(exc))
        raise typer.Exit(1) from None


def _print_error(message: str) -> None:
    from rich.markup import escape

    from cifarexp.console import err_console

    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _print_interrupted() -> None:
    """What a stop left in the store, as the store says it."""
    from cifarexp.console import err_console

    tracking = sys.modules.get("cifarexp.tracking")  # imported once a run has started
    ended = tracking.last_ended() if tracking is not None else None
    if ended is None or ended[1] != "FINISHED":
        err_console.print("Interrupted: finished epochs are in the store; the run is KILLED.")
    else:
        err_console.print(f"Interrupted after run {ended[0]} had FINISHED; nothing is lost.")


# ---------------------------------------------------------------- C1, C2: time


@command("time", under_torchrun=True)
def time_(
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    optimizer: opt.OptimizerName = D.optimizer,
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    scaling: opt.ScalingName = D.scaling,
    profile: opt.Profile = D.profile,
    nproc: opt.Nproc = 1,
    run_name: opt.RunName = None,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C1, C2: train and time every epoch: data-loading wait, computation, wall clock."""
    session = open_session(
        "time", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet, device=device,
        nproc=nproc, system_metrics=system_metrics,
    )  # fmt: skip
    cfg = training_config(locals())
    from analysis import report
    from cifarexp import runs
    from cifarexp.console import print_answer

    section = runs.time_run(
        cfg,
        summarize=report.summarize,
        experiment=session.experiment,
        run_name=run_name,
        world=session.world,
        progress=session.progress,
    )
    if section is not None:  # None on the ranks other than 0 of a torchrun job
        print_answer(section)


# ---------------------------------------------------------------- C3, C4: sweep-workers


@command("sweep-workers")
def sweep_workers(
    worker_counts: opt.WorkerCounts = "auto",
    gpu_loader: opt.GpuLoaderRow = None,
    epochs: opt.Epochs = 1,
    optimizer: opt.OptimizerName = D.optimizer,
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C3, C4: data-loading time per DataLoader worker count, the best count, 1 vs best."""
    counts = None
    if worker_counts != "auto":
        counts = [parse_int("workers", w) for w in parse_list("workers", worker_counts)]
        if any(c < 0 for c in counts):
            raise ConfigError(f"counts must be >= 0, got {worker_counts!r}", "workers")
    session = open_session(
        "sweep-workers", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet,
        system_metrics=system_metrics,
    )  # fmt: skip
    cfg = training_config(locals())
    from analysis import report
    from cifarexp import comparisons
    from cifarexp.console import print_answer

    if gpu_loader is None:
        gpu_loader = comparisons.resolve_device(cfg.device).type == "cuda"
    section = comparisons.sweep_workers(
        cfg,
        counts,
        summarize=report.summarize,
        gpu_loader=gpu_loader,
        experiment=session.experiment,
        resume=resume,
        progress=session.progress,
    )
    print_answer(section)


# ---------------------------------------------------------------- C5: compare-device


@command("compare-device")
def compare_device(
    devices: opt.Devices = None,
    cpu_batches: opt.CpuBatches = None,
    gpus: opt.Gpus = None,
    scalings: opt.Scalings = ALL_SCALINGS,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    optimizer: opt.OptimizerName = D.optimizer,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C5: average epoch time on each device (GPU vs CPU) and the GPU speedup; with --gpus,
    epoch time, images/s, speedup and scaling efficiency on 1, 2, 4 ... GPUs."""
    session = open_session(
        "compare-device", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet,
        system_metrics=system_metrics,
    )  # fmt: skip
    cfg = training_config(locals())
    from analysis import report
    from cifarexp import comparisons
    from cifarexp.console import print_answer

    if gpus is not None:
        section = comparisons.compare_gpus(
            cfg,
            [parse_int("gpus", g) for g in parse_list("gpus", gpus)],
            parse_list("scaling", scalings, SCALINGS),
            summarize=report.summarize,
            device=devices or "cuda",
            cpu_batches=cpu_batches,
            experiment=session.experiment,
            resume=resume,
            progress=session.progress,
        )
    else:
        import torch

        default = "cpu,cuda" if torch.cuda.is_available() else "cpu"
        section = comparisons.compare_device(
            cfg,
            parse_list("devices", default if devices is None else devices),
            summarize=report.summarize,
            cpu_batches=cpu_batches,
            experiment=session.experiment,
            resume=resume,
            progress=session.progress,
        )
    print_answer(section)


@app.command("launched-run", hidden=True)
def launched_run() -> None:
    """One process of a variant that a comparison launched through torchrun."""
    with user_errors():
        from cifarexp import runs

        spec = runs.launched_run()
        session = open_session(
            "launched-run",
            tracking_uri=None,  # the launcher's store, from MLFLOW_TRACKING_URI
            experiment=None,
            quiet=spec.quiet,
            device=spec.config.device,
            system_metrics=spec.system_metrics,
        )
        runs.train_launched(spec, session.world, session.progress)


# ---------------------------------------------------------------- C6, C7


@command("compare-optim")
def compare_optim(
    optimizers: opt.Optimizers = ALL_OPTIMIZERS,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C6: SGD, Nesterov, Adagrad, Adadelta, Adam: training time, loss and accuracy."""
    names = parse_list("optimizers", optimizers, OPTIMIZERS)
    session = open_session(
        "compare-optim", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet,
        system_metrics=system_metrics,
    )  # fmt: skip
    cfg = training_config(locals())
    from analysis import report
    from cifarexp import comparisons
    from cifarexp.console import print_answer

    section = comparisons.compare_optim(
        cfg,
        names,
        summarize=report.summarize,
        experiment=session.experiment,
        resume=resume,
        progress=session.progress,
    )
    print_answer(section)


@command("no-bn")
def no_bn(
    baseline: opt.Baseline = True,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    optimizer: opt.OptimizerName = D.optimizer,
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C7: the model without BatchNorm against the BN model: loss and accuracy."""
    session = open_session(
        "no-bn", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet,
        system_metrics=system_metrics,
    )  # fmt: skip
    cfg = training_config(locals())
    from analysis import report
    from cifarexp import comparisons
    from cifarexp.console import print_answer

    section = comparisons.no_bn(
        cfg,
        summarize=report.summarize,
        baseline=baseline,
        experiment=session.experiment,
        resume=resume,
        progress=session.progress,
    )
    print_answer(section)


# ---------------------------------------------------------------- Q1-Q4: inspect


@command("inspect")
def inspect_(
    optimizers: opt.Optimizers = "sgd,adam",
    batch_norm: opt.BatchNorm = True,
    batch_size: opt.StepImages = 8,
    seed: opt.Seed = D.seed,
    as_json: opt.Json = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
) -> None:
    """Q1-Q4: conv layers, the last linear layer's input, parameters, gradients, optimizer state."""
    names = parse_list("optimizers", optimizers, OPTIMIZERS)
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=batch_size,
        batch_size=batch_size,
        workers=0,
        device="cpu",
        seed=seed,
        batch_norm=batch_norm,
    )
    session = open_session("inspect", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet)
    from cifarexp import inspection
    from cifarexp.console import console, inspection_tables, print_where

    result = inspection.run_inspection(cfg, tuple(names), experiment=session.experiment)
    if as_json:
        typer.echo(result.json())
        return
    for shown in inspection_tables(result):
        console.print(shown)
    console.print(
        f"Logged as run {result.run_id} (model_summary.txt, tables as CSV, answers.json)."
    )
    print_where(result.run_id)


# ---------------------------------------------------------------- the report and the lab


@command("report")
def report_(
    out: opt.Out = Path("report"),
    runs: opt.Runs = None,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
) -> None:
    """The study's tables and plots, from the tracking store, into a report folder."""
    session = open_session("report", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet)
    from analysis import report

    run_ids = report.pick_runs(parse_list("runs", runs)) if runs is not None else {}
    write_and_log_report(report.build_report(run_ids), out, session.experiment, quiet=quiet)


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(out, exc) from None


def _unwritable(out: Path, exc: OSError) -> UserError:
    from cifarexp.config import CifarexpError

    return CifarexpError(f"cannot write the report to {out} ({exc.strerror})", "out")


def write_and_log_report(sections: list, out: Path, experiment: str, *, quiet: bool) -> None:
    """Write the report folder, print it (unless `quiet`), and log the folder on a `report`
    run in `experiment`."""
    from analysis import report
    from cifarexp import tracking
    from cifarexp.console import console, print_section, print_where
    from cifarexp.runs import Labels, experiment_about

    try:
        path = report.write_report(sections, out, tracking.shown_uri())
    except OSError as exc:
        raise _unwritable(out, exc) from None
    for section in [] if quiet else sections:
        if section.missing:
            console.print(f"[bold]{section.heading}[/]: not run yet; run `{section.command}`.")
        else:
            print_section(section)
    labels = Labels("report", "report")
    with tracking.start_run(
        experiment, run_name="report", tags=labels.tags(), params={"out": str(out)},
        about=experiment_about(labels),
    ) as run_id:  # fmt: skip
        tracking.log_artifacts(out)
    console.print(f"Report written to {path}.")
    print_where(run_id)


@command("lab")
def lab_(
    preset: opt.PresetName = "full",
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    device: opt.Device = D.device,
    out: opt.Out = Path("report"),
    profile: opt.Profile = D.profile,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """The whole study, from nothing to every answer: inspect, time, sweep-workers,
    compare-device, compare-optim, no-bn (with the best worker count), then the report."""
    base = TrainConfig(dataset=dataset, data_dir=data_dir, device=device, profile=profile)
    make_out_dir(out)  # a bad --out fails now, not after the whole study
    session = open_session(
        "lab", tracking_uri=tracking_uri, experiment=experiment, quiet=quiet,
        system_metrics=system_metrics,
    )  # fmt: skip
    from analysis import report
    from cifarexp import lab, tracking
    from cifarexp.console import console

    lab.run_lab(
        base,
        preset,
        summarize=report.summarize,
        experiment=experiment,
        progress=session.progress,
        on_step=console.rule,
    )
    report_experiment = experiment or tracking.default_experiment("report")
    write_and_log_report(report.build_report(), out, report_experiment, quiet=quiet)


def main() -> None:
    under_torchrun = processes.launched()
    processes.handle_stops(under_torchrun=under_torchrun)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 2 and "MLFLOW_RUN_ID" in os.environ:  # `mlflow run`'s run exists already
            from cifarexp import tracking

            tracking.fail_project_run(f"usage error: cifarexp {' '.join(sys.argv[1:])}")
        raise
    finally:
        if under_torchrun:
            from cifarexp import distributed

            distributed.leave()  # as PyTorch asks before a process of a group exits
