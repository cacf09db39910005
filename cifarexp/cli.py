"""The `cifarexp` command line: parses options, builds configs, delegates, prints the answer."""

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from cifarexp import tracking
from cifarexp.config import DATASETS, CifarexpError, ConfigError, TrainConfig
from cifarexp.console import console, epochs_table, err_console
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


def command(name: str, *, train_options: bool = True, **defaults: Any) -> Callable:
    """Register `fn` as a command taking its own options plus the shared ones.

    `fn` receives a validated `ctx: Context`. Errors meant for the user become one line:
    bad input exits 2, runtime failures exit 1, Ctrl-C exits 130; never a traceback.
    """

    def decorate(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "ctx"]
        shared = [
            p.replace(default=defaults.get(p.name, p.default))
            for p in (TRAIN_OPTIONS if train_options else []) + RUN_OPTIONS
            if p.name not in {q.name for q in own}
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
    if isinstance(workers, str):
        values["workers"] = parse_int("--workers", workers)
    return TrainConfig(**values)


def parse_int(option: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not a whole number") from None


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
    title = (
        f"C2: epoch times on {run.device} ({ctx.cfg.dataset}, {ctx.cfg.workers} workers, "
        f"run {run.run_id})"
    )
    console.print(epochs_table(run.results, title))


def main() -> None:
    app()
