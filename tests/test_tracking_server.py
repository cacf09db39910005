"""A real tracking server: what the commands log there is what they log in the local store,
and a server that goes away mid-run fails the command clearly."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from cifarexp import __version__, tracking
from cifarexp.study.catalogue import short_name
from cifarexp.tracking import ui
from tests.conftest import TINY, TINY_ARGS, all_runs, without
from tests.processes import free_port, start_cifarexp, start_server, wait_until_gone

VARIANT = tracking.VARIANT
# What every training run logs once it ends, each a chart in the UI with a bar per child.
SUMMARY = ("final_acc", "final_loss", "avg_epoch_time_s", "avg_train_time_s", "avg_data_time_s")
ONE_EPOCH = [*without("--epochs"), "--epochs", "1"]
COMMANDS = [  # the training runs with MLflow's system metrics, which the tests turn off
    ["time", *ONE_EPOCH, "--system-metrics"],
    ["compare-optim", *ONE_EPOCH, "--optimizers", "sgd,adam", "--system-metrics"],
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


NOTES = "notes.md"  # a comparison's notes: a disturbed timing, variants within noise
FIELDS = ("experiment", "status", "params", "tags", "has parent", "metric steps", "artifacts")


def contents(uri: str) -> list[tuple]:
    """What a user finds in a store, less what differs between any two runs (ids, generated
    names, times, values, system metrics, and what the timings' noise decides: the
    timing_disturbed tag and a comparison's notes.md, since the suite's other worker may run
    beside one run and not the other): per run its experiment, status, params, cifarexp
    tags, whether it has a parent, each metric's steps and the artifact paths."""
    client = MlflowClient(uri)
    found = []
    for run in all_runs(client):
        metrics = {
            key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics
            if not key.startswith("system/")  # sampled each second: how many, when, varies
        }
        tags = {
            k: v
            for k, v in run.data.tags.items()
            if k.startswith(tracking.TAG) and k != tracking.TIMING_DISTURBED
        }
        found.append(
            (
                client.get_experiment(run.info.experiment_id).name,
                run.info.status,
                run.data.params,
                tags,
                "mlflow.parentRunId" in run.data.tags,
                metrics,
                [path for path in artifact_paths(client, run.info.run_id) if path != NOTES],
            )
        )
    return sorted(found, key=repr)


def test_the_commands_log_the_same_to_a_tracking_server_as_to_the_local_store(
    cli, store, server, fail_fast, monkeypatch, after_each_epoch
):
    # System metrics sampled each 0.1 s: every training run lasts longer than one sample.
    monkeypatch.setattr(tracking.store, "SYSTEM_METRICS_INTERVAL_S", 0.1)
    for uri in (store, server.url):
        for command in COMMANDS:
            result = cli(*command, "--tracking-uri", uri)
            assert result.exit_code == 0, (uri, command, result.output)

    local, remote = contents(store), contents(server.url)
    assert len(local) == 1 + 3 + 1 + 1  # time, compare-optim and its children, inspect, report
    assert len(remote) == len(local)
    differing = [
        {field: (a, b) for field, a, b in zip(FIELDS, mine, theirs, strict=True) if a != b}
        for mine, theirs in zip(local, remote, strict=True)
        if mine != theirs
    ]
    assert not differing, differing  # field: (local, server), for each run that differs
    readable_in_the_ui(MlflowClient(server.url))
    a_server_going_away_mid_run_fails_the_command_saying_what_was_logged(
        cli, server, after_each_epoch
    )


def a_server_going_away_mid_run_fails_the_command_saying_what_was_logged(
    cli, server, after_each_epoch
) -> None:
    """(Part of the test above, which has a server to kill: starting one takes seconds.)"""

    # Given a run whose server is killed once epoch 1 has reached it,
    def kill_the_server(result):
        if result.epoch == 1:
            server.process.stop()

    after_each_epoch(kill_the_server)

    # when
    args = [*without("--epochs", TINY_ARGS), "--epochs", "3", "--tracking-uri", server.url]
    result = cli("time", *args, "--run-name", "cut-off")

    # then: one line, exit 1, epoch 1 named, and epoch 1 is in the server's store
    assert result.exit_code == 1 and "Traceback" not in result.output
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert server.url in error and "epochs logged: 1;" in error
    [run] = [r for r in all_runs(MlflowClient(server.backend_uri)) if r.info.run_name == "cut-off"]
    assert run.info.status == "RUNNING"  # nobody could end it: --resume treats it as unfinished
    history = MlflowClient(server.backend_uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1]


