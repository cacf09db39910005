"""What a command writes besides the store, at its edges: a terminal that cannot be written
(stdout on a full disk, a pipe closed early) and a report folder that cannot be (a full
disk, a folder that cannot be replaced, the store's own folder). A good run is never failed
by its output, and no half report is ever presented as whole."""

from __future__ import annotations

import os
import sys

from mlflow.tracking import MlflowClient

from tests.conftest import TINY_ARGS, all_runs
from tests.processes import start, start_cifarexp
from tests.test_store import error_lines

SHOWN = [arg for arg in TINY_ARGS if arg != "--quiet"]  # a line per epoch, as a user sees it


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
    reader, writer = os.pipe()
    os.close(reader)
    command = [sys.executable, "-m", "cifarexp", "time", *SHOWN]
    try:
        process = start(command, tmp_path, "head", stdout=writer)
    finally:
        os.close(writer)
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
