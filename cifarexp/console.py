"""What the user sees in the terminal: progress bars and rich tables."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from analysis.report import format_value
from cifarexp.engine import OnBatch

console = Console()
err_console = Console(stderr=True)


class EpochProgress:
    """A progress bar per epoch (only when attached to a terminal and not quiet)."""

    def __init__(self, progress: Progress, label: str, batches: int) -> None:
        self._progress, self._label, self._batches = progress, label, batches
        self._task: int | None = None
        self._epoch = 0

    def on_batch(self, index: int, loss: float, acc: float) -> None:
        if index == 0:
            self._epoch += 1
            self._task = self._progress.add_task(
                f"{self._label}epoch {self._epoch}", total=self._batches, loss=loss, acc=acc
            )
        if index % 10 == 0 or index + 1 == self._batches:  # redraws are not free
            self._progress.update(self._task, completed=index + 1, loss=loss, acc=acc)


@contextmanager
def epoch_progress(label: str, batches: int, *, quiet: bool = False) -> Iterator[OnBatch | None]:
    """Yields an on_batch callback driving the bars, or None when there is nothing to show."""
    if quiet or not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.1%}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield EpochProgress(progress, f"{label} " if label else "", batches).on_batch


def render(frame: pd.DataFrame, title: str, *, footer: Sequence[Sequence[object]] = ()) -> Table:
    """A rich table of a DataFrame: seconds with 2 decimals, fractions named accuracy as %."""
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), justify="right" if _is_numeric(frame[column]) else "left")
    for row in frame.itertuples(index=False):
        table.add_row(
            *(format_value(name, value) for name, value in zip(frame.columns, row, strict=True))
        )
    if footer:
        table.add_section()
    for row in footer:
        table.add_row(
            *(format_value(name, value) for name, value in zip(frame.columns, row, strict=True)),
            style="bold",
        )
    return table


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series)
