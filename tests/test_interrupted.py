"""Interrupted comparisons: Ctrl-C, SIGTERM and SIGKILL leave nothing the analysis mistakes
for a result, and `--resume` finishes only what is missing."""

from __future__ import annotations

import os
import signal

from analysis import queries, report, tables
from cifarexp import jobs, tracking
from tests.conftest import TINY_ARGS, all_runs, without
from tests.processes import start_cifarexp, wait_for_epoch

COMPARE_OPTIM = ["compare-optim", *TINY_ARGS, "--optimizers", "sgd,adam"]
PARENT = "mlflow.parentRunId"


def runs_by_status(client) -> dict[str, list[str]]:
    """Run names (a child's is its variant) per status."""
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
    cli, client, monkeypatch
):
    # given: Ctrl-C after adam's first epoch (sgd has finished)
    log_epoch, logged = tracking.log_epoch, []

    def log_then_interrupt_at_the_third_epoch(result):
        log_epoch(result)
        logged.append(result.epoch)
        if len(logged) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(jobs.tracking, "log_epoch", log_then_interrupt_at_the_third_epoch)
    result = cli(*COMPARE_OPTIM)
    assert result.exit_code == 130
    assert runs_by_status(client) == {
        "FINISHED": ["optimizer=sgd"],
        "KILLED": ["compare-optim", "optimizer=adam"],
    }
    [adam] = [run for run in all_runs(client) if run.info.run_name == "optimizer=adam"]
    assert [m.step for m in client.get_metric_history(adam.info.run_id, "train_loss")] == [1]
    assert queries.exercise("C6") is None  # nothing finished to show

    # when
    monkeypatch.setattr(jobs.tracking, "log_epoch", log_epoch)
    result = cli(*COMPARE_OPTIM, "--resume")

    # then: sgd reused, adam run again, the killed adam kept but not counted
    assert result.exit_code == 0, result.output
    assert "optimizer=sgd: reusing finished run" in result.output
    [parent] = [run for run in all_runs(client) if PARENT not in run.data.tags]
    assert_one_complete_comparison(client, parent.info.run_id)
    assert runs_by_status(client)["KILLED"] == ["optimizer=adam"]


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
    assert first.info.run_name == "optimizer=sgd"
    assert runs_by_status(client) == {"RUNNING": ["compare-optim", "optimizer=sgd"]}
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
        "FINISHED": ["compare-optim", "optimizer=adam", "optimizer=sgd"],
        "KILLED": ["optimizer=sgd"],
    }


def test_sigterm_ends_the_run_killed_with_its_finished_epochs(client, tmp_path):
    process = start_cifarexp("time", *without("--epochs"), "--epochs", "20", cwd=tmp_path)
    try:
        run = wait_for_epoch(client, process)
        os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        process.stop()

    assert code == 130, process.log()
    assert "Interrupted" in process.log() and "Traceback" not in process.log()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch_time_s")]
    assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) < 20
