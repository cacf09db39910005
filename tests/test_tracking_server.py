"""A real tracking server: what the commands log there is what they log in the local store,
and a server that goes away mid-run fails the command clearly."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from cifarexp import jobs, tracking
from tests.conftest import TINY_ARGS, all_runs, without
from tests.processes import start_server

ONE_EPOCH = [*without("--epochs"), "--epochs", "1"]
COMMANDS = [
    ["time", *ONE_EPOCH],
    ["compare-optim", *ONE_EPOCH, "--optimizers", "sgd,adam"],
    ["inspect", "--quiet"],
    ["report", "--quiet", "--out", "report"],
]


@pytest.fixture
def fail_fast(monkeypatch):
    """MLflow's HTTP client without its minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture
def server(tmp_path_factory, empty_store):
    server = start_server(tmp_path_factory.mktemp("server"), empty_store)
    yield server
    server.process.stop()


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    paths = []
    for info in client.list_artifacts(run_id, path):
        paths += artifact_paths(client, run_id, info.path) if info.is_dir else [info.path]
    return sorted(paths)


def contents(uri: str) -> list[tuple]:
    """What a user finds in a store, less what differs between any two runs (ids, generated
    names, times, values): per run its experiment, status, params, cifarexp tags, whether it
    has a parent, each metric's steps and the artifact paths."""
    client = MlflowClient(uri)
    found = []
    for run in all_runs(client):
        metrics = {
            key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics
        }
        tags = {k: v for k, v in run.data.tags.items() if k.startswith(tracking.TAG)}
        found.append(
            (
                client.get_experiment(run.info.experiment_id).name,
                run.info.status,
                run.data.params,
                tags,
                "mlflow.parentRunId" in run.data.tags,
                metrics,
                artifact_paths(client, run.info.run_id),
            )
        )
    return sorted(found, key=repr)


def test_the_commands_log_the_same_to_a_tracking_server_as_to_the_local_store(
    cli, store, server, fail_fast
):
    for uri in (store, server.url):
        for command in COMMANDS:
            result = cli(*command, "--tracking-uri", uri)
            assert result.exit_code == 0, (uri, command, result.output)

    local, remote = contents(store), contents(server.url)
    assert len(local) == 1 + 3 + 1 + 1  # time, compare-optim and its children, inspect, report
    assert remote == local


def test_a_server_going_away_mid_run_fails_the_command_saying_what_was_logged(
    cli, store, server, fail_fast, monkeypatch
):
    # given: the server is killed once epoch 1 has reached it
    log_epoch = tracking.log_epoch

    def log_then_kill_the_server(result):
        log_epoch(result)
        if result.epoch == 1:
            server.process.stop()

    monkeypatch.setattr(jobs.tracking, "log_epoch", log_then_kill_the_server)

    # when
    args = [*without("--epochs", TINY_ARGS), "--epochs", "3", "--tracking-uri", server.url]
    result = cli("time", *args)

    # then: one line, exit 1, epoch 1 named, and epoch 1 is in the server's store
    assert result.exit_code == 1 and "Traceback" not in result.output
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert server.url in error and "epochs logged: 1;" in error
    [run] = all_runs(MlflowClient(server.backend_uri))
    assert run.info.status == "RUNNING"  # nobody could end it: --resume treats it as unfinished
    history = MlflowClient(server.backend_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1]
