"""The sqlite store at its edges: its first creation interrupted or raced, one left half-made
or at another schema, paths that cannot hold one, and a store that fails mid-run. Each
fault ends in a usable store, or in one line that names the cause."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_ARGS, all_runs, without
from tests.processes import start_cifarexp

ONE_EPOCH = [*without("--epochs"), "--epochs", "1"]


def store_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def assert_usable(uri: str) -> None:
    """The store opens at this MLflow's schema and takes a run."""
    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@contextmanager
def immutable(path: Path):
    """`path` made immutable (chattr +i: not even root may write it); the test is skipped
    where the filesystem has no such flag."""
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_first_command_stopped_while_it_makes_the_store_leaves_it_usable(
    cli, tmp_path, monkeypatch
):
    # Given the very first command on a new store, stopped while the store is being made
    # (SIGINT as its first file appears, SIGKILL half a second later),
    tries = [(signal.SIGINT, 0), (signal.SIGKILL, 0.5)]
    for number, (stop, delay) in enumerate(tries):
        folder = tmp_path / f"try{number}"
        folder.mkdir()
        uri = store_uri(folder)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the started process's
        process = start_cifarexp("report", "--quiet", "--out", "r", cwd=folder)
        deadline = time.monotonic() + 120
        while not any(folder.glob("*mlflow.db*")) and time.monotonic() < deadline:
            assert process.poll() is None, process.log()
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(process.pid, stop)
        process.wait(timeout=60)
        process.stop()

        # then the store is either not there or whole: the next command works on it.
        again = cli("report", "--quiet", "--out", str(folder / "r"), "--tracking-uri", uri)
        assert again.exit_code == 0, (stop, delay, again.output)
        assert_usable(uri)
        assert not list(folder.glob(".mlflow.db.new-*"))  # no half-made file left


def test_writers_started_together_on_a_store_that_does_not_exist_all_finish(tmp_path, monkeypatch):
    uri = store_uri(tmp_path / "fresh")
    (tmp_path / "fresh").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    writers = [
        start_cifarexp("time", *ONE_EPOCH, "--run-name", f"w{i}", cwd=tmp_path, name=f"w{i}")
        for i in range(3)
    ]
    try:
        codes = [writer.wait() for writer in writers]
    finally:
        for writer in writers:
            writer.stop()
    assert codes == [0] * 3, "\n".join(w.log()[-1500:] for w in writers)
    runs = all_runs(MlflowClient(uri))
    assert sorted(r.info.run_name for r in runs) == ["w0", "w1", "w2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.experiment_id for r in runs}) == 1


def half_made(path: Path, empty_store: Path, *, runs: int) -> None:
    """A store whose schema stopped short of the current one (as an older cifarexp left it,
    interrupted while MLflow built it in place), holding `runs` runs, made by another
    process as it would have been."""
    shutil.copy(empty_store, path)
    if runs:
        code = (
            "import sys; from mlflow.tracking import MlflowClient\n"
            "for _ in range(int(sys.argv[2])): MlflowClient(sys.argv[1]).create_run('0')"
        )
        subprocess.run([sys.executable, "-c", code, f"sqlite:///{path}", str(runs)], check=True)
    with sqlite3.connect(path) as db:
        db.execute("update alembic_version set version_num = '451aebb31d03'")


def test_a_half_made_store_without_runs_is_rebuilt_and_the_old_file_kept(
    cli, tmp_path, empty_store
):
    path = tmp_path / "old" / "mlflow.db"
    path.parent.mkdir()
    half_made(path, empty_store, runs=0)

    result = cli(
        "report", "--quiet", "--out", str(tmp_path / "r"), "--tracking-uri", f"sqlite:///{path}"
    )

    assert result.exit_code == 0, result.output
    assert "half-made" in result.output and "rebuilt" in result.output
    assert len(list(path.parent.glob("mlflow.db.half-made-*"))) == 1
    assert_usable(f"sqlite:///{path}")


def test_a_store_with_runs_at_another_schema_is_named_with_its_upgrade_command(
    cli, tmp_path, empty_store
):
    path = tmp_path / "old" / "mlflow.db"
    path.parent.mkdir()
    half_made(path, empty_store, runs=2)

    result = cli("report", "--quiet", "--tracking-uri", f"sqlite:///{path}")

    assert result.exit_code == 1 and "Traceback" not in result.output
    [error] = error_lines(result.output)
    assert "--tracking-uri" in error and "holds 2 runs" in error
    assert f"mlflow db upgrade sqlite:///{path}" in error


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("folder", "is a folder"),
        ("missing/mlflow.db", "no folder"),
        ("/proc/mlflow.db", "cannot make"),
        ("garbage.db", "file is not a database"),
    ],
)
def test_a_path_that_cannot_hold_a_store_is_one_line_naming_it(cli, tmp_path, where, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "garbage.db").write_text("not sqlite")
    path = where if where.startswith("/") else tmp_path / where

    result = cli("time", *TINY_ARGS, "--tracking-uri", f"sqlite:///{path}")

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "WARNING" not in result.output
    [error] = error_lines(result.output)
    assert "--tracking-uri" in error and expected in error


