"""Crashes inside training: the run ends FAILED with the error as a tag and its finished
epochs kept; a comparison's parent ends FAILED too, its finished children intact."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time

import mlflow
import psutil
import pytest
from mlflow.exceptions import MlflowException

from analysis import report
from cifarexp import processes, tracking
from cifarexp.config import CifarexpError
from cifarexp.training import data
from cifarexp.training.build import Training
from tests.conftest import TINY_ARGS, all_runs, without
from tests.processes import start_cifarexp

WORKER_DIED = "DataLoader worker (pid 4242) is killed by signal: Killed. "


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def test_a_worker_dying_in_the_second_child_fails_it_and_the_parent(cli, client, monkeypatch):
    # given: the second child's DataLoader worker dies after its first epoch
    train, calls = Training.train, []

    def die_in_the_second_child(self, on_epoch, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return train(self, on_epoch, **kwargs)

        def log_then_die(result):
            on_epoch(result)
            raise RuntimeError(WORKER_DIED)

        return train(self, log_then_die, **kwargs)

    monkeypatch.setattr(Training, "train", die_in_the_second_child)

    # when
    result = cli("compare-optim", *TINY_ARGS, "--optimizers", "sgd,adam")

    # then
    assert result.exit_code == 1 and "Traceback" not in result.output
    [error] = error_lines(result.output)
    assert "--workers" in error and "killed by signal" in error
    by_name = {run.info.run_name: run for run in all_runs(client)}
    assert {name: run.info.status for name, run in by_name.items()} == {
        "compare-optim synthetic cpu": "FAILED",
        "sgd": "FINISHED",
        "adam": "FAILED",
    }
    adam, sgd = by_name["adam"], by_name["sgd"]
    assert adam.data.tags[tracking.ERROR] == f"RuntimeError: {WORKER_DIED}"
    assert "killed by signal" in by_name["compare-optim synthetic cpu"].data.tags[tracking.ERROR]
    assert [m.step for m in client.get_metric_history(adam.info.run_id, "train_loss")] == [1]
    assert [m.step for m in client.get_metric_history(sgd.info.run_id, "train_loss")] == [1, 2]
    assert tracking.ERROR not in sgd.data.tags


def test_a_stuck_dataloader_worker_fails_the_run_after_loader_timeout(cli, client, monkeypatch):
    # given: one worker that takes 1.6 s for a batch, and 0.3 s allowed
    get_item = data.ImageArrayDataset.__getitem__

    def slow_get_item(self, index):
        time.sleep(0.1)
        return get_item(self, index)

    monkeypatch.setattr(data.ImageArrayDataset, "__getitem__", slow_get_item)
    args = without("--workers", without("--train-size"))

    # when
    result = cli("time", *args, "--train-size", "16", "--workers", "1", "--loader-timeout", "0.3")

    # then
    assert result.exit_code == 1 and "Traceback" not in result.output
    [error] = error_lines(result.output)
    assert "--loader-timeout" in error and "0.3 s" in error
    [run] = all_runs(client)
    assert run.info.status == "FAILED"
    assert "DataLoader timed out after 0.3 seconds" in run.data.tags[tracking.ERROR]


def test_our_error_wrapped_by_mlflow_mid_write_is_not_taken_for_a_failing_store(client, tracker):
    # Given an error of ours (e.g. torchrun's SIGTERM handler) raised inside an MLflow call,
    # which MLflow re-raises as an MlflowException from it,
    stopped = CifarexpError("stopped by torchrun")
    with pytest.raises(CifarexpError) as raised, tracker.start_run("wrapped") as run_id:
        raise MlflowException("INTERNAL_ERROR") from stopped
    # then our error comes out, and the run ends FAILED with it as the error tag
    assert raised.value is stopped
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["cifarexp.error"] == "CifarexpError: stopped by torchrun"


def test_a_stop_lost_inside_an_error_mlflow_raised_while_handling_it_still_kills_the_run(
    client, tracker
):
    # Given a stop (Ctrl-C) arriving mid-write, and the store's code raising another error
    # while it handled it (from SQLite's, on the rollback of the interrupted commit), which
    # MLflow wraps: the stop is only the context of what comes out, beside its cause,
    stop = processes.Interrupted(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as raised, tracker.start_run("stopped") as run_id:
        try:
            raise stop
        except KeyboardInterrupt:
            rollback = sqlite3.OperationalError("cannot rollback - no transaction is active")
            raise MlflowException("(sqlite3.OperationalError) cannot rollback") from rollback
    # then the stop comes out, and the run ends KILLED, as a stop ends it.
    assert raised.value is stop
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_sigterm_while_a_failed_run_is_ended_waits_until_it_is_ended(
    client, tracker, monkeypatch, stop_handlers
):
    # Given a rank under torchrun whose training failed, and torchrun's SIGTERM arriving
    # while the run is being ended (here: while its error tag is written),
    processes.handle_stops(under_torchrun=True)
    set_tag = mlflow.set_tag

    def set_tag_meanwhile_sigterm(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return set_tag(*args, **kwargs)

    monkeypatch.setattr(mlflow, "set_tag", set_tag_meanwhile_sigterm)
    with pytest.raises(processes.Stopped), tracker.start_run("ending") as run_id:
        raise RuntimeError("rank 1 crashed")
    # then the run is ended FAILED with the crash as its error, and only then stopped
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["cifarexp.error"] == "RuntimeError: rank 1 crashed"


def test_a_stopped_dataloader_worker_ends_the_run_and_the_process_within_the_timeout(
    client, tmp_path
):
    # Given a run whose DataLoader worker is stopped (SIGSTOP) while it trains (one
    # persistent worker and far more epochs than a run finishes in seconds: the worker
    # found is still the run's when it is stopped),
    args = [*without("--workers", without("--train-size", without("--epochs"))), "--epochs", "1000"]
    args += ["--train-size", "512", "--workers", "1", "--persistent-workers"]
    args += ["--loader-timeout", "2"]
    process = start_cifarexp("time", *args, cwd=tmp_path)
    try:
        worker = wait_for_worker(process)
        worker.suspend()
        code = process.wait(timeout=120)
    finally:
        process.stop()
    # then the command ends (not hangs) with one line, the run FAILED, nothing left.
    assert code == 1, process.log()
    [error] = error_lines(process.log())
    assert "--loader-timeout" in error and "timed out after 2 seconds" in error
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    [run] = all_runs(client)
    assert run.info.status == "FAILED"


def wait_for_worker(process, timeout: float = 180) -> psutil.Process:
    """The DataLoader worker of `process` (a forked child: its own executable, not a short
    `git` that the run's start asks for its commit), once it has delivered a batch or two."""
    deadline = time.monotonic() + timeout
    parent = psutil.Process(process.pid)
    while time.monotonic() < deadline:
        assert process.poll() is None, process.log()
        for child in parent.children():
            with contextlib.suppress(psutil.Error):
                if child.exe() == parent.exe():
                    time.sleep(2)  # into the epoch
                    if child.is_running():
                        return child
        time.sleep(0.1)
    raise AssertionError(f"no DataLoader worker in {timeout} s:\n{process.log()}")


def test_a_loss_that_is_not_finite_is_tagged_said_and_marked_in_the_report(cli, client, tmp_path):
    result = cli("time", *TINY_ARGS, "--lr", "1e12")

    assert result.exit_code == 0, result.output
    assert "the run diverged" in result.output
    [run] = all_runs(client)
    assert run.data.tags[tracking.DIVERGED] == "1"
    [note] = [s for s in report.build_report() if s.item == "C2"][0].notes
    assert note.startswith("Diverged:")
