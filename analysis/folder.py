"""A folder of markdown, CSVs and PNGs (the report, a comparison), written whole or not at
all; the markdown and the numbers as the terminal shows them."""

from __future__ import annotations

import errno
import io
import numbers
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.noise import HIGH, LOW  # a timing's range over the epochs
from cifarexp import tracking
from cifarexp.config import ConfigError

FOLDER_FILE = re.compile(r"(report|compare)\.(md|html)|\w+\.(csv|png)")  # what such a folder holds


def check_out(out: Path, store_folders: list[Path]) -> Path:
    """The folder `out` names (links followed), where a report or a comparison can be
    written (checked before anything runs): a ConfigError where it cannot be used (it is,
    holds or lies in one of `store_folders`, the store's own; it holds files that are no
    report's, which the report would replace); an OSError where it cannot be written."""
    target = out.resolve()
    for folder in map(Path.resolve, store_folders):
        if target == folder or folder in target.parents or target in folder.parents:
            raise ConfigError(
                f"{out} is, or holds, or lies in {folder}, where the tracking store keeps "
                "its runs' files (the report is logged there too); give another folder",
                "out",
            )
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{out} is a file, not a folder", "out")
    if target.exists():
        others = [p.name for p in target.iterdir() if not FOLDER_FILE.fullmatch(p.name)]
        if others:
            raise ConfigError(
                f"{out} holds {others[0]!r}, which is no part of a report, and the report "
                "replaces the whole folder; give a new folder, or one an earlier report made",
                "out",
            )
        for path in [target, *target.iterdir()]:  # replaced, or removed, as a whole
            if not os.access(path, os.W_OK):
                raise PermissionError(errno.EACCES, f"{path} cannot be replaced")
    target.parent.mkdir(parents=True, exist_ok=True)
    _new_folder(target).rmdir()  # the report can be made beside it
    return target


def write_folder(out: Path, files: Mapping[str, bytes]) -> None:
    """`files` (name -> content) as the folder `out`, whole or not at all: written into a new
    folder beside `out`, each file flushed to the disk, then moved into place (an earlier
    folder there is replaced), so that a full disk or a stop halfway leaves the earlier
    folder, or nothing, never half of one."""
    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_folder(target)
    try:
        for name, data in files.items():
            _save(staging / name, data)
        _sync(staging)
        _replace(target, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def csv_bytes(table: pd.DataFrame) -> bytes:
    """A table as CSV, numbers as numbers rounded once (`tracking.rounded`)."""
    return tracking.csv_text(table).encode()


def png_bytes(figure: Figure) -> bytes:
    png = io.BytesIO()
    figure.savefig(png, dpi=110, format="png")
    return png.getvalue()


def _new_folder(target: Path) -> Path:
    """A new, hidden folder beside `target` (the same file system: it moves into place)."""
    folder = target.with_name(f".{target.name}.new-{os.getpid()}-{secrets.token_hex(4)}")
    folder.mkdir()
    return folder


def _save(path: Path, data: bytes) -> None:
    """`data` into the new file `path`, on the disk before it returns (a disk that is full
    says so here, not later)."""
    with path.open("xb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace(target: Path, new: Path) -> None:
    """Move the folder `new` to `target`; an earlier folder there is moved aside first, then
    removed (put back if `new` cannot take its place)."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table, numbers formatted as in the terminal."""
    columns, right, rows = displayed(table)
    header = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" if r else "---" for r in right) + "|"
    lines = ["| " + " | ".join(md_text(value) for value in row) + " |" for row in rows]
    return "\n".join([header, rule, *lines])


def displayed(table: pd.DataFrame) -> tuple[list[str], list[bool], list[list[str]]]:
    """A table as a reader reads it: its columns, whether each is right-aligned (numbers),
    and its rows' values as text. A timing with its range over the epochs (columns `X`,
    `X min`, `X max`, kept apart in CSVs) is one column: "5.62 (5.42–6.07)", or "5.62"
    where they are one."""
    ranged = {
        str(c)
        for c in table.columns
        if f"{c}{LOW}" in table.columns and f"{c}{HIGH}" in table.columns
    }
    hidden = {f"{c}{end}" for c in ranged for end in (LOW, HIGH)}
    columns = [c for c in table.columns if str(c) not in hidden]
    right = [pd.api.types.is_numeric_dtype(table[c]) for c in columns]
    at = {str(c): i for i, c in enumerate(table.columns)}
    rows = []
    for row in table.itertuples(index=False):  # each value of its column's type
        values = []
        for c in columns:
            text = format_value(c, row[at[str(c)]])
            if str(c) in ranged:
                low, high = (format_value(c, row[at[f"{c}{end}"]]) for end in (LOW, HIGH))
                if text != "–" and low != high:
                    text = f"{text} ({low}–{high})"
            values.append(text)
        rows.append(values)
    return [str(c) for c in columns], right, rows


MARKDOWN = re.compile(r"([\\`*_{}\[\]<>#|~!])")  # what markdown would read as its syntax


def md_text(text: object) -> str:
    """Text from the store or the user (a URI, a run's settings, a device name) as plain
    markdown: one line, markdown's syntax characters escaped."""
    return MARKDOWN.sub(r"\\\1", " ".join(str(text).split()))


def format_value(column: object, value: object) -> str:
    """A number as the reader reads it, in the unit its column names (the value is already in
    it: a '%' column holds percentages): percentages with 1 decimal, losses with 4, other
    decimals (seconds, MiB, ratios) with 2, counts with thousands separators."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    name = str(column)
    if name.endswith("%"):
        return f"{value:.1f}"
    if "loss" in name:
        return f"{value:.4f}"
    return f"{value:.2f}"
