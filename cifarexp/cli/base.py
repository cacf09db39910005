"""The `cifarexp` command line: the Typer app and what its commands share: one line for
every error, the session a command opens, its config built from its options, its answer
built from the store, logged on its run and printed.

Each command lists its options (the aliases of `options`) and imports what it runs only
when it runs, so that `--help` and a usage error answer at once.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cifarexp import __version__, processes
from cifarexp.cli.options import Sets
from cifarexp.config import (
    STUDY_BATCH,
    ConfigError,
    TrainConfig,
    UserError,
    can_compile,
    did_you_mean,
    fast_settings,
    flag,
    study_lr,
)

if TYPE_CHECKING:
    from analysis import report
    from cifarexp.study.session import Session
    from cifarexp.tracking import Tracker


def _keep_option_names_whole() -> None:
    """--help never cuts an option's name: in a narrow terminal (80 columns) rich shrank
    every column of typer's options table alike ("--persistent-wor…"); the columns that
    hold option names now keep their width, and the help text beside them wraps instead.
    A switch's negative name goes under its name, not in a column of its own beside it,
    which left the help text a dozen columns at 80."""
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils

    class OptionsTable(Table):
        def add_row(self, *renderables: Any, **settings: Any) -> None:
            # typer's row: [required,] name, short name, negative name, its short, type, help
            name, negative = renderables[-6], renderables[-4]
            if str(negative):
                renderables = list(renderables)
                renderables[-6] = Text.assemble(name, "\n", negative)
                renderables[-4] = ""
            super().add_row(*renderables, **settings)
            for column, cell in zip(self.columns, renderables, strict=False):
                if str(cell).startswith("-"):  # --name, -h, --no-name
                    column.no_wrap = True
                else:  # a word too long for its column folds onto the next line
                    column.overflow = "fold"

    if getattr(rich_utils, "Table", None) is Table:
        rich_utils.Table = OptionsTable


_keep_option_names_whole()

app = typer.Typer(
    help="Where the time of a ResNet-18 / CIFAR-10 training run goes, tracked with MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# The options that say how a command runs rather than what it trains, and their defaults.
SESSION_OPTIONS: dict[str, Any] = {
    "tracking_uri": None,
    "experiment": None,
    "quiet": False,
    "device": "auto",
    "nproc": 1,
    "system_metrics": True,
    "resume": False,
}


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


def command(name: str, *, under_torchrun: bool = False, hidden: bool = False) -> Callable:
    """Register `fn` as the command `name` (`hidden` from --help). Errors meant for the user
    become one line: bad input exits 2, runtime failures exit 1, a stop signal 128 + its
    number (Ctrl-C 130, SIGTERM 143); never a traceback. Only an `under_torchrun` command
    runs under torchrun (or --nproc N)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)  # typer reads fn's own signature through it
        def run(*args: Any, **kwargs: Any) -> Any:
            with user_errors(kwargs.get("ctx")):
                if processes.launched() and not under_torchrun:
                    raise ConfigError(
                        f"{name} does not run under torchrun; run it as one process (the "
                        "`time` command runs under torchrun and --nproc)"
                    )
                return fn(*args, **kwargs)

        return app.command(name, hidden=hidden, help=reflowed(fn.__doc__ or ""))(run)

    return decorate


def reflowed(doc: str) -> str:
    """A docstring as --help shows it: each paragraph one line, which the terminal wraps
    (typer would keep the docstring's own line breaks)."""
    return "\n\n".join(" ".join(part.split()) for part in inspect.cleandoc(doc).split("\n\n"))


# ---------------------------------------------------------------- a command's session


