"""The `cifarexp` command line: parses options, builds configs, delegates, prints the answer."""

import functools
import inspect
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape

from analysis import queries, report
from cifarexp import distributed, experiments, inspection, lab, tracking
from cifarexp.config import (
    COMPILE_MODES,
    DATASETS,
    LOADERS,
    PRECISIONS,
    SCALINGS,
    TIMINGS,
    CifarexpError,
    ConfigError,
    TrainConfig,
)
from cifarexp.console import console, err_console, render
from cifarexp.jobs import Labels, run_launched, run_training
from cifarexp.optim import OPTIMIZERS

app = typer.Typer(
    help="Where the time of a ResNet-18 / CIFAR-10 training run goes, tracked with MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _app() -> None:
    """Where the time of a ResNet-18 / CIFAR-10 training run goes, tracked with MLflow."""


DATA, TRAINING, RUN = "Data", "Training", "Tracking and output"
FAST = "Fast path (GPU)"
SCALE = "Several processes (torchrun)"


def _option(name: str, kind: Any, default: Any, help: str, panel: str) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, typer.Option(help=help, rich_help_panel=panel)],
    )


# The options every training command shares, with one name everywhere (SPEC §4).
TRAIN_OPTIONS = [
    _option("epochs", int, 5, "Epochs to train (the study: 5).", TRAINING),
    _option(
        "workers",
        str,
        "2",
        "DataLoader worker processes (C3), or 'best': the best count of the latest finished "
        "sweep-workers run for this device and dataset.",
        DATA,
    ),
    _option("optimizer", str, "sgd", f"Optimizer: {', '.join(OPTIMIZERS)}.", TRAINING),
    _option("device", str, "auto", "auto (CUDA when present), cpu, cuda or cuda:N.", TRAINING),
    _option(
        "dataset",
        str,
        "cifar10",
        f"{' or '.join(DATASETS)}: synthetic is CIFAR-shaped, learnable, made locally.",
        DATA,
    ),
    _option("data_dir", str, "./data", "Where CIFAR-10 is (downloaded when absent).", DATA),
    _option("train_size", int | None, None, "Train on the first N images only.", DATA),
    _option("test_size", int | None, None, "Evaluate on the first N test images only.", DATA),
    _option("batch_size", int, 128, "Mini-batch size.", TRAINING),
    _option("lr", float, 0.1, "Learning rate.", TRAINING),
    _option("momentum", float, 0.9, "Momentum (sgd, nesterov).", TRAINING),
    _option("weight_decay", float, 5e-4, "Weight decay.", TRAINING),
    _option("seed", int, 0, "Seed for weights, shuffling and synthetic data.", TRAINING),
    _option("pin_memory", bool, False, "DataLoader pin_memory.", DATA),
    _option("persistent_workers", bool, False, "Keep DataLoader workers between epochs.", DATA),
    _option(
        "loader_timeout",
        float,
        600.0,
        "Seconds to wait for a batch from the DataLoader workers before the run fails "
        "(a stuck worker); 0 waits forever.",
        DATA,
    ),
    _option("eval", bool, False, "Evaluate on the test split after each epoch (not timed).", DATA),
    _option(
        "loader",
        str,
        "torch",
        f"{' or '.join(LOADERS)}: gpu keeps the uint8 train set on the device and augments "
        "whole batches there, as the study's transforms do (--workers, --pin-memory unused; "
        "on CPU the same code runs on CPU tensors).",
        FAST,
    ),
    _option(
        "precision",
        str,
        "fp32",
        f"{', '.join(PRECISIONS)}: fp32 is PyTorch's default (cuDNN may use TF32 for "
        "convolutions), tf32 adds TF32 matmuls (CUDA only), bf16 is autocast.",
        FAST,
    ),
    _option("channels_last", bool, False, "Model and inputs in NHWC memory order.", FAST),
    _option(
        "compile",
        str,
        "none",
        f"torch.compile mode: {', '.join(COMPILE_MODES)} (CUDA only; compiled during the "
        "warm-up, logged as warmup_s).",
        FAST,
    ),
    _option(
        "timing",
        str,
        "sync",
        f"{' or '.join(TIMINGS)}: sync synchronises every step (the study's C2); events times "
        "with CUDA events and waits once per epoch (CUDA only).",
        FAST,
    ),
    _option(
        "scaling",
        str,
        "weak",
        f"{' or '.join(SCALINGS)}, under torchrun: weak trains --batch-size images per process "
        "and step, strong --batch-size in total, split over the processes.",
        SCALE,
    ),
    _option(
        "nproc",
        int,
        1,
        "Run this command as N processes on this machine, one per GPU (or N CPU processes "
        "with --device cpu), through torch.distributed.run; 1 = this process only.",
        SCALE,
    ),
]
RUN_OPTIONS = [
    _option(
        "tracking_uri",
        str | None,
        None,
        "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
        RUN,
    ),
    _option("experiment", str | None, None, "MLflow experiment (default: cifarexp-COMMAND).", RUN),
    _option("quiet", bool, False, "No progress bars.", RUN),
]


