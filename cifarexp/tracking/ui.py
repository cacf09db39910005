"""`cifarexp ui`: MLflow's UI on the store the commands use, as a server of its own
(`python -m mlflow server`, this interpreter's: no activated venv needed), on 127.0.0.1 and
a free port, until it is stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow

from cifarexp import processes
from cifarexp.config import CifarexpError, ConfigError
from cifarexp.tracking.store import artifact_root, redact, sqlite_path

HOST = "127.0.0.1"
PORT = 5000  # MLflow's own, and the links' where it is free
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's default store, as the commands resolve it
START_TIMEOUT_S = 120  # a first start on a slow machine migrates the database first
STOP_GRACE_S = 10
RUNS_VIEW = "?workflowType=machine_learning"  # the experiment's runs, not MLflow 3's traces


def command(uri: str) -> str:
    """The command that opens the UI on `uri`, started as this process was (`program`):
    MLflow's default store (mlflow.db in this folder) needs no option."""
    default = uri.startswith("sqlite:///") and "?" not in uri and (
        Path(sqlite_path(uri)).resolve() == Path(sqlite_path(DEFAULT_URI)).resolve()
    )  # fmt: skip
    ui = f"{program()} ui"
    return ui if default else f"{ui} --tracking-uri {redact(uri)}"


def program() -> str:
    """`cifarexp`, or the path this process was started by where `cifarexp` alone would not
    find it (`.venv/bin/cifarexp` with the venv not activated, as `make run` runs it)."""
    typed = sys.argv[0] if sys.argv else ""
    if Path(typed).name != "cifarexp" or os.sep not in typed:
        return "cifarexp"
    found = shutil.which("cifarexp")
    same = found is not None and Path(found).resolve() == Path(typed).resolve()
    return "cifarexp" if same else typed


def is_server(uri: str) -> bool:
    """Whether `uri` is a tracking server, which serves its own UI."""
    return uri.startswith(("http://", "https://"))


def free_port(port: int | None) -> int:
    """`port` if given and free (else a ConfigError), else PORT if free, else one the
    system picks."""
    for wanted in [port] if port is not None else [PORT, 0]:
        with socket.socket() as probe:
            try:
                probe.bind((HOST, wanted))
            except OSError as exc:
                if port is not None:
                    raise ConfigError(f"{HOST}:{port} is in use ({exc.strerror})", "port") from None
                continue
            return probe.getsockname()[1]
    raise CifarexpError(f"no free port on {HOST}")  # pragma: no cover (bind(0) fails)


def experiment_links(base: str) -> list[str]:
    """One line per experiment of the store (MLflow's empty Default left out): its name and
    the UI's link to its runs, cifarexp's experiments first."""
    experiments = mlflow.MlflowClient().search_experiments(max_results=1000)
    shown = []
    for experiment in experiments:
        runs = mlflow.MlflowClient().search_runs([experiment.experiment_id], max_results=1)
        if experiment.name == "Default" and not runs:
            continue
        link = f"{base}/#/experiments/{experiment.experiment_id}{RUNS_VIEW}"
        shown.append((not experiment.name.startswith("cifarexp-"), experiment.name, link))
    return [f"{name}: {link}" for _, name, link in sorted(shown)]


@dataclass
class Server:
    """A running `mlflow server` and its log (what it printed)."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def tail(self, lines: int = 5) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's process group (MLflow's launcher and its uvicorn), then
        SIGKILL if it has not ended STOP_GRACE_S later."""
        for stop in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, stop)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_GRACE_S)
                break
        with contextlib.suppress(OSError):
            self.log.unlink()


def start(uri: str, port: int) -> Server:
    """`mlflow server` on `uri`, 127.0.0.1:`port`, in a process group of its own (a Ctrl-C
    reaches cifarexp, which stops it: see `Server.stop`; it stops itself if cifarexp is
    killed outright); returns once it answers, else a CifarexpError with what it said."""
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    root = artifact_root(uri)
    if root is not None:  # where a sqlite store's runs keep theirs, never ./mlartifacts here
        args += ["--artifacts-destination", str(root)]
    args += ["--host", HOST, "--port", str(port), "--workers", "1"]
    # Without MLflow's background job runner (GenAI jobs, which the study has none of): it
    # only slows the start. Unless the user has set it.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    handle, name = tempfile.mkstemp(prefix="cifarexp-ui-", suffix=".log")
    with os.fdopen(handle, "w") as log:
        process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=processes.interrupt_on_parent_death(),
        )  # fmt: skip
    server = Server(process, port, Path(name))
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise CifarexpError(
                f"the MLflow UI did not start (exit status {server.process.returncode}): "
                f"{server.tail()}"
            )
        with contextlib.suppress(urllib.error.URLError, OSError):
            urllib.request.urlopen(f"{server.url}/health", timeout=2).close()
            return
        time.sleep(0.3)
    raise CifarexpError(f"the MLflow UI did not answer within {START_TIMEOUT_S} s: {server.tail()}")
