"""Bad input, everywhere: every command with malformed options gets one clear line that
names the option, exit 2 (usage) or 1 (runtime), no traceback, no run left RUNNING, and
nothing in the store for a usage error."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchvision import datasets

from cifarexp.cli import app
from tests.conftest import TINY_ARGS, all_runs, one_message, without

USAGE, RUNTIME = 2, 1
TRAINING = ["time", "sweep-workers", "compare-device", "compare-optim", "no-bn"]
COMMANDS = {command.name for command in app.registered_commands if not command.hidden}
OTHERS = [name for name in ("inspect", "report", "lab", "compare", "ui") if name in COMMANDS]
# The valid arguments each command gets besides the bad one (lab's would run the study, but
# every case below fails before anything runs).
BASE = {
    "time": TINY_ARGS,
    "sweep-workers": without("--workers"),
    "compare-device": without("--device"),
    "compare-optim": TINY_ARGS,
    "no-bn": TINY_ARGS,
    "inspect": ["--quiet"],
    "report": ["--quiet", "--out", "report"],
    "lab": ["--quiet", "--preset", "quick", "--dataset", "synthetic", "--device", "cpu"],
    "compare": ["--quiet", "--baseline", "no-such-experiment"],
    "ui": [],
}
CIFAR10 = ["--dataset", "cifar10", "--data-dir"]

# (args, the option the message must name, exit code); "afile" is a file, "corrupt" holds a
# damaged CIFAR-10 batch file.
SHARED = [
    (["--epochs", "x"], "--epochs", USAGE),
    (["--epochs", "0"], "--epochs", USAGE),
    (["--batch-size", "-16"], "--batch-size", USAGE),
    (["--train-size", "0"], "--train-size", USAGE),
    (["--lr", "fast"], "--lr", USAGE),
    (["--lr", "-0.1"], "--lr", USAGE),
    (["--weight-decay", "-1"], "--weight-decay", USAGE),
    (["--loader-timeout", "soon"], "--loader-timeout", USAGE),
    (["--loader-timeout", "-1"], "--loader-timeout", USAGE),
    (["--optimizer", "foo"], "--optimizer", USAGE),
    (["--dataset", "imagenet"], "--dataset", USAGE),
    (["--device", "tpu"], "--device", USAGE),
    (["--device", "cuda"], "--device", USAGE),  # no CUDA here
    (["--workers", "x"], "--workers", USAGE),
    (["--workers", "-1"], "--workers", USAGE),
    (["--persistent-workers"], "--persistent-workers", USAGE),  # with --workers 0
    (["--seed", "-1"], "--seed", USAGE),
    (["--seed", str(2**40)], "--seed", USAGE),
    (["--train-size", str(10**12)], "--train-size", USAGE),  # more than memory holds
    (["--test-size", str(10**12)], "--test-size", USAGE),
    (["--batch-size", str(10**12)], "--batch-size", USAGE),
    (["--workers", str(10**6)], "--workers", USAGE),
    (["--loader-timeout", "inf"], "--loader-timeout", USAGE),
    (["--loader-timeout", "nan"], "--loader-timeout", USAGE),
    (["--lr", "inf"], "--lr", USAGE),
    (["--lr", "nan"], "--lr", USAGE),
    (["--weight-decay", "inf"], "--weight-decay", USAGE),
    (["--momentum", "inf"], "--momentum", USAGE),
    (["--device", "cuda:\u0663"], "--device", USAGE),  # an Arabic-Indic digit three
    (["--device", "cuda:" + "9" * 20], "--device", USAGE),
    ([*CIFAR10, "empty", "--train-size", "60000"], "--train-size", USAGE),  # > CIFAR-10's
    ([*CIFAR10, "empty"], "--data-dir", RUNTIME),  # absent, and no download
    ([*CIFAR10, "afile/data"], "--data-dir", RUNTIME),  # cannot be created
    ([*CIFAR10, "corrupt"], "--data-dir", RUNTIME),
]
TRACKING = [
    (["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri", RUNTIME),  # nothing listens
    (["--tracking-uri", "http://"], "--tracking-uri", USAGE),
    (["--tracking-uri", "foo://bar"], "--tracking-uri", USAGE),
    (["--tracking-uri", "sqlite:"], "--tracking-uri", USAGE),
    (["--tracking-uri", "sqlite:///:memory:"], "--tracking-uri", USAGE),
    (["--tracking-uri", "./mlruns"], "--tracking-uri", USAGE),  # the legacy file store
    (["--tracking-uri", "sqlite:///afile/mlflow.db"], "--tracking-uri", RUNTIME),
    (["--tracking-uri", "postgresql://u@127.0.0.1:9/db"], "--tracking-uri", RUNTIME),
    (["--tracking-uri", "http://[::1"], "--tracking-uri", USAGE),
    (["--tracking-uri", "sqlite:///afolder"], "--tracking-uri", RUNTIME),  # a folder
    (["--tracking-uri", "sqlite:///afile"], "--tracking-uri", RUNTIME),  # not a database
    (["--tracking-uri", "http://127.0.0.1:99999"], "--tracking-uri", USAGE),  # no such port
    (["--experiment", "x" * 501], "--experiment", USAGE),  # MLflow takes 500 characters
    (["--experiment", " "], "--experiment", USAGE),
]
OWN = {
    "sweep-workers": [
        (["--workers", "4,x"], "--workers", USAGE),
        (["--workers", ""], "--workers", USAGE),
        (["--workers", "-4"], "--workers", USAGE),
        (["--workers", "0,0"], "--workers", USAGE),
    ],
    "compare-device": [
        (["--devices", "cpu,tpu"], "--devices", USAGE),
        (["--devices", "cuda"], "--devices", USAGE),
        (["--devices", ""], "--devices", USAGE),
        (["--devices", "cpu,cpu"], "--devices", USAGE),
        (["--cpu-batches", "0"], "--cpu-batches", USAGE),
        (["--cpu-batches", "x"], "--cpu-batches", USAGE),
    ],
    "compare-optim": [
        (["--optimizers", "sgd,,adam"], "--optimizers", USAGE),
        (["--optimizers", "foo"], "--optimizers", USAGE),
        (["--optimizers", "sgd,sgd"], "--optimizers", USAGE),
        (["--optimizers", ""], "--optimizers", USAGE),
    ],
    "inspect": [
        (["--optimizers", "sgd,foo"], "--optimizers", USAGE),
        (["--optimizers", "adam,adam"], "--optimizers", USAGE),
        (["--batch-size", "0"], "--batch-size", USAGE),
        (["--batch-size", "x"], "--batch-size", USAGE),
        (["--seed", "x"], "--seed", USAGE),
    ],
    "report": [
        (["--runs", "C3"], "--runs", USAGE),
        (["--runs", "C9=abc"], "--runs", USAGE),
        (["--runs", "C3=a,C3=a"], "--runs", USAGE),
        (["--runs", "C3=a,C3=b"], "--runs", USAGE),
        (["--runs", ""], "--runs", USAGE),
        (["--runs", "C3=nosuchrun"], "--runs", USAGE),
        (["--out", "afile/report"], "--out", RUNTIME),
        (["--out", "mlartifacts"], "--out", USAGE),  # the store's own artifact folder
        (["--out", "afile"], "--out", USAGE),  # a file
    ],
    "lab": [
        (["--preset", "huge"], "--preset", USAGE),
        (["--dataset", "imagenet"], "--dataset", USAGE),
        (["--device", "tpu"], "--device", USAGE),
        (["--out", "afile/report"], "--out", RUNTIME),
        (["--out", "mlartifacts"], "--out", USAGE),
    ],
    "compare": [
        (["--baseline", "sqlite:///afile"], "--baseline", USAGE),  # not a database
        (["--baseline", "sqlite:///afolder"], "--baseline", USAGE),
        (["--baseline", ""], "--baseline", USAGE),
        (["--fail-if-slower", "x"], "--fail-if-slower", USAGE),
        (["--out", "afile/compare"], "--out", RUNTIME),
    ],
    "ui": [
        (["--port", "0"], "--port", USAGE),
        (["--port", "x"], "--port", USAGE),
        (["--port", "65536"], "--port", USAGE),
    ],
}
SKIP = {  # options a command does not have (its own option of that name is tested in OWN)
    "sweep-workers": ("--workers", "--persistent-workers"),  # 0 workers run without it
    "compare-device": ("--device",),
    "compare-optim": ("--optimizer",),
    "ui": ("--experiment",),  # it serves every experiment
}


def test_every_command_is_in_the_table():
    assert set(BASE) >= COMMANDS


# Every bad value of the shared options is tried on `time`; the other commands, which parse
# and validate them with the same code, get one case of each kind of error: one that typer
# refuses, one that the config refuses, a device, the data (missing and damaged), the store.
KINDS = [
    (["--epochs", "x"], "--epochs", USAGE),
    (["--lr", "-0.1"], "--lr", USAGE),
    (["--device", "cuda"], "--device", USAGE),
    ([*CIFAR10, "empty"], "--data-dir", RUNTIME),
    ([*CIFAR10, "corrupt"], "--data-dir", RUNTIME),
    (["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri", RUNTIME),
    (["--tracking-uri", "foo://bar"], "--tracking-uri", USAGE),
    (["--tracking-uri", "sqlite:///afile"], "--tracking-uri", RUNTIME),
    (["--experiment", " "], "--experiment", USAGE),
]


def cases():
    for command in TRAINING + OTHERS:
        shared = SHARED + TRACKING if command == "time" else [
            case for case in KINDS if case in TRACKING or command in TRAINING
        ]  # fmt: skip
        table = shared + OWN.get(command, [])
        for args, option, code in table:
            if args[0] not in SKIP.get(command, ()):
                yield pytest.param(command, args, option, code, id=f"{command} {' '.join(args)}")


@pytest.fixture
def bad_files(store, tmp_path, monkeypatch):
    """In the working folder: `afile`, a file, and `corrupt`, a CIFAR-10 folder with a damaged
    batch; nothing can be downloaded, and there is no CUDA."""
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "afolder").mkdir()
    folder = tmp_path / "corrupt" / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"\x80\x04 truncated pickle")
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    # use_store sets MLflow's HTTP settings unless they are set: keep them to this test
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.mark.parametrize(("command", "args", "option", "code"), cases())
def test_bad_input_is_one_clear_line_and_leaves_nothing_running(
    cli, client, bad_files, command, args, option, code
):
    result = cli(command, *BASE[command], *args)

    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert option in one_message(result.output), result.output
    if code == RUNTIME:
        [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert option in error
    runs = all_runs(client)
    assert not any(run.info.status == "RUNNING" for run in runs)
    if code == USAGE:
        assert runs == []
        assert [e.name for e in client.search_experiments()] == ["Default"]


@pytest.mark.parametrize(
    "environment",
    [{"WORLD_SIZE": "2"}, {"RANK": "1"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"LOCAL_RANK": "0"}],
)
def test_torchrun_variables_half_set_are_one_line_and_no_run(cli, client, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == USAGE, result.output
    assert "Traceback" not in result.output
    assert "torchrun's environment" in one_message(result.output)
    assert all_runs(client) == []


@pytest.mark.parametrize(
    "uri",
    ["postgresql://user:s3cret@127.0.0.1:9/db", "http://user:s3cret@127.0.0.1:9"],
)
def test_a_password_in_the_tracking_uri_is_never_shown(cli, bad_files, uri):
    result = cli("time", *TINY_ARGS, "--tracking-uri", uri)
    assert result.exit_code == RUNTIME, result.output
    assert "s3cret" not in result.output and "user:***@127.0.0.1" in result.output


def test_no_mlproject_parameter_can_become_an_option():
    # MLflow quotes each value as one word; a value placed where an option's name goes
    # (`--{switch}`) could still be any option, e.g. -P switch=tracking-uri=...
    import yaml

    project = yaml.safe_load((Path(__file__).parents[1] / "MLproject").read_text())
    for name, entry in project["entry_points"].items():
        assert "--{" not in entry["command"] and "-{" not in entry["command"], name


def test_a_switch_from_the_environment_is_true_or_false_and_nothing_else(cli, client, monkeypatch):
    monkeypatch.setenv("CIFAREXP_PERSISTENT_WORKERS", "tracking-uri=sqlite:///evil.db")
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == USAGE and "CIFAREXP_PERSISTENT_WORKERS" in one_message(result.output)
    assert all_runs(client) == [] and not Path("evil.db").exists()


@pytest.mark.parametrize(
    "spec", ["", "garbage", "[]", "null", '{"config": {}}', '{"config": {"epochs": 0}}']
)
def test_launched_run_with_a_garbage_spec_in_its_environment_is_one_line(
    cli, client, monkeypatch, spec
):
    # Given the internal launched-run, reachable from the environment, with garbage in it,
    monkeypatch.setenv("CIFAREXP_LAUNCHED_RUN", spec)
    # when
    result = cli("launched-run")
    # then one line naming the variable, and no run.
    assert result.exit_code == RUNTIME, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    [error] = result.output.strip().splitlines()
    assert error.startswith("Error: CIFAREXP_LAUNCHED_RUN does not say what to train"), error
    assert all_runs(client) == []


@pytest.mark.parametrize(
    ("command", "args", "suggested"),
    [
        ("time", ["--optimizer", "adamm"], "(did you mean 'adam'?)"),
        ("compare-optim", ["--optimizers", "sgd,adamm"], "(did you mean 'adam'?)"),
        ("inspect", ["--optimizers", "nesterv"], "(did you mean 'nesterov'?)"),
    ],
)
def test_a_typo_in_a_name_says_what_was_meant(cli, client, command, args, suggested):
    result = cli(command, *args)
    assert result.exit_code == USAGE and suggested in " ".join(result.output.split())
    assert not all_runs(client)