class Context:
    """What a command gets besides its own options: the config and where to log."""

    def __init__(self, command: str, cfg: TrainConfig, experiment: str, quiet: bool) -> None:
        self.command, self.cfg, self.experiment, self.quiet = command, cfg, experiment, quiet


def command(
    name: str,
    *,
    train_options: bool = True,
    exclude: tuple[str, ...] = (),
    distributed_ok: bool = False,
    **defaults: Any,
) -> Callable:
    """Register `fn` as a command taking its own options plus the shared ones (less
    `exclude`, with `defaults` changed). Only a `distributed_ok` command runs under torchrun
    (or --nproc N).

    `fn` receives a validated `ctx: Context`. Errors meant for the user become one line:
    bad input exits 2, runtime failures exit 1, Ctrl-C exits 130; never a traceback.
    """

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "ctx"]
        skip = {q.name for q in own} | set(exclude)
        if not distributed_ok:
            skip |= {"scaling", "nproc"}
        shared = [
            p.replace(default=defaults.get(p.name, p.default))
            for p in (TRAIN_OPTIONS if train_options else []) + RUN_OPTIONS
            if p.name not in skip
        ]

        @functools.wraps(fn)
        def wrapper(**values: Any) -> Any:
            with user_errors():
                nproc = values.pop("nproc", 1)
                if nproc < 1:
                    raise ConfigError(f"--nproc: must be >= 1, got {nproc}")
                if distributed.launched() and not distributed_ok:
                    raise ConfigError(
                        f"{name} does not run under torchrun yet; run it as one process "
                        "(the `time` command runs under torchrun and --nproc)"
                    )
                if nproc > 1 and not distributed.launched():
                    distributed.relaunch(nproc, sys.argv[1:])
                run = {p.name: values.pop(p.name) for p in RUN_OPTIONS}
                tracking.use_store(run["tracking_uri"])
                config = {p.name: values.pop(p.name) for p in shared if p.name in values}
                cfg = make_config(config) if train_options else TrainConfig()
                experiment = run["experiment"] or lab.experiment(name)
                ctx = Context(name, cfg, experiment, run["quiet"])
                return fn(ctx=ctx, **values)

        params = own + shared
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must see the new signature, not fn's
        return app.command(name)(wrapper)

    return decorate