def test_the_default_store_in_a_folder_that_cannot_be_written_is_named_as_the_default(
    cli, tmp_path, monkeypatch
):
    folder = tmp_path / "locked"
    folder.mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(None)  # MLflow's own default again, as in a new process
    monkeypatch.chdir(folder)
    with immutable(folder):
        result = cli("time", *TINY_ARGS)
    assert result.exit_code == 1, result.output
    [error] = error_lines(result.output)
    default = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    assert error.startswith(f"Error: the default tracking store: cannot make {default}")
    assert "Operation not permitted" in error
    assert "--tracking-uri" not in error


def test_a_read_only_store_and_a_read_only_artifact_folder_are_one_line(cli, store, tmp_path):
    path = Path(store.removeprefix("sqlite:///"))
    with immutable(path):
        result = cli("time", *TINY_ARGS)
    assert result.exit_code == 1, result.output
    [error] = error_lines(result.output)
    assert "MLFLOW_TRACKING_URI" in error and "readonly database" in error

    artifacts = tmp_path / "mlartifacts"
    artifacts.mkdir()
    with immutable(artifacts):
        result = cli("time", *TINY_ARGS)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [error] = error_lines(result.output)
    assert "cannot write the artifacts" in error and str(artifacts) in error
    assert all_runs(MlflowClient(store)) == []  # checked before any run starts


def test_a_store_that_fails_mid_run_names_the_real_cause_and_the_epochs_logged(
    cli, tmp_path, after_each_epoch
):
    # Given a store whose folder goes away once epoch 1 has reached it,
    folder = tmp_path / "store"
    folder.mkdir()

    def lose_the_folder(result):
        if result.epoch == 1:
            folder.rename(tmp_path / "gone")

    after_each_epoch(lose_the_folder)

    # when
    args = [*without("--epochs"), "--epochs", "3", "--tracking-uri", store_uri(folder)]
    result = cli("time", *args)

    # then: one line with SQLite's own words, not its wrapper's
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [error] = error_lines(result.output)
    assert "epochs logged: 1;" in error and "readonly database" in error
    assert "autoflush" not in result.output


def damage(path: Path, table: str) -> None:
    """Write garbage over the page of `table` (its root) in the file `path`, in place, as
    something other than SQLite would."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        page_size = db.execute("pragma page_size").fetchone()[0]
        [root] = db.execute("select rootpage from sqlite_master where name = ?", (table,))
    with path.open("r+b") as file:
        file.seek((root[0] - 1) * page_size)
        file.write(bytes(range(256)) * (page_size // 256))


def test_a_store_damaged_under_a_running_command_stops_it_saying_which_epochs_it_holds(
    cli, client, store, after_each_epoch
):
    # Given a 4-epoch `time` whose store is written over with garbage once epoch 1 is in it
    # (a page that the run's own writes never read: before, it trained on and exited 0),
    path = Path(store.removeprefix("sqlite:///"))

    def garbage(result):
        if result.epoch == 1:
            damage(path, "registered_models")

    after_each_epoch(garbage)

    # when
    result = cli("time", *without("--epochs"), "--epochs", "4")

    # then the check after the next epoch stops it: one line, the epochs the store holds.
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [error] = error_lines(result.output)
    assert "database disk image is malformed" in error, error
    assert "epochs logged: 1, 2;" in error and "the run is FAILED" in error
    [run] = all_runs(client)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


def test_report_on_a_damaged_store_is_one_line_naming_the_store_and_sqlites_cause(
    cli, store, tmp_path
):
    # Given a store with a finished run, then damaged where a report reads (its runs' tags),
    assert cli("time", *ONE_EPOCH).exit_code == 0
    path = Path(store.removeprefix("sqlite:///"))
    damage(path, "tags")

    # when `report` runs on it (a new process: nothing of the store in its memory),
    process = start_cifarexp("report", "--quiet", "--out", "r", cwd=tmp_path)
    try:
        code = process.wait()
    finally:
        process.stop()

    # then one line, not SQL, as any other command gets.
    log = process.log()
    assert code == 1 and "SELECT" not in log and "Traceback" not in log, log
    [error] = error_lines(log)
    assert str(path) in error and "database disk image is malformed" in error
    assert log.strip() == error
