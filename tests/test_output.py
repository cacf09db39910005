"""What a command writes besides the store, at its edges: a terminal that cannot be written
(stdout on a full disk, a pipe closed early) and a report folder that cannot be (a full
disk, a folder that cannot be replaced, the store's own folder). A good run is never failed
by its output, and no half report is ever presented as whole."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmarks.fake_runs import log_study
from tests.conftest import TINY_ARGS, all_runs, one_message
from tests.processes import BROKEN_PIPE, start_cifarexp
from tests.test_store import error_lines, immutable

SHOWN = [arg for arg in TINY_ARGS if arg != "--quiet"]  # a line per epoch, as a user sees it
LAB = ["lab", "--quiet", "--preset", "quick", "--dataset", "synthetic", "--device", "cpu"]


def assert_finished_with_its_epochs(client: MlflowClient, epochs: list[int]) -> None:
    [run] = all_runs(client)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == epochs
    assert "mlflow.note.content" in run.data.tags  # its answer was logged too


# ---------------------------------------------------------------- the terminal


def test_stdout_on_a_full_disk_ends_the_run_finished_and_says_so_in_one_line(client, tmp_path):
    # Given `cifarexp time ... > FULL_DISK/out.txt` (/dev/full: every write is ENOSPC),
    process = start_cifarexp("time", *SHOWN, cwd=tmp_path, stdout="/dev/full")
    try:
        # when it runs to its end,
        code = process.wait()
    finally:
        process.stop()

    # then the run trained and logged fine is FINISHED; the lost output is one line, exit 1.
    log = process.log()
    assert code == 1 and "Traceback" not in log, log
    [error] = error_lines(log)
    assert "cannot write the output (No space left on device)" in error, error
    assert_finished_with_its_epochs(client, [1, 2])
    assert f"run {all_runs(client)[0].info.run_id} is FINISHED" in error


def test_stdout_closed_early_as_by_head_ends_the_run_finished(client, tmp_path):
    # Given `cifarexp time ... | head -1` whose reader has gone before the first line,
    process = start_cifarexp("time", *SHOWN, cwd=tmp_path, stdout=BROKEN_PIPE)
    try:
        code = process.wait()
    finally:
        process.stop()

    # then, as on a full disk: FINISHED, one line on stderr, exit 1.
    log = process.log()
    assert code == 1 and "Traceback" not in log, log
    [error] = error_lines(log)
    assert "cannot write the output (Broken pipe)" in error, error
    assert_finished_with_its_epochs(client, [1, 2])


# ---------------------------------------------------------------- the report folder


def report_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_report_on_a_full_disk_is_one_line_and_leaves_the_earlier_report_whole(
    cli, client, tmp_path, monkeypatch
):
    # Given a study in the store, its report written once, and then a disk that fills up
    # while the next report is written (the third file's data cannot be stored),
    log_study(client)
    assert cli("report", "--quiet", "--out", "r").exit_code == 0
    earlier = report_files(tmp_path / "r")
    assert len([name for name in earlier if name.endswith(".csv")]) > 2
    fsync, calls = os.fsync, []

    def fill_up(descriptor: int) -> None:
        calls.append(descriptor)
        if len(calls) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fill_up)

    # when the report is written again, and into a new folder,
    again = cli("report", "--quiet", "--out", "r")
    calls.clear()
    new = cli("report", "--quiet", "--out", "new")

    # then each is one line naming --out and the cause, exit 1; the earlier report is as it
    # was, the new folder is not there, and nothing half-written is left beside them.
    for result, out in ((again, "r"), (new, "new")):
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        [error] = error_lines(result.output)
        assert f"--out: cannot write the report to {out} (No space left on device)" in error
    assert report_files(tmp_path / "r") == earlier
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_report_replaces_an_earlier_one_as_a_whole(cli, client, tmp_path):
    # Given an earlier report in r with a table the store no longer yields,
    log_study(client)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "c9_gone.csv").write_text("stale")
    # when the report is written there,
    result = cli("report", "--quiet", "--out", "r")
    # then r holds the new report only.
    assert result.exit_code == 0, result.output
    files = report_files(tmp_path / "r")
    assert "report.md" in files and "c9_gone.csv" not in files


@pytest.mark.parametrize("unwritable", ["folder", "link to a folder", "report.md"])
def test_lab_with_an_out_it_cannot_write_is_refused_before_any_training(
    cli, client, tmp_path, unwritable
):
    # Given an earlier report folder that cannot be written (immutable, even for root), a
    # link to such a folder, or an earlier report whose report.md cannot be replaced,
    folder = tmp_path / "earlier"
    folder.mkdir()
    (folder / "report.md").write_text("earlier")
    out = tmp_path / "out"
    if unwritable == "report.md":
        out, locked = folder, folder / "report.md"
    else:
        locked = folder
        if unwritable == "link to a folder":
            out.symlink_to(folder)
        else:
            out = folder
    with immutable(locked):
        # when the whole study is asked for, into it,
        result = cli(*LAB, "--out", str(out))

    # then it is refused at once, in one line naming --out: nothing trained.
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [error] = error_lines(result.output)
    assert f"--out: cannot write the report to {out}" in error, error
    assert all_runs(client) == []
    assert (folder / "report.md").read_text() == "earlier"


@pytest.mark.parametrize("out", ["mlartifacts", "mlartifacts/report", "."])
def test_report_into_the_stores_own_folder_is_refused_naming_out(cli, client, tmp_path, out):
    # Given a store with runs (their artifacts in ./mlartifacts, beside mlflow.db),
    log_study(client)
    (tmp_path / "mlartifacts").mkdir(exist_ok=True)
    # when the report is asked for in the store's artifact folder, inside it, or around it,
    result = cli("report", "--quiet", "--out", out)
    # then one usage line names --out and why that folder cannot be used.
    assert result.exit_code == 2, result.output
    message = one_message(result.output)
    assert "--out" in message and "where the tracking store keeps its runs' files" in message
    assert "File name too long" not in message


def test_report_into_a_folder_of_other_files_is_refused(cli, client, tmp_path):
    # Given a folder that holds something that is no part of a report,
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    # when the report is asked for there (it replaces the whole folder),
    result = cli("report", "--quiet", "--out", "mine")
    # then it is refused, and the folder is left as it was.
    assert result.exit_code == 2 and "'notes.txt'" in one_message(result.output), result.output
    assert report_files(tmp_path / "mine") == {"notes.txt": b"keep me"}


# ---------------------------------------------------------------- wording


def test_counts_read_in_the_singular_or_plural_and_slow_bars_in_seconds_per_batch(monkeypatch):
    from cifarexp import config
    from cifarexp.cli.console import rate_text
    from cifarexp.config import plural, preset_text

    assert plural(1, "epoch") == "1 epoch" and plural(5, "epoch") == "5 epochs"
    assert plural(0, "worker") == "0 workers"
    assert rate_text(0.1).strip() == "10.0 s/batch"  # not "0.1 batch/s"
    assert rate_text(12.5).strip() == "12.5 batch/s"
    monkeypatch.setitem(config.PRESETS["quick"], "epochs", 1)  # a preset of 1 epoch
    assert "1 epoch" in preset_text("quick") and "1 epochs" not in preset_text("quick")


def test_a_piped_table_is_drawn_wide_enough_that_no_header_is_cut():
    import io

    import pandas as pd
    from rich.console import Console

    from cifarexp.cli import console as shown

    headers = ["device", "device name", "data-loading s", "training s", "avg epoch s",
               "estimated", "speedup vs cpu", "J/epoch", "energy vs cpu"]  # fmt: skip
    wide = pd.DataFrame([["cpu", "AMD EPYC", 0.1, 70.0, 70.1, "estimated", 1.0, 9.0, 1.0]],
                        columns=headers)  # fmt: skip
    out = io.StringIO()
    piped = shown._Console(file=out, width=80)  # off a terminal, as in a pipe
    assert not piped.is_terminal
    piped.print(shown.render(wide, "C5: a long title"))
    text = out.getvalue()
    header = text.splitlines()[2]  # drawn at 80 columns: "data-loa… s", a blank "estimated"
    assert "…" not in text and all(f" {name} " in header for name in headers), text
    assert isinstance(piped, Console) and piped.width == 80  # only that table was wider


def test_help_at_80_columns_never_cuts_an_option_name(monkeypatch):
    from typer.testing import CliRunner

    from cifarexp.cli.base import app

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr("typer.rich_utils.MAX_WIDTH", 80, raising=False)
    result = CliRunner().invoke(app, ["time", "--help"], terminal_width=80)
    assert result.exit_code == 0
    assert "--persistent-workers" in result.output and "--no-persistent-workers" in result.output
    assert "--channels-last" in result.output and "--no-channels-last" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    # and the help text keeps room beside them (a switch's negative name under its name)
    assert "Keep DataLoader workers" in result.output
