"""Shared fixtures: a temporary tracking store, one tiny CPU config, a CLI runner."""

from __future__ import annotations

import os

# MLflow's system-metrics sampler (a thread and a store writer each second per training run)
# is off unless a test turns it on (--system-metrics): only the tests of it check it.
os.environ["CIFAREXP_SYSTEM_METRICS"] = "false"

import re
import shutil
import signal
from pathlib import Path

import mlflow
import pytest
import typer.testing
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cifarexp import processes
from cifarexp.cli import app
from cifarexp.config import TrainConfig
from cifarexp.tracking import Tracker

# One tiny config shrunk from the defaults: CPU, a few synthetic images (2 steps of 4 an
# epoch: a ResNet-18 step of 4 images costs a quarter of one of 16), no workers.
TINY = TrainConfig(
    dataset="synthetic",
    train_size=8,
    test_size=8,
    batch_size=4,
    workers=0,
    epochs=2,
    device="cpu",
)
# The same, as the commands' options.
TINY_ARGS = [
    *(
        arg
        for field in ("dataset", "train_size", "test_size", "batch_size", "workers", "epochs",
                      "device")
        for arg in ("--" + field.replace("_", "-"), str(getattr(TINY, field)))
    ),
    "--quiet",
]  # fmt: skip


def one_message(output: str) -> str:
    """The output as one line, without the usage box's borders and wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def without(option: str, args: list[str] = TINY_ARGS) -> list[str]:
    """`args` less `option` and its value."""
    i = args.index(option)
    return args[:i] + args[i + 2 :]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty, already migrated sqlite store (creating one takes seconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh sqlite tracking store in tmp_path, used by default; returns its URI."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment exports the active experiment's id for child processes
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """No run of this process is flagged as disturbed unless its test sets the thresholds
    (test_noise): the other test process, or any other load, must not change what a test
    reads. (Runs in processes of their own keep the real thresholds: no test of them reads
    the flag.)"""
    from cifarexp.training import noise

    monkeypatch.setattr(noise, "OTHER_CPU_SHARE", float("inf"))
    monkeypatch.setattr(noise, "EPOCH_SPREAD_TOLERANCE", float("inf"))


@pytest.fixture
def stop_handlers():
    """Lets a test install cifarexp's SIGINT/SIGTERM handlers; pytest's are put back after,
    and no stop is left pending."""
    previous = {stop: signal.getsignal(stop) for stop in processes.STOPS}
    yield
    for stop, handler in previous.items():
        signal.signal(stop, handler)
    processes.handle_stops(under_torchrun=False)  # resets cifarexp's record of stops
    for stop, handler in previous.items():
        signal.signal(stop, handler)


@pytest.fixture
def after_each_epoch(monkeypatch):
    """`after_each_epoch(action)`: from then on `action(result)` runs right after each epoch
    has reached the store (Tracker.log_epoch); `after_each_epoch(None)` stops it."""
    log_epoch = Tracker.log_epoch

    def install(action):
        def log_then_act(tracker, result):
            log_epoch(tracker, result)
            action(result)

        monkeypatch.setattr(Tracker, "log_epoch", log_epoch if action is None else log_then_act)

    return install


@pytest.fixture
def tracker(store) -> Tracker:
    """A tracker on the test's store, as a command's session opens one."""
    return Tracker.open(store)


@pytest.fixture
def client(store) -> MlflowClient:
    return MlflowClient(store)


@pytest.fixture(scope="session")
def click_command():
    """The CLI as one click command, built once (typer builds it anew on every invoke)."""
    return typer.main.get_command(app)


@pytest.fixture
def cli(monkeypatch, click_command):
    """Invoke the CLI in-process: cli("time", "--epochs", "1") -> click Result."""
    monkeypatch.setattr(typer.testing, "_get_command", lambda _: click_command)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


def all_runs(client: MlflowClient):
    """Every run in the store, newest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time DESC"])