def make_config(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from option values; `--workers best` resolved from the store."""
    workers = values.get("workers", "2")
    if workers == "best":
        device, dataset = values.get("device", "auto"), values.get("dataset", "cifar10")
        values["workers"] = experiments.resolve_best_workers(device, dataset)
    elif isinstance(workers, str):
        values["workers"] = parse_int("--workers", workers)
    return TrainConfig(**values)


def parse_int(option: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a whole number") from None


def parse_list(option: str, text: str, choices: Iterable[str] | None = None) -> list[str]:
    """A comma-separated list: no empty items, no duplicates, each one of `choices`."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or "" in items:
        raise ConfigError(f"{option}: empty item in {text!r}; give a comma-separated list")
    if len(set(items)) < len(items):
        raise ConfigError(f"{option}: duplicate item in {text!r}")
    allowed = list(choices) if choices is not None else None
    unknown = [item for item in items if allowed is not None and item not in allowed]
    if unknown:
        raise ConfigError(f"{option}: unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    return items


@contextmanager
def user_errors() -> Iterator[None]:
    """Turns the project's errors into one clear line and an exit code."""
    try:
        yield
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    except (CifarexpError, *tracking.STORE_ERRORS) as exc:
        message = escape(str(exc))  # store errors may hold [brackets]
        err_console.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted: finished epochs are in the store; the run is KILLED.")
        raise typer.Exit(130) from None


@command("time", distributed_ok=True)
def time_(
    ctx: Context,
    run_name: Annotated[
        str | None, typer.Option(help="MLflow run name.", rich_help_panel=RUN)
    ] = None,
) -> None:
    """C1, C2: train and time every epoch: data-loading wait, computation, wall clock."""
    run = run_training(
        ctx.cfg,
        Labels("time", "C2"),
        experiment=ctx.experiment,
        run_name=run_name,
        quiet=ctx.quiet,
    )
    if run.run_id is not None:  # None on the ranks other than 0 of a torchrun job
        print_section(report.section("C2", queries.exercise("C2", run_id=run.run_id)))


Resume = Annotated[
    bool,
    typer.Option(
        help="Continue the previous run with the same settings if it did not finish: reuse "
        "its finished variants, run the rest.",
        rich_help_panel=RUN,
    ),
]


def print_section(section: report.Section) -> None:
    """A section's tables and text, and the run they are logged on."""
    for name, table in section.tables.items():
        if not table.empty:
            title = f"{report.TITLES[name]} ({section.dataset})"
            console.print(render(table, title))
    if section.text:
        console.print(section.text, highlight=False)
    console.print(f"Source: {section.source}.", style="dim", highlight=False)


@command("sweep-workers", epochs=1)
def sweep_workers(
    ctx: Context,
    workers: Annotated[
        str,
        typer.Option(
            help="Worker counts to run, e.g. 0,4,8,12; auto: 1 (for C4), then 0, 4, 8, ... "
            "until data-loading time stops falling by more than 3%.",
            rich_help_panel=DATA,
        ),
    ] = "auto",
    gpu_loader: Annotated[
        bool | None,
        typer.Option(
            help="Add a row with the data kept on the device (--loader gpu), to compare with "
            "every worker count. Default: on when training on CUDA.",
            rich_help_panel=DATA,
        ),
    ] = None,
    resume: Resume = False,
) -> None:
    """C3, C4: data-loading time per DataLoader worker count, the best count, 1 vs best."""
    counts = None
    if workers != "auto":
        counts = [parse_int("--workers", w) for w in parse_list("--workers", workers)]
        if any(c < 0 for c in counts):
            raise ConfigError(f"--workers: counts must be >= 0, got {workers!r}")
    if gpu_loader is None:
        gpu_loader = experiments.resolve_device(ctx.cfg.device).type == "cuda"
    section = experiments.sweep_workers(
        ctx.cfg,
        counts,
        gpu_loader=gpu_loader,
        experiment=ctx.experiment,
        resume=resume,
        quiet=ctx.quiet,
    )
    print_section(section)


@command("compare-device", exclude=("device",))
def compare_device(
    ctx: Context,
    devices: Annotated[
        str | None,
        typer.Option(
            help="Devices to compare, e.g. cpu,cuda (default: cpu, plus cuda when present).",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    cpu_batches: Annotated[
        int | None,
        typer.Option(
            help="On CPU time only the first N batches of each epoch and estimate "
            "the epoch from their throughput (marked estimated).",
            min=1,
            rich_help_panel=TRAINING,
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="Compare GPU counts instead, e.g. 1,2,4 (must include 1, the baseline): "
            "data-parallel training, one torchrun process per GPU. With --devices cpu: CPU "
            "processes (gloo). Add --persistent-workers --pin-memory to measure DDP, not the "
            "workers' start-up that every epoch of every process pays.",
            rich_help_panel=SCALE,
        ),
    ] = None,
    scaling: Annotated[
        str,
        typer.Option(
            help="With --gpus: weak (--batch-size per GPU), strong (--batch-size in total, "
            "split), or both.",
            rich_help_panel=SCALE,
        ),
    ] = "weak,strong",
    resume: Resume = False,
) -> None:
    """C5: average epoch time on each device (GPU vs CPU) and the GPU speedup; with --gpus,
    epoch time, images/s, speedup and scaling efficiency on 1, 2, 4 ... GPUs."""
    if gpus is not None:
        section = experiments.compare_gpus(
            ctx.cfg,
            [parse_int("--gpus", g) for g in parse_list("--gpus", gpus)],
            parse_list("--scaling", scaling, SCALINGS),
            device=devices or "cuda",
            cpu_batches=cpu_batches,
            experiment=ctx.experiment,
            resume=resume,
            quiet=ctx.quiet,
        )
        print_section(section)
        return
    default = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    names = parse_list("--devices", default if devices is None else devices)
    for name in names:
        experiments.resolve_device(name, "--devices")
    section = experiments.compare_device(
        ctx.cfg,
        names,
        cpu_batches=cpu_batches,
        experiment=ctx.experiment,
        resume=resume,
        quiet=ctx.quiet,
    )
    print_section(section)


@app.command("launched-run", hidden=True)
def launched_run() -> None:
    """One process of a variant that a comparison launched through torchrun."""
    with user_errors():
        tracking.use_store(None)  # the launcher's, from MLFLOW_TRACKING_URI
        run_launched()


@command("compare-optim", exclude=("optimizer",))
def compare_optim(
    ctx: Context,
    optimizers: Annotated[
        str, typer.Option(help="Optimizers to compare.", rich_help_panel=TRAINING)
    ] = ",".join(OPTIMIZERS),
    resume: Resume = False,
) -> None:
    """C6: SGD, Nesterov, Adagrad, Adadelta, Adam: training time, loss and accuracy."""
    names = parse_list("--optimizers", optimizers, OPTIMIZERS)
    section = experiments.compare_optim(
        ctx.cfg, names, experiment=ctx.experiment, resume=resume, quiet=ctx.quiet
    )
    print_section(section)


@command("no-bn")
def no_bn(
    ctx: Context,
    baseline: Annotated[
        bool,
        typer.Option(
            help="Also train the BN model with the same settings.", rich_help_panel=TRAINING
        ),
    ] = True,
    resume: Resume = False,
) -> None:
    """C7: the model without BatchNorm against the BN model: loss and accuracy."""
    section = experiments.no_bn(
        ctx.cfg, baseline=baseline, experiment=ctx.experiment, resume=resume, quiet=ctx.quiet
    )
    print_section(section)


@command("inspect", train_options=False)
def inspect_(
    ctx: Context,
    optimizers: Annotated[
        str,
        typer.Option(
            help=f"Optimizers to take one step with (Q3, Q4); any of {', '.join(OPTIMIZERS)}.",
            rich_help_panel=TRAINING,
        ),
    ] = "sgd,adam",
    batch_norm: Annotated[
        bool,
        typer.Option(
            "--bn/--no-bn", help="The BN model or the BN-free one.", rich_help_panel=TRAINING
        ),
    ] = True,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Synthetic images in the one training step and the summary's input "
            "(the counts do not depend on it).",
            min=1,
            rich_help_panel=TRAINING,
        ),
    ] = 8,
    seed: Annotated[
        int, typer.Option(help="Seed for weights and the batch.", rich_help_panel=TRAINING)
    ] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the answers, as JSON.", rich_help_panel=RUN)
    ] = False,
) -> None:
    """Q1-Q4: conv layers, the last linear layer's input, parameters, gradients, optimizer state."""
    names = parse_list("--optimizers", optimizers, OPTIMIZERS)
    cfg = TrainConfig(
        dataset="synthetic",
        train_size=batch_size,
        batch_size=batch_size,
        workers=0,
        device="cpu",
        seed=seed,
        batch_norm=batch_norm,
    )
    result = inspection.run_inspection(cfg, tuple(names), experiment=ctx.experiment)
    if as_json:
        typer.echo(result.json())
        return
    for shown in inspection.inspection_tables(result):
        console.print(shown)
    console.print(
        f"Logged as run {result.run_id} (model_summary.txt, tables as CSV, answers.json)."
    )


@command("report", train_options=False)
def report_(
    ctx: Context,
    out: Annotated[
        Path, typer.Option(help="Folder for report.md, the CSVs and the PNGs.", rich_help_panel=RUN)
    ] = Path("report"),
    runs: Annotated[
        str | None,
        typer.Option(
            help="Use these runs instead of the latest finished ones, e.g. C3=<run id>,C6=<run id> "
            f"(items: {', '.join(report.ITEMS)}).",
            rich_help_panel=RUN,
        ),
    ] = None,
) -> None:
    """The study's tables and plots, from the tracking store, into a report folder."""
    run_ids = {}
    for pair in parse_list("--runs", runs) if runs is not None else []:
        item, _, run_id = pair.partition("=")
        if item not in report.ITEMS or not run_id:
            raise ConfigError(
                f"--runs: {pair!r} is not ITEM=RUN_ID with ITEM in {', '.join(report.ITEMS)}"
            )
        if item in run_ids:
            raise ConfigError(f"--runs: {item} is given twice")
        if queries.run_by_id(run_id) is None:
            raise ConfigError(f"--runs: no run {run_id} in {tracking.current_uri()}")
        run_ids[item] = run_id
    sections = report.build_report(run_ids)
    write_and_log_report(sections, out)


def make_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarexpError(f"--out: cannot write the report to {out} ({exc.strerror})") from None


def write_and_log_report(sections: list[report.Section], out: Path) -> None:
    """Write the report folder, print it, and log the folder on a `report` run."""
    try:
        path = report.write_report(sections, out, tracking.current_uri())
    except OSError as exc:
        raise CifarexpError(f"--out: cannot write the report to {out} ({exc.strerror})") from None
    for section in sections:
        if section.missing:
            console.print(f"[bold]{section.heading}[/]: not run yet; run `{section.command}`.")
        else:
            print_section(section)
    labels = Labels("report", "report")
    with tracking.start_run(lab.experiment("report"), tags=labels.tags(), params={"out": str(out)}):
        tracking.log_artifacts(out)
    console.print(f"Report written to {path}.")


@command("lab", train_options=False)
def lab_(
    ctx: Context,
    preset: Annotated[
        str,
        typer.Option(
            help="full: the study's sizes (50,000 images, 5 epochs); quick: a few minutes on a "
            "2-core CPU (512 images, 2 epochs).",
            rich_help_panel=TRAINING,
        ),
    ] = "full",
    dataset: Annotated[
        str, typer.Option(help="cifar10 or synthetic.", rich_help_panel=DATA)
    ] = "cifar10",
    data_dir: Annotated[
        str, typer.Option(help="Where CIFAR-10 is.", rich_help_panel=DATA)
    ] = "./data",
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=TRAINING)
    ] = "auto",
    out: Annotated[Path, typer.Option(help="Folder for the report.", rich_help_panel=RUN)] = Path(
        "report"
    ),
) -> None:
    """The whole study, from nothing to every answer: inspect, time, sweep-workers,
    compare-device, compare-optim, no-bn (with the best worker count), then the report."""
    if preset not in lab.PRESETS:
        raise ConfigError(f"--preset: unknown {preset!r}; choose from {', '.join(lab.PRESETS)}")
    base = TrainConfig(dataset=dataset, data_dir=data_dir, device=device)
    make_out_dir(out)  # a bad --out fails now, not after the whole study
    sections = lab.run_lab(base, preset, quiet=ctx.quiet)
    write_and_log_report(sections, out)


def main() -> None:
    # SIGTERM (`kill`, a scheduler's time limit) ends runs as Ctrl-C does: KILLED, epochs kept.
    # Under torchrun the launcher's signals mean more: see distributed.handle_stops.
    if distributed.launched():
        distributed.handle_stops()
    else:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    finally:
        distributed.leave()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
