"""What the user sees in the terminal: progress, notices, the study's tables."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cifarexp.config import plural

if TYPE_CHECKING:
    import pandas as pd

    from analysis.compare import Comparison
    from analysis.report import Section
    from cifarexp.study.inspection import Inspection
    from cifarexp.training.anatomy import Count
    from cifarexp.training.engine import EpochResult
    from cifarexp.training.profiling import Profile


PIPED_WIDTH = 160  # off a terminal, a table's long cells wrap beyond this; headers never cut


class _Console(Console):
    """A rich Console that, off a terminal (a pipe, a log file, CI), draws a table as wide as
    it needs: drawn at the default 80 columns, its title and headers were cut ("data-loa…
    s", a blank "estimated" header). In a terminal a table fits the terminal, as rich does."""

    def print(self, *objects: object, **settings: object) -> None:
        tables = [o for o in objects if isinstance(o, Table)]
        if not tables or self.is_terminal or "width" in settings:
            super().print(*objects, **settings)
            return
        from rich.measure import Measurement

        wide = self.options.update(width=10_000)
        sizes = [Measurement.get(self, wide, t) for t in tables]
        least = max(size.minimum for size in sizes)  # below it, headers are cut
        most = max(size.maximum for size in sizes)  # every cell on one line
        shown = self._width
        self.width = max(self.width, min(most, max(least, PIPED_WIDTH)))
        try:
            super().print(*objects, **settings)
        finally:
            self._width = shown


console = _Console()
err_console = _Console(stderr=True)  # both write to sys.stdout / sys.stderr as they are now


# ---------------------------------------------------------------- output that cannot be written


class GuardedStream:
    """A standard stream (stdout, stderr) whose writes never fail: the first error (a full
    disk, a pipe whose reader has gone, as after `| head -1`) is kept in `lost`, and the
    stream's file descriptor is pointed at /dev/null, so that nothing written later fails
    either (Python's own flush at exit included). Printing is never why a run fails."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.lost: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            self._lose(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self._lose(exc)

    def _lose(self, exc: OSError) -> None:
        self.lost = self.lost or exc
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)
        with contextlib.suppress(OSError):
            self.stream.flush()  # what the stream still holds goes to /dev/null

    def __getattr__(self, name: str) -> object:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


def guard_output() -> None:
    """Guard this process's stdout and stderr (see GuardedStream); once per process."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))


def lost_output() -> OSError | None:
    """Why this process's stdout could not be written, if it could not."""
    return getattr(sys.stdout, "lost", None)


# ---------------------------------------------------------------- notices


class _Notices(logging.Handler):
    """cifarexp's notices and Python's warnings, one clean line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        style = "yellow" if record.levelno >= logging.WARNING else "dim"
        text = record.getMessage()
        if record.name == "py.warnings":  # "path:line: Category: message\n  code" -> message
            text = text.splitlines()[0].split(": ", 2)[-1]
        err_console.print(escape(text), style=style, highlight=False, soft_wrap=True)


def show_notices() -> None:
    """Route the `cifarexp` loggers and Python's warnings to the terminal, one line each."""
    handler = _Notices()
    for name in ("cifarexp", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logging.captureWarnings(True)
    warnings.simplefilter("default", UserWarning)


# ---------------------------------------------------------------- progress


class EpochProgress:
    """A run's progress: in a terminal, a bar per epoch (epoch i/N, batches per second, the
    running mean loss and accuracy of the epoch so far); elsewhere (a pipe, CI, `mlflow
    run`) one line per finished epoch. A variant of a comparison ends with one line."""

    def __init__(self, label: str, epochs: int, batches: int, progress: Progress | None):
        self.label, self.epochs, self.batches, self.progress = label, epochs, batches, progress
        self.task: int | None = None
        self.epoch = 0
        self.loss_sum = self.acc_sum = 0.0
        self.started = time.perf_counter()
        self.last: EpochResult | None = None

    def _prefix(self) -> str:
        return f"{self.label}  " if self.label else ""

    def on_batch(self, index: int, loss: float, acc: float) -> None:
        if self.progress is None:
            return
        if index == 0:
            self.epoch += 1
            self.loss_sum = self.acc_sum = 0.0
            description = f"{self._prefix()}epoch {self.epoch}/{self.epochs}"
            self.task = self.progress.add_task(description, total=self.batches, loss=0.0, acc=0.0)
        self.loss_sum += loss
        self.acc_sum += acc
        seen = index + 1
        self.progress.update(
            self.task, completed=seen, loss=self.loss_sum / seen, acc=self.acc_sum / seen
        )

    def on_epoch(self, result: EpochResult) -> None:
        """One line per epoch (a bar's description, in a terminal); a partial epoch
        (--cpu-batches) says so, and the whole epoch it estimates."""
        self.last = result
        partial = _partial(result, self.batches)
        if self.progress is not None:
            if partial and self.task is not None:
                description = f"{self._prefix()}epoch {result.epoch}/{self.epochs} {partial}"
                self.progress.update(self.task, description=description)
            return
        times = (
            f"data {result.data_time_s:.2f} s  train {result.train_time_s:.2f} s  "
            f"total {result.epoch_time_s:.2f} s"
        )
        if partial:
            times = f"{partial}: {times}; whole epoch {_estimate(result)}"
        console.print(
            f"{self._prefix()}epoch {result.epoch}/{self.epochs}  {times}  "
            f"loss {result.train_loss:.3f}  acc {result.train_acc:.1%}{_others(result)}",
            highlight=False,
            soft_wrap=True,  # one line per epoch, however narrow the log
        )

    def on_profile(self, profile: Profile) -> None:
        """The profile's top operators and kernels, its split and, for a comparison's
        variant, its verdict (a `time` run's answer ends with it)."""
        from cifarexp.training.profiling import ACTIVE_STEPS, split_text

        steps = f"{ACTIVE_STEPS} recorded steps of {profile.step_ms:.1f} ms"
        title = f"{self._prefix()}profile: {steps}"
        console.print(render(profile.summary, title))
        console.print(f"Split: {split_text(profile.split)}.", highlight=False)
        if profile.kernels:
            shares = ", ".join(f"{kind} {share:.0%}" for kind, share in profile.kernels.items())
            console.print(f"Kernel time: {shares}.", highlight=False)
        if self.label:
            console.print(f"Verdict: {profile.verdict}.", style="bold", highlight=False)
        console.print(f"(the profile took {profile.profile_s:.1f} s)", style="dim", highlight=False)

    def done(self) -> None:
        """One line for a finished variant."""
        if self.label and self.last is not None:
            seconds = time.perf_counter() - self.started
            epochs = plural(self.last.epoch, "epoch")
            if self.last.estimated_epoch_s is not None:
                n = self.last.epoch
                each = "1 batch" if self.batches == 1 else f"{self.batches} batches"
                epochs = f"{n} partial epoch{'s' * (n != 1)} ({each} each)"
            console.print(
                f"{self.label}: {epochs} in {seconds:.1f} s, final loss "
                f"{self.last.train_loss:.3f}, accuracy {self.last.train_acc:.1%}",
                style="bold",
                highlight=False,
                soft_wrap=True,
            )


def _others(result: EpochResult) -> str:
    """The CPUs other processes used while the epoch ran, where measured."""
    load = result.other_cpu_load_cpus
    return "" if load is None else f"  other processes {load:.1f} CPUs"


def _partial(result: EpochResult, batches: int) -> str:
    """ "partial (first N batches)" for an epoch cut short, else nothing."""
    if result.estimated_epoch_s is None:
        return ""
    return f"partial (first {_batches(batches)})"


def _batches(n: int) -> str:
    return "batch" if n == 1 else f"{n} batches"


def _estimate(result: EpochResult) -> str:
    """The whole epoch a partial one estimates, with its range where it has one."""
    text = f"estimated {result.estimated_epoch_s:.2f} s"
    if result.estimate_low_s is not None and result.estimate_high_s is not None:
        text += f" ({result.estimate_low_s:.2f}–{result.estimate_high_s:.2f} s)"
    return text


class _Rate(ProgressColumn):
    """Batches per second as rich estimates them from the bar's updates; seconds per batch
    where a batch takes longer than a second ("0.1 batch/s" reads as "10.0 s/batch")."""

    def render(self, task: Task) -> Text:
        return Text(rate_text(task.speed))


def rate_text(speed: float | None) -> str:
    """A progress bar's speed in batches per second, as the user reads it best."""
    if not speed:
        return "      batch/s"
    if speed < 1:
        return f"{1 / speed:5.1f} s/batch"
    return f"{speed:5.1f} batch/s"


@contextmanager
def progress(label: str, epochs: int, batches: int) -> Iterator[EpochProgress]:
    """Shows one run's progress (see EpochProgress)."""
    if not console.is_terminal:
        shown = EpochProgress(label, epochs, batches, None)
        yield shown
        shown.done()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        shown = EpochProgress(label, epochs, batches, bars)
        yield shown
    shown.done()


# ---------------------------------------------------------------- tables


def render(frame: pd.DataFrame, title: str, *, footer: Sequence[Sequence[object]] = ()) -> Table:
    """A rich table of a DataFrame, its values formatted as the report formats them."""
    from analysis.folder import displayed, format_value

    table = Table(title=title, title_justify="left")
    columns, right, rows = displayed(frame)  # a timing with its range as one column
    for column, numbers in zip(columns, right, strict=True):
        table.add_column(column, justify="right" if numbers else "left")
    for row in rows:
        table.add_row(*row)
    if footer:
        table.add_section()
    for row in footer:
        table.add_row(
            *(format_value(name, value) for name, value in zip(frame.columns, row, strict=True)),
            style="bold",
        )
    return table


def print_where(run_id: str | None, *, ui: bool = True) -> None:
    """Where the run is: its experiment, the MLflow UI links and, if `ui`, the command that
    opens the UI."""
    if run_id is None:  # a rank that does not write
        return
    from cifarexp import tracking

    for line in tracking.where(run_id, ui=ui):
        console.print(line, style="dim", highlight=False, soft_wrap=True)


def print_section(section: Section) -> None:
    """A section's tables and text, and the run they are logged on."""
    from cifarexp.study.catalogue import TITLES

    for note in section.notes:
        console.print(note, style="bold yellow", highlight=False)
    for name, table in section.tables.items():
        if not table.empty:
            console.print(render(table, f"{TITLES[name]} ({section.dataset})"))
    answer = section.answer  # the sentence the run's description holds
    if section.text and section.text not in answer:
        console.print(section.text, highlight=False)
    if answer:
        console.print(answer, style="bold", highlight=False)
    console.print(f"Source: {section.source}.", style="dim", highlight=False)


def print_answer(section: Section) -> None:
    """A command's answer: its section, then where its run is."""
    print_section(section)
    print_where(section.run_id)


def print_comparison(comparison: Comparison, threshold: float | None, *, quiet: bool) -> None:
    """Two studies side by side: what each ran on and every figure of both (unless `quiet`),
    the verdict, and one line per time slower beyond the threshold and the noise."""
    from analysis.compare import CAPTION
    from cifarexp.study.catalogue import TITLES

    for study in [] if quiet else (comparison.baseline, comparison.yours):
        console.print(study.about(), style="dim", highlight=False, soft_wrap=True)
    if not quiet:
        table = render(comparison.table(), TITLES["comparison"])
        table.caption, table.caption_justify = CAPTION, "left"
        console.print(table)
    console.print(comparison.summary(threshold), style="bold", highlight=False, soft_wrap=True)
    for line in comparison.slower(threshold):
        console.print(line, style="bold red", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- Q1-Q4


def inspection_tables(result: Inspection) -> list[Table | str]:
    """Q1 as a table, Q2 as a line, Q3/Q4 as one table with the optimizers side by side,
    then in words what is the same for the optimizers and what is not."""
    model = "BN model" if result.cfg.batch_norm else "BN-free model"
    name, in_features, out_features = result.last_linear
    q2 = (
        f"[bold]Q2[/]: the last linear layer, {name} = Linear({in_features} → {out_features}), "
        f"takes a vector of [bold]{in_features}[/] features."
    )
    frame = _q3_q4_frame(result)
    shown: list[Table | str] = [_q1_table(result, model), q2, _q3_q4_table(frame, result, model)]
    if len(result.optimizers) > 1:
        shown.append(_comparison(frame, result))
    return shown


def _q1_table(result: Inspection, model: str) -> Table:
    import pandas as pd

    rows = []
    for where, convs in result.convs.groupby("where", sort=False):
        names = list(convs["module"])
        listed = ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]}"
        kernels = ", ".join(convs["kernel"].unique())
        rows.append({"where": where, "layers": len(names), "kernel": kernels, "modules": listed})
    frame = pd.DataFrame(rows)
    title = f"Q1: convolutional layers (nn.Conv2d modules) of {result.cfg.model}, {model}"
    return render(frame, title, footer=[["total", result.conv_count.total, "", ""]])


def _q3_q4_frame(result: Inspection) -> pd.DataFrame:
    """One row per quantity, one column per optimizer, and (for several) whether they agree."""
    import pandas as pd

    total = ["state: total", "state: MiB"]  # last, after every optimizer's state keys
    names = dict.fromkeys(name for a in result.optimizers for name in a.quantities())
    rows = [name for name in names if name not in total] + total
    columns = {
        a.optimizer: {
            **{name: _cell(count) for name, count in a.quantities().items()},
            "state: MiB": f"{a.state_total.mib:.2f}",
        }
        for a in result.optimizers
    }
    frame = pd.DataFrame(columns).reindex(rows).fillna("–")  # – where an optimizer has no such key
    if len(columns) > 1:
        frame["compared"] = [
            "same" if row.nunique() == 1 else "differs" for _, row in frame.iterrows()
        ]
    return frame.rename_axis("quantity").reset_index()


def _q3_q4_table(frame: pd.DataFrame, result: Inspection, model: str) -> Table:
    title = (
        f"Q3/Q4: after one forward/backward and optimizer step, {model}, "
        f"{result.cfg.dataset} batch of {result.cfg.batch_size}"
    )
    table = render(frame, title)
    for column in table.columns[1:]:
        column.justify = "right"
    table.caption = (
        f"cells: elements (tensors); the parameters take {result.params.trainable.mib:.2f} MiB"
    )
    return table


def _comparison(frame: pd.DataFrame, result: Inspection) -> str:
    """What is the same for every optimizer and what is not, in words."""
    is_state = frame["quantity"].str.startswith("state")
    same = list(frame.loc[~is_state & (frame["compared"] == "same"), "quantity"])
    differs = list(frame.loc[~is_state & (frame["compared"] == "differs"), "quantity"])
    state_same = bool((frame.loc[is_state, "compared"] == "same").all())
    (same if state_same else differs).append("the optimizer state")
    names = [a.optimizer for a in result.optimizers]
    keeps = "; ".join(
        f"{a.optimizer} keeps {', '.join(a.state) or 'nothing'}" for a in result.optimizers
    )
    return (
        f"[bold]Same[/] for {', '.join(names[:-1])} and {names[-1]}: "
        f"{', '.join(same) or 'nothing'}.\n"
        f"[bold]Different[/]: {', '.join(differs) or 'nothing'}. Per parameter, {keeps}."
    )


def _cell(count: Count) -> str:
    return f"{count.elements:,} ({count.tensors})" if count.tensors else "none"