def open_session(ctx: typer.Context, **given: Any) -> Session:
    """The command's session, from its options (SESSION_OPTIONS) or `given`: relaunched
    under torchrun for --nproc N; else this process's world, its tracker (the store checked
    up front), its experiment and its progress display. Kept as the context's `obj`."""
    options = {**SESSION_OPTIONS, **(ctx.params | given)}
    if options["nproc"] > 1 and not processes.launched():
        processes.relaunch(options["nproc"], sys.argv[1:])
    from cifarexp.cli import console
    from cifarexp.study.session import Session
    from cifarexp.tracking import Tracker, check_experiment
    from cifarexp.training.distributed import world_from_environment

    if options["experiment"] is not None:
        check_experiment(options["experiment"])
    console.show_notices()
    world = world_from_environment(options["device"])
    tracker = Tracker.open(options["tracking_uri"], world, system_metrics=options["system_metrics"])
    progress = None if options["quiet"] else console.progress
    ctx.obj = Session(tracker, options["experiment"], progress, options["resume"])
    return ctx.obj


def training_config(ctx: typer.Context, session: Session) -> TrainConfig:
    """The TrainConfig of the command's options that set a config field (`options.Sets`),
    with --fast's settings for the device where an option was not given; workers "best" is
    resolved from the session's store. A batch other than the study's without --lr is
    told the lr of the study's step per image."""
    options = {field: name for name, field in _config_options(ctx.command.callback)}
    given = {field: ctx.params[name] for field, name in options.items()}
    if ctx.params.get("fast"):  # the fastest settings, but for the options given
        from cifarexp.training.engine import resolve_device

        device_type = resolve_device(given.get("device", "auto")).type
        given_compile = "compile" in options and _given(ctx, options["compile"])
        compile_mode = given["compile"] if given_compile else None
        compiles = can_compile(device_type)
        fast = fast_settings(
            device_type,
            given["optimizer"],
            several=processes.launched(),
            compile=compile_mode,
            compiles=compiles,
        )
        if not given_compile and not compiles:
            session.say_once("Triton is not installed: --fast runs without --compile")
        for field, value in fast.items():
            if not _given(ctx, options[field]):
                given[field] = value
    workers = given.get("workers")
    if workers == "best":
        from cifarexp.study.comparisons import resolve_best_workers

        device = given.get("device", "auto")
        given["workers"] = resolve_best_workers(session.tracker, device, given["dataset"])
    elif isinstance(workers, str):
        given["workers"] = parse_int("workers", workers)
    cfg = TrainConfig(**given)
    if cfg.batch_size != STUDY_BATCH and "lr" in options and not _given(ctx, options["lr"]):
        session.say_once(
            f"lr {cfg.lr:g} is the study's for batch {STUDY_BATCH}; at {flag('batch_size')} "
            f"{cfg.batch_size} the same step per image is {flag('lr')} "
            f"{study_lr(cfg.batch_size):g}."
        )
    return cfg


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option `name` was given (on the command line or by its env var)."""
    source = ctx.get_parameter_source(name)  # typer may vendor click's enum: compare names
    return source is not None and source.name != "DEFAULT"


@functools.cache
def _config_options(fn: Callable) -> tuple[tuple[str, str], ...]:
    """(parameter, config field) for each parameter of `fn` that sets a config field."""
    hints = typing.get_type_hints(fn, include_extras=True)
    return tuple(
        (name, mark.field)
        for name, hint in hints.items()
        for mark in getattr(hint, "__metadata__", ())
        if isinstance(mark, Sets)
    )


def answer(session: Session, item: str, run_id: str | None, *, show: bool = True) -> None:
    """The answer of `item`, built from the store (`analysis`), logged onto its run
    `run_id` (its description; a comparison's parent also gets its tables, plots and
    headline metrics) if this command ran it, and, if `show`, printed with where the run
    is. Nothing on a rank of a torchrun job that does not write (no run id)."""
    if run_id is None:
        return
    from analysis import report
    from cifarexp.cli.console import print_answer

    section = report.summarize(item, run_id)
    if session.tracker.ended_here(run_id):  # else it finished before (--resume): logged then
        _log_answer(session.tracker, item, run_id, section)
    if show:
        print_answer(section)


def _log_answer(tracker: Tracker, item: str, run_id: str, section: report.Section) -> None:
    from cifarexp.study.catalogue import ITEMS, description

    if ITEMS[item].compares:
        tracker.log_answer(
            run_id,
            tables=section.tables,
            figures=section.figures,
            notes="\n\n".join([*section.notes, section.text]).strip(),
            metrics=section.metrics(),
            tags=section.tags(),
        )
    tracker.describe(run_id, description(item, section.answer, section.settings, section.notes))


# ---------------------------------------------------------------- parsing and errors


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
        typo = did_you_mean(unknown[0], allowed or [])
        raise ConfigError(
            f"unknown {unknown[0]!r}{typo}; choose from {', '.join(allowed or [])}", field
        )
    return items


def _message(exc: UserError) -> str:
    return f"{flag(exc.field)}: {exc.message}" if exc.field else exc.message


@contextmanager
def user_errors(ctx: typer.Context | None = None) -> Iterator[None]:
    """Turns the project's errors into one clear line and an exit code; a stop says what it
    left in the store, as the session that `ctx` holds saw it."""
    try:
        yield
    except ConfigError as exc:
        raise typer.BadParameter(_message(exc)) from None
    except UserError as exc:
        _print_error(_message(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as stop:
        _print_interrupted(ctx.obj if ctx is not None else None, stop)
        raise typer.Exit(processes.exit_code(stop)) from None
    except Exception as exc:
        from cifarexp.tracking import STORE_ERRORS, store_error

        if not isinstance(exc, STORE_ERRORS):
            raise
        _print_error(store_error(exc))
        raise typer.Exit(1) from None
    else:
        _check_output(ctx.obj if ctx is not None else None)


def _check_output(session: Session | None) -> None:
    """A command whose output could not be written (stdout on a full disk, or a pipe closed
    early) did its work, and its runs ended as they should: it says so on stderr (if that
    can be written) and exits 1, the output being lost."""
    from cifarexp.cli.console import lost_output

    lost = lost_output()
    if lost is None:
        return
    ended = session.tracker.last_ended() if session is not None else None
    runs = f"run {ended[0]} is {ended[1]}" if ended else "nothing was lost in the store"
    _print_error(
        f"cannot write the output ({lost.strerror or lost}): what this command printed is "
        f"lost; {runs}"
    )
    raise typer.Exit(1)


def _print_error(message: str) -> None:
    from rich.markup import escape

    from cifarexp.cli.console import err_console

    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _print_interrupted(session: Session | None, stop: KeyboardInterrupt) -> None:
    """What a stop left in the store, as the session's tracker saw it (None: stopped before
    the session opened); the signal named unless it was Ctrl-C's. A rank that logs nothing
    (not rank 0 of a torchrun job) says nothing: rank 0 says it."""
    from cifarexp.cli.console import err_console

    if session is not None and not session.tracker.writes:
        return
    name = processes.signal_name(stop)
    what = "Interrupted" if name == "SIGINT" else f"Interrupted by {name}"
    ended = session.tracker.last_ended() if session is not None else None
    if ended is None:
        err_console.print(f"{what} before a run started: no run was logged.")
    elif ended[1] == "FINISHED":
        err_console.print(f"{what} after run {ended[0]} had FINISHED; nothing is lost.")
    else:
        err_console.print(f"{what}: finished epochs are in the store; the run is {ended[1]}.")


def main() -> None:
    from cifarexp.cli.console import guard_output

    guard_output()  # a terminal that cannot be written never fails a run (see _check_output)
    under_torchrun = processes.launched()
    processes.handle_stops(under_torchrun=under_torchrun)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 2 and "MLFLOW_RUN_ID" in os.environ:  # `mlflow run`'s run exists already
            from cifarexp.tracking.lifecycle import fail_project_run

            fail_project_run(f"usage error: cifarexp {' '.join(sys.argv[1:])}")
        raise
    finally:
        if under_torchrun:
            from cifarexp.training import distributed

            distributed.leave()  # as PyTorch asks before a process of a group exits
