"""Real processes, for what only a process shows: signals, concurrent writers, a tracking
server that goes away."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import all_runs


@dataclass
class Process:
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 300) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill the process and everything it started (its own process group)."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)


def start(command: list[str], cwd: Path, name: str, env: dict[str, str] | None = None) -> Process:
    """`command` in its own process group, output into `cwd`/`name`.log; the environment is
    this one's (the tests' tracking store included) updated with `env`."""
    log_path = cwd / f"{name}.log"
    with log_path.open("w") as log:
        popen = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(popen, log_path)


def start_cifarexp(*args: str, cwd: Path, name: str = "cifarexp") -> Process:
    return start([sys.executable, "-m", "cifarexp", *args], cwd, name)


def wait_for_epoch(
    client: MlflowClient, process: Process, timeout: float = 180, variant: str | None = None
):
    """The first run (of `variant`, if given) that has logged an epoch, once one has
    (polling the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.popen.poll() is None, f"ended before an epoch:\n{process.log()}"
        logged = [
            run
            for run in all_runs(client)
            if "epoch_time_s" in run.data.metrics
            and variant in (None, run.data.tags.get("cifarexp.variant"))
        ]
        if logged:
            return logged[0]
        time.sleep(0.1)
    raise AssertionError(f"no epoch logged in {timeout} s:\n{process.log()}")


def processes_in(folder: Path) -> list[int]:
    """The pids of the processes whose working directory is `folder` (Linux /proc), this
    one (the tests may work there too) left out."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if (entry / "cwd").resolve(strict=True) == folder.resolve():
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def wait_until_gone(folder: Path, timeout: float) -> list[int]:
    """The processes still working in `folder` after up to `timeout` s (none, once all exit)."""
    deadline = time.monotonic() + timeout
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    backend_uri: str  # the server's own sqlite store, to look at once it is gone
    process: Process


def start_server(root: Path, empty_store: Path, timeout: float = 180) -> Server:
    """`mlflow server` on a free 127.0.0.1 port with a sqlite backend and an artifact folder
    in `root`, once /health answers."""
    shutil.copy(empty_store, root / "backend.db")  # already migrated: starts in seconds
    backend_uri = f"sqlite:///{root / 'backend.db'}"
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--backend-store-uri", backend_uri, "--artifacts-destination", str(root / "artifacts")),
        *("--workers", "1"),
    ]
    # No background job runner: it only slows the start.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_TRACKING_URI": backend_uri}
    process = start(command, root, "server", env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return Server(url, backend_uri, process)
        except OSError:
            if process.popen.poll() is not None:
                break
            time.sleep(0.25)
    process.stop()
    raise AssertionError(f"mlflow server did not start:\n{process.log()[-3000:]}")
