"""Concurrent writers: commands logging to one sqlite store at the same time all finish with
every metric recorded."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from cifarexp.tracking import store
from tests.conftest import TINY, TINY_ARGS, all_runs, without
from tests.processes import start_cifarexp

METRICS = {"data_time_s", "train_time_s", "epoch_time_s", "train_loss", "train_acc", "images_per_s"}
THREE_EPOCHS = [*without("--epochs"), "--epochs", "3"]


def assert_every_epoch_logged(client, run, epochs: int) -> None:
    assert run.info.status == "FINISHED"
    for name in METRICS:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == list(range(1, epochs + 1)), name


def test_two_processes_logging_to_one_sqlite_store_both_keep_every_metric(client, tmp_path):
    # given: two commands started together on the same store (and the same new experiment)
    processes = [
        start_cifarexp("time", *THREE_EPOCHS, "--run-name", name, cwd=tmp_path, name=name)
        for name in ("first", "second")
    ]
    try:
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:
            process.stop()

    assert codes == [0, 0], "\n".join(process.log()[-2000:] for process in processes)
    assert not any("database is locked" in process.log() for process in processes)
    runs = all_runs(client)
    assert sorted(run.info.run_name for run in runs) == ["first", "second"]
    assert len({run.info.experiment_id for run in runs}) == 1
    for run in runs:
        assert_every_epoch_logged(client, run, 3)


def test_a_write_refused_by_a_locked_database_is_tried_again(cli, client, monkeypatch):
    # given: the store refuses the first epoch's metrics once, as SQLite does when another
    # process holds its lock past MLflow's busy timeout
    log_metrics, refused = mlflow.log_metrics, []

    def locked_once(metrics, step=None):
        if step == 1 and not refused:
            refused.append(step)
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        log_metrics(metrics, step=step)

    monkeypatch.setattr(mlflow, "log_metrics", locked_once)
    monkeypatch.setattr(store, "LOCKED_RETRY_DELAYS_S", (0.01,))

    result = cli("time", *TINY_ARGS)

    assert result.exit_code == 0, result.output
    assert refused == [1]
    [run] = all_runs(client)
    assert_every_epoch_logged(client, run, 2)


def test_a_dataset_another_process_inserted_meanwhile_is_found_on_a_second_try(
    cli, client, monkeypatch
):
    # given: the store refuses the training set once, as SQLite does when another process
    # logging the same set to the same experiment inserted it between look-up and insert
    log_input, refused, others = mlflow.log_input, [], []

    def inserted_meanwhile(dataset, context=None):
        if not refused:
            refused.append(dataset.name)
            other = client.create_run(mlflow.active_run().info.experiment_id).info.run_id
            others.append(other)
            with mlflow.start_run(run_id=other, nested=True):  # the other process's insert
                log_input(dataset, context=context)
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest"
            )
        log_input(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", inserted_meanwhile)
    monkeypatch.setattr(store, "LOCKED_RETRY_DELAYS_S", (0.01,))

    result = cli("time", *TINY_ARGS)

    assert result.exit_code == 0, result.output
    name = f"synthetic-train-{TINY.train_size}"
    assert refused == [name]
    [run] = [run for run in all_runs(client) if run.info.run_id not in others]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [name]
    assert_every_epoch_logged(client, run, 2)
