"""Interrupted runs and comparisons: Ctrl-C, SIGTERM, every other stop signal and SIGKILL
leave nothing the analysis mistakes for a result, and `--resume` finishes only what is
missing (and trains nothing for a comparison that has finished)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import sqlite3
import sys
import time

import pytest
from torch.utils.data import dataloader

from analysis import queries, report, tables
from cifarexp import processes, tracking
from cifarexp.tracking import lifecycle
from cifarexp.training.data import load_split, make_loader
from tests.conftest import TINY, TINY_ARGS, all_runs, without
from tests.processes import start_cifarexp, wait_for_epoch

COMPARE_OPTIM = ["compare-optim", *TINY_ARGS, "--optimizers", "sgd,adam"]
PARENT_NAME = "compare-optim synthetic cpu"  # the parent's run name: command, dataset, device
ONE_EPOCH = [*without("--epochs"), "--epochs", "1"]
PARENT = "mlflow.parentRunId"


def interrupt_at_the_third_epoch(after_each_epoch) -> None:
    """Ctrl-C (KeyboardInterrupt) as soon as the third epoch of the process is logged."""
    logged = []

    def interrupt_at_three(result):
        logged.append(result.epoch)
        if len(logged) == 3:
            raise KeyboardInterrupt

    after_each_epoch(interrupt_at_three)


def runs_by_status(client) -> dict[str, list[str]]:
    """Run names (a child's is its variant's value: `sgd`) per status."""
    found: dict[str, list[str]] = {}
    for run in all_runs(client):
        found.setdefault(run.info.status, []).append(run.info.run_name)
    return {status: sorted(names) for status, names in found.items()}


def c6_section() -> report.Section:
    [section] = [s for s in report.build_report() if s.item == "C6"]
    return section


def assert_one_complete_comparison(client, parent_id: str) -> None:
    """C6 in the analysis is `parent_id`, FINISHED, with one finished run per optimizer,
    each with both epochs; nothing is left RUNNING."""
    ex = queries.exercise("C6")
    assert ex is not None and ex.parent_id == parent_id
    assert ex.parent["status"] == "FINISHED"
    assert sorted(ex.runs[f"tags.{tracking.VARIANT}"]) == ["optimizer=adam", "optimizer=sgd"]
    assert set(ex.runs["status"]) == {"FINISHED"}
    assert sorted(ex.epochs.groupby("variant")["epoch"].apply(list).items()) == [
        ("optimizer=adam", [1, 2]),
        ("optimizer=sgd", [1, 2]),
    ]
    assert list(tables.c6_optimizers(ex)["optimizer"]) == ["sgd", "adam"]
    assert "RUNNING" not in runs_by_status(client)


def test_ctrl_c_in_compare_optim_then_resume_gives_one_complete_comparison(
    cli, client, after_each_epoch
):
    # given: Ctrl-C after adam's first epoch (sgd has finished)
    interrupt_at_the_third_epoch(after_each_epoch)
    result = cli(*COMPARE_OPTIM)
    assert result.exit_code == 130
    assert runs_by_status(client) == {
        "FINISHED": ["sgd"],
        "KILLED": ["adam", PARENT_NAME],
    }
    [adam] = [run for run in all_runs(client) if run.info.run_name == "adam"]
    assert [m.step for m in client.get_metric_history(adam.info.run_id, "train_loss")] == [1]
    assert queries.exercise("C6") is None  # nothing finished to show

    # when
    after_each_epoch(None)
    result = cli(*COMPARE_OPTIM, "--resume")

    # then: sgd reused, adam run again, the killed adam kept but not counted
    assert result.exit_code == 0, result.output
    assert "optimizer=sgd: reusing finished run" in result.output
    [parent] = [run for run in all_runs(client) if PARENT not in run.data.tags]
    assert_one_complete_comparison(client, parent.info.run_id)
    assert runs_by_status(client)["KILLED"] == ["adam"]


def test_a_comparison_killed_outright_is_unfinished_until_resume_completes_it(
    cli, client, tmp_path
):
    # given: compare-optim SIGKILLed in a real process once sgd has logged epoch 1 of 3
    args = [*without("--epochs", COMPARE_OPTIM), "--epochs", "3"]
    process = start_cifarexp(*args, cwd=tmp_path)
    try:
        first = wait_for_epoch(client, process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        process.stop()
    assert first.info.run_name == "sgd"
    assert runs_by_status(client) == {"RUNNING": [PARENT_NAME, "sgd"]}
    assert queries.exercise("C6") is None  # a RUNNING run is not a result
    assert c6_section().missing
    [parent] = [run for run in all_runs(client) if PARENT not in run.data.tags]

    # when
    result = cli(*args, "--resume")

    # then: the same parent, finished; the stale sgd child KILLED and run again
    assert result.exit_code == 0, result.output
    ex = queries.exercise("C6")
    assert ex is not None and ex.parent_id == parent.info.run_id
    assert sorted(ex.runs[f"tags.{tracking.VARIANT}"]) == ["optimizer=adam", "optimizer=sgd"]
    assert list(ex.epochs.groupby("variant")["epoch"].max()) == [3, 3]
    assert list(c6_section().tables["c6_optimizers"]["optimizer"]) == ["sgd", "adam"]
    assert client.get_run(first.info.run_id).info.status == "KILLED"
    assert runs_by_status(client) == {
        "FINISHED": ["adam", PARENT_NAME, "sgd"],
        "KILLED": ["sgd"],
    }


def test_sigterm_ends_the_run_killed_with_its_finished_epochs(client, tmp_path):
    # Given a run with a DataLoader worker, and SIGTERM sent to its whole process group as
    # `timeout` and schedulers send it (the worker dies of it too, not of a fault of its own),
    # epochs of 8 steps (about a second): the stop lands in training, not at an epoch's start
    args = [*without("--workers", without("--epochs", without("--train-size"))), "--workers", "1"]
    args += ["--epochs", "20", "--train-size", str(8 * TINY.batch_size)]
    process = start_cifarexp("time", *args, cwd=tmp_path)
    try:
        run = wait_for_epoch(client, process)
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        process.stop()

    # then the run ends KILLED with its epochs, on one line and no worker error.
    assert code == 128 + signal.SIGTERM == 143, process.log()
    assert "Interrupted by SIGTERM" in process.log() and "Traceback" not in process.log()
    assert "DataLoader worker" not in process.log()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch_time_s")]
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < 20


def test_a_stop_as_the_last_epoch_is_logged_ends_the_run_and_says_what_it_is(
    client, store, tmp_path
):
    # Given runs stopped (SIGINT, SIGTERM) the moment their last epoch appears in the store,
    outcomes = []
    for number, stop in enumerate([signal.SIGINT, signal.SIGTERM]):
        name = f"try{number}"
        process = start_cifarexp("time", *ONE_EPOCH, "--run-name", name, cwd=tmp_path, name=name)
        try:
            deadline = time.monotonic() + 180
            while not logged_epoch(store, name) and time.monotonic() < deadline:
                assert process.poll() is None, process.log()
                time.sleep(0.002)
            os.kill(process.pid, stop)
            code = process.wait(timeout=60)
        finally:
            process.stop()
        # then each run ended, and what the process said agrees with the store.
        [run] = [r for r in all_runs(client) if r.info.run_name == name]
        log = process.log()
        assert "Traceback" not in log
        outcomes.append((run.info.status, code))
        if run.info.status == "KILLED":
            assert code == 128 + stop and "the run is KILLED" in log, (stop, log)
        else:
            assert run.info.status == "FINISHED", (stop, run.info.status, log)
            assert (code == 0 and "Interrupted" not in log) or (
                code == 128 + stop and "had FINISHED" in log
            ), (stop, code, log)


def logged_epoch(store: str, run_name: str) -> bool:
    """Whether the run `run_name` has an epoch in the store (read straight from the file:
    polling through MLflow would take the CPU the run needs)."""
    query = (
        "select count(*) from metrics join runs on metrics.run_uuid = runs.run_uuid "
        "where runs.name = ? and metrics.key = 'epoch_time_s'"
    )
    with contextlib.closing(sqlite3.connect(store.removeprefix("sqlite:///"), timeout=20)) as db:
        return db.execute(query, (run_name,)).fetchone()[0] > 0


def test_a_stop_swallowed_by_python_still_ends_the_run_killed(
    cli, client, after_each_epoch, stop_handlers, monkeypatch
):
    # Given a SIGTERM that lands in a garbage-collector callback, where Python reports
    # "Exception ignored" (to sys.unraisablehook) and drops the KeyboardInterrupt it raised,
    processes.handle_stops(under_torchrun=False)
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda raised: swallowed.append(raised.exc_type))

    def sigterm_in_a_gc_callback(phase, info):
        gc.callbacks.remove(sigterm_in_a_gc_callback)
        signal.raise_signal(signal.SIGTERM)

    def collect(result):
        if result.epoch == 1:
            gc.callbacks.append(sigterm_in_a_gc_callback)
            gc.collect()

    after_each_epoch(collect)

    # when
    result = cli("time", *without("--epochs"), "--epochs", "3")

    # then the run still ends KILLED after the epoch it finished, and exits so
    assert swallowed == [processes.Interrupted]
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    [run] = all_runs(client)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]


def test_a_stop_while_the_dataloader_starts_its_workers_comes_once_they_are_started(
    stop_handlers, monkeypatch
):
    # Given a loader with a worker, and a SIGTERM that arrives as its iterator is being made
    # (before the iterator has what its cleanup needs),
    processes.handle_stops(under_torchrun=False)
    made = dataloader._MultiProcessingDataLoaderIter.__init__

    def stopped_meanwhile(self, loader):
        signal.raise_signal(signal.SIGTERM)
        made(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", stopped_meanwhile)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda raised: unraisable.append(raised.exc_value))
    cfg = TINY.replace(workers=1)
    loader = make_loader(cfg, load_split(cfg, train=True), train=True)

    # when the epoch starts, the stop is raised,
    with pytest.raises(processes.Interrupted):
        next(iter(loader))
    gc.collect()
    # then only once the iterator is whole: collected, it ends its worker without an error.
    assert unraisable == []


def test_a_run_owner_is_alive_while_its_process_runs_even_if_the_clock_moved():
    # Given this process's owner tag, as a run it starts records it,
    [tag] = lifecycle.owner_tag().values()
    owner = json.loads(tag)

    # when the clock has moved an hour since (the start on the clock is off by as much),
    # or the pid now belongs to a process started later,
    moved = json.dumps(owner | {"started": owner["started"] + 3600})
    later = json.dumps(owner | {"since_boot": owner["since_boot"] + 5})

    # then the owner is alive as long as its process runs, and a later process is not it.
    assert lifecycle.owner_alive(tag) and lifecycle.owner_alive(moved)
    assert lifecycle.owner_alive(later) is False
    assert lifecycle.owner_alive(json.dumps(owner | {"host": "elsewhere"})) is None


def test_two_resumes_at_once_run_each_missing_variant_once(cli, client, after_each_epoch, tmp_path):
    # Given a comparison stopped after its first variant,
    interrupt_at_the_third_epoch(after_each_epoch)
    assert cli(*COMPARE_OPTIM).exit_code == 130
    after_each_epoch(None)

    # when two --resume start at the same moment,
    both = [start_cifarexp(*COMPARE_OPTIM, "--resume", cwd=tmp_path, name=name) for name in "ab"]
    try:
        codes = sorted(process.wait() for process in both)
    finally:
        for process in both:
            process.stop()

    # then one resumes it and the other refuses with one line,
    logs = "\n".join(process.log() for process in both)
    assert codes == [0, 1], logs
    [refusal] = [line for line in logs.splitlines() if line.startswith("Error:")]
    assert "is still being run by pid" in refusal and "Traceback" not in logs
    # and the comparison is complete, no variant twice.
    [parent] = [run for run in all_runs(client) if PARENT not in run.data.tags]
    assert_one_complete_comparison(client, parent.info.run_id)
    assert runs_by_status(client) == {
        "FINISHED": ["adam", PARENT_NAME, "sgd"],
        "KILLED": ["adam"],
    }


def test_resume_finds_a_comparison_killed_as_soon_as_it_was_created(cli, client, tmp_path):
    # Given compare-optim SIGKILLed the moment its parent run appears (before its params),
    process = start_cifarexp(*COMPARE_OPTIM, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 180
        while not all_runs(client) and time.monotonic() < deadline:
            assert process.poll() is None, process.log()
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        process.stop()
    [parent] = all_runs(client)

    # when
    result = cli(*COMPARE_OPTIM, "--resume")

    # then that parent is the one completed
    assert result.exit_code == 0, result.output
    assert "Nothing to resume" not in result.output
    assert_one_complete_comparison(client, parent.info.run_id)


def test_a_comparison_whose_child_was_deleted_is_reported_as_incomplete(cli, client, tmp_path):
    assert cli(*COMPARE_OPTIM).exit_code == 0
    [adam] = [run for run in all_runs(client) if run.info.run_name == "adam"]
    client.delete_run(adam.info.run_id)

    result = cli("report", "--quiet", "--out", str(tmp_path / "r"))

    assert result.exit_code == 0, result.output
    [note] = c6_section().notes
    assert note.startswith("Incomplete:") and "optimizer=adam" in note
    assert "Incomplete:" in (tmp_path / "r" / "report.md").read_text()
    assert list(c6_section().tables["c6_optimizers"]["optimizer"]) == ["sgd"]


def test_sigusr1_from_outside_ends_the_run_killed_with_its_finished_epochs(client, tmp_path):
    # Given a run with a DataLoader worker (whose watchdog also uses SIGUSR1), and SIGUSR1,
    # which has no handler of its own, sent to it once an epoch is in the store,
    # epochs of 8 steps (about a second): the stop lands in training, not at an epoch's start
    args = [*without("--workers", without("--epochs", without("--train-size"))), "--workers", "1"]
    args += ["--epochs", "20", "--train-size", str(8 * TINY.batch_size)]
    process = start_cifarexp("time", *args, cwd=tmp_path)
    try:
        run = wait_for_epoch(client, process)
        os.kill(process.pid, signal.SIGUSR1)
        code = process.wait(timeout=60)
    finally:
        process.stop()

    # then it ends as SIGTERM ends it: KILLED, its epochs kept, 128 + the signal's number.
    assert code == 128 + signal.SIGUSR1, process.log()
    assert "Interrupted by SIGUSR1" in process.log() and "Traceback" not in process.log()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch_time_s")]
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < 20


@pytest.mark.parametrize(
    "stop",
    [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2, signal.SIGALRM, signal.SIGXCPU,
     signal.SIGRTMIN],
    ids=lambda stop: signal.Signals(stop).name,
)  # fmt: skip
def test_every_stop_signal_ends_the_run_killed_with_its_exit_code(
    cli, client, after_each_epoch, stop_handlers, stop
):
    # Given cifarexp's handlers, and a stop signal that arrives once epoch 1 is logged,
    processes.handle_stops(under_torchrun=False)
    after_each_epoch(lambda result: signal.raise_signal(stop) if result.epoch == 1 else None)

    # when
    result = cli("time", *without("--epochs"), "--epochs", "3")

    # then the run is KILLED after epoch 1, and the exit code names the signal.
    assert result.exit_code == 128 + stop, result.output
    assert f"Interrupted by {signal.Signals(stop).name}" in result.output
    [run] = all_runs(client)
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]


def test_resume_of_a_finished_comparison_shows_its_answer_and_trains_nothing(
    cli, client, monkeypatch
):
    # Given a comparison that has finished,
    assert cli(*COMPARE_OPTIM).exit_code == 0
    [parent] = [run for run in all_runs(client) if PARENT not in run.data.tags]
    before = runs_by_status(client)

    def no_training(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr("cifarexp.training.build.Training.train", no_training)

    # when it is run again with --resume,
    result = cli(*COMPARE_OPTIM, "--resume")

    # then it says it has finished, shows its answer, and nothing trains or changes.
    assert result.exit_code == 0, result.output
    assert f"Already finished: run {parent.info.run_id} has these settings" in result.output
    assert "Nothing to resume" not in result.output
    assert "C6: " in result.output and "Source: runs" in result.output  # its answer
    assert runs_by_status(client) == before
    again = client.get_run(parent.info.run_id)
    assert again.info.end_time == parent.info.end_time
    assert again.data.metrics == parent.data.metrics


def test_resume_with_nothing_to_resume_says_it_starts_a_new_comparison(cli, client):
    # Given no comparison with these settings, when --resume is asked for,
    result = cli(*COMPARE_OPTIM, "--resume")
    # then it says it starts a new one, and does.
    assert result.exit_code == 0, result.output
    assert "Nothing to resume: no run with these settings; starting a new one." in result.output
    [parent] = [run for run in all_runs(client) if PARENT not in run.data.tags]
    assert_one_complete_comparison(client, parent.info.run_id)


def test_a_stop_before_any_run_started_says_no_run_was_logged(cli, client, monkeypatch):
    # Given a stop that arrives while the training set is loaded, before the run starts,
    def stopped(*args, **kwargs):
        raise processes.Interrupted(signal.SIGTERM)

    monkeypatch.setattr("cifarexp.training.build.load_split", stopped)
    # when
    result = cli("time", *TINY_ARGS)
    # then the command says so, and the store holds no run.
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "Interrupted by SIGTERM before a run started: no run was logged." in result.output
    assert all_runs(client) == []