def readable_in_the_ui(client: MlflowClient) -> None:
    """What the MLflow UI shows of the study, as its REST API returns it."""
    runs = all_runs(client)
    by_id = {run.info.run_id: run for run in runs}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        # a name that says what it is; version and commit (run from this git checkout)
        named = (tags["cifarexp.command"], short_name(tags.get(VARIANT, "-")))
        assert run.info.run_name.startswith(named)
        assert tags[tracking.VERSION] == __version__ and len(tags[tracking.COMMIT]) == 40
        assert "None" not in run.data.params.values() and tags.get(VARIANT) != ""
        assert "flops_per_image" not in metrics and "cifarexp.cuda_version" not in tags
        parent = by_id.get(tags.get("mlflow.parentRunId", ""))
        if parent is not None:  # no parent param contradicts its children
            shared = parent.data.params.keys() & run.data.params.keys()
            assert {k: parent.data.params[k] for k in shared} == {
                k: run.data.params[k] for k in shared
            }
        if "epoch_time_s" in metrics:  # a training run: system metrics and its dataset
            assert {
                "system/cpu_utilization_percentage",
                "system/system_memory_usage_megabytes",
            } <= set(metrics)
            names = [d.dataset.name for d in run.inputs.dataset_inputs]
            assert names == [f"synthetic-train-{TINY.train_size}"]
    [parent] = [r for r in runs if r.data.tags["cifarexp.command"] == "compare-optim"
                and "mlflow.parentRunId" not in r.data.tags]  # fmt: skip
    assert parent.data.params["optimizers"] == "sgd,adam" and "optimizer" not in parent.data.params
    assert set(parent.data.metrics) == {"best_final_acc"}  # the variants' are their children's
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == ["adam", "sgd"]
    for child in children:
        assert set(SUMMARY) <= set(child.data.metrics)
    assert parent.data.tags["cifarexp.best_optimizer"] in ("sgd", "adam")
    note = parent.data.tags[tracking.NOTE]
    assert "How do SGD" in note and "Final training accuracy" in note and "optimizers=" in note
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "compare-optim" in experiment.tags[tracking.NOTE]


def test_ui_serves_the_store_on_127_0_0_1_until_ctrl_c(store, tmp_path, client):
    # Given a store with an experiment, and a free port
    experiment = client.create_experiment("cifarexp-time")
    port = free_port()
    # When `cifarexp ui` runs on it
    ui = start_cifarexp("ui", "--port", str(port), cwd=tmp_path, name="ui")
    url = f"http://127.0.0.1:{port}"
    link = f"cifarexp-time: {url}/#/experiments/{experiment}?workflowType=machine_learning"
    try:
        deadline = time.monotonic() + 120  # until its last line, the experiment's link
        while link not in " ".join(ui.log().split()) and time.monotonic() < deadline:
            assert ui.poll() is None, ui.log()
            time.sleep(0.2)
        # Then the UI answers on 127.0.0.1, and it printed the experiment's link
        with urllib.request.urlopen(url + "/health", timeout=10) as reply:
            assert reply.status == 200
        output = " ".join(ui.log().split())
        assert f"The MLflow UI on {store}: {url} (Ctrl-C stops it)" in output
        assert link in output
        # and Ctrl-C stops it, the server with it: nothing is left running in its folder
        os.kill(ui.pid, signal.SIGINT)
        assert ui.wait(timeout=60) == 0, ui.log()
    finally:
        ui.stop()
    assert "The MLflow UI is stopped." in ui.log() and "Traceback" not in ui.log()
    assert wait_until_gone(tmp_path, timeout=20) == []
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5).close()


def test_ui_says_which_port_is_taken(store, cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = cli("ui", "--port", str(port))
    assert result.exit_code == 2
    assert f"127.0.0.1:{port} is in use" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("argv0", "on_path", "shown"),
    [
        (".venv/bin/cifarexp", None, ".venv/bin/cifarexp"),  # make run's, venv not activated
        (".venv/bin/cifarexp", ".venv/bin/cifarexp", "cifarexp"),  # the same one on PATH
        ("cifarexp", "/usr/bin/cifarexp", "cifarexp"),  # found on PATH as typed
        ("/x/cifarexp/__main__.py", None, "cifarexp"),  # python -m cifarexp, torchrun's ranks
    ],
)
def test_the_ui_command_printed_is_the_one_the_user_started(monkeypatch, argv0, on_path, shown):
    monkeypatch.setattr("sys.argv", [argv0, "time"])
    monkeypatch.setattr("shutil.which", lambda name: on_path)
    assert ui.command("sqlite:///mlflow.db") == f"{shown} ui"
