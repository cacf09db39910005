"""The `cifarexp` command line: parses options, builds configs, delegates, prints the answer."""

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import torch
import typer

from analysis import queries, tables
from cifarexp import experiments, inspection, tracking
from cifarexp.config import (
    COMPILE_MODES,
    DATASETS,
    LOADERS,
    PRECISIONS,
    TIMINGS,
    CifarexpError,
    ConfigError,
    TrainConfig,
)
from cifarexp.console import console, err_console, render
from cifarexp.jobs import Labels, run_training
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
    name: str, *, train_options: bool = True, exclude: tuple[str, ...] = (), **defaults: Any
) -> Callable:
    """Register `fn` as a command taking its own options plus the shared ones (less
    `exclude`, with `defaults` changed).

    `fn` receives a validated `ctx: Context`. Errors meant for the user become one line:
    bad input exits 2, runtime failures exit 1, Ctrl-C exits 130; never a traceback.
    """

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "ctx"]
        skip = {q.name for q in own} | set(exclude)
        shared = [
            p.replace(default=defaults.get(p.name, p.default))
            for p in (TRAIN_OPTIONS if train_options else []) + RUN_OPTIONS
            if p.name not in skip
        ]

        @functools.wraps(fn)
        def wrapper(**values: Any) -> Any:
            with user_errors():
                run = {p.name: values.pop(p.name) for p in RUN_OPTIONS}
                tracking.use_store(run["tracking_uri"])
                config = {p.name: values.pop(p.name) for p in shared if p.name in values}
                cfg = make_config(config) if train_options else TrainConfig()
                ctx = Context(name, cfg, run["experiment"] or f"cifarexp-{name}", run["quiet"])
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
        err_console.print(f"[bold red]Error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("Interrupted: finished epochs are in the store; the run is KILLED.")
        raise typer.Exit(130) from None


@command("time")
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
    title = f"C2: epoch times on {run.device} ({ctx.cfg.dataset}, {ctx.cfg.workers} workers)"
    console.print(render(tables.c2_epochs(queries.exercise("C2", run_id=run.run_id)), title))
    console.print(f"Logged as run {run.run_id}.")


Resume = Annotated[
    bool,
    typer.Option(
        help="Continue the previous run with the same settings if it did not finish: reuse "
        "its finished variants, run the rest.",
        rich_help_panel=RUN,
    ),
]


def print_outcome(outcome: experiments.Outcome, titles: dict[str, str]) -> None:
    """The command's tables, notes and where they are logged."""
    for name, table in outcome.tables.items():
        if not table.empty:
            console.print(render(table, titles.get(name, name)))
    for note in outcome.notes:
        console.print(note, highlight=False)
    console.print(f"Logged on parent run {outcome.parent_id} (tables as CSV, plots as PNG).")


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
    resume: Resume = False,
) -> None:
    """C3, C4: data-loading time per DataLoader worker count, the best count, 1 vs best."""
    counts = None
    if workers != "auto":
        counts = [parse_int("--workers", w) for w in parse_list("--workers", workers)]
        if any(c < 0 for c in counts):
            raise ConfigError(f"--workers: counts must be >= 0, got {workers!r}")
    outcome = experiments.sweep_workers(
        ctx.cfg, counts, experiment=ctx.experiment, resume=resume, quiet=ctx.quiet
    )
    print_outcome(
        outcome,
        {
            "c3_workers": f"C3: epoch times per worker count ({ctx.cfg.dataset})",
            "c4_one_vs_best": "C4: 1 worker vs the best count",
        },
    )


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
    resume: Resume = False,
) -> None:
    """C5: average epoch time on each device (GPU vs CPU) and the GPU speedup."""
    default = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    names = parse_list("--devices", devices or default)
    for name in names:
        experiments.resolve_device(name, "--devices")
    outcome = experiments.compare_device(
        ctx.cfg,
        names,
        cpu_batches=cpu_batches,
        experiment=ctx.experiment,
        resume=resume,
        quiet=ctx.quiet,
    )
    print_outcome(outcome, {"c5_devices": f"C5: average epoch time per device ({ctx.cfg.dataset})"})


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
    outcome = experiments.compare_optim(
        ctx.cfg, names, experiment=ctx.experiment, resume=resume, quiet=ctx.quiet
    )
    print_outcome(outcome, {"c6_optimizers": f"C6: optimizers ({ctx.cfg.dataset})"})


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
    outcome = experiments.no_bn(
        ctx.cfg, baseline=baseline, experiment=ctx.experiment, resume=resume, quiet=ctx.quiet
    )
    print_outcome(outcome, {"c7_batch_norm": f"C7: with and without BatchNorm ({ctx.cfg.dataset})"})


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


def main() -> None:
    app()
