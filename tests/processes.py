"""Real processes, for what only a process shows: signals, concurrent writers, a tracking
server that goes away."""

from __future__ import annotations

import contextlib
import multiprocessing
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


class Started:
    """A process in its own process group (session), its output in `log_path`: what the
    two ways of starting one below share."""

    log_path: Path
    pid: int

    def log(self) -> str:
        return self.log_path.read_text()

    def poll(self) -> int | None: ...

    def wait(self, timeout: float = 300) -> int: ...

    def stop(self) -> None:
        """Kill the process and everything it started (its own process group)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may have just ended
                os.killpg(self.pid, signal.SIGKILL)
        self.wait(timeout=30)


@dataclass
class Process(Started):
    """A process started by `start`."""

    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float = 300) -> int:
        return self.popen.wait(timeout=timeout)


def start(
    command: list[str],
    cwd: Path,
    name: str,
    env: dict[str, str] | None = None,
    stdout: int | None = None,
) -> Process:
    """`command` in its own process group, output into `cwd`/`name`.log (only its stderr if
    `stdout`, a file descriptor, takes its stdout); the environment is this one's (the tests'
    tracking store included) updated with `env`."""
    log_path = cwd / f"{name}.log"
    with log_path.open("w") as log:
        popen = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=log if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else log,
            start_new_session=True,
        )
    return Process(popen, log_path)


# `cifarexp ...` as a new process forked from a server that has imported cifarexp, torch and
# MLflow once (importing them takes seconds of CPU a process here): the same program from its
# first line, its own session, working folder, environment and output.
ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ["cifarexp.cli", "cifarexp.study.runs", "cifarexp.study.comparisons", "analysis.report"]
_forkserver = multiprocessing.get_context("forkserver")
_forkserver.set_forkserver_preload(PRELOAD)


# start_cifarexp's stdout: a pipe whose reader has gone, as `cifarexp ... | head -1`'s once
# head has read its line.
BROKEN_PIPE = "|"


@dataclass
class ForkedProcess(Started):
    """`cifarexp ARGS` forked from the preloaded server (see `start_cifarexp`)."""

    process: multiprocessing.process.BaseProcess
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"cifarexp (pid {self.pid})", timeout)
        return self.process.exitcode


def _run_cifarexp(
    args: list[str], cwd: Path, env: dict[str, str], log_path: Path, stdout: str | None
) -> None:
    """In the forked process: become `cifarexp ARGS` started in `cwd` with `env`."""
    multiprocessing.set_start_method(
        None, force=True
    )  # a new process's (the forkserver set its own)
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    if stdout == BROKEN_PIPE:
        reader, out = os.pipe()
        os.close(reader)
    else:
        out = log if stdout is None else os.open(stdout, os.O_WRONLY)
    os.dup2(out, 1)
    os.dup2(log, 2)
    sys.argv = ["cifarexp", *args]
    from cifarexp.cli import main

    main()


def start_cifarexp(
    *args: str,
    cwd: Path,
    name: str = "cifarexp",
    env: dict[str, str] | None = None,
    stdout: str | None = None,
) -> ForkedProcess:
    """`cifarexp ARGS` in a process of its own (see PRELOAD), output into `cwd`/`name`.log
    (only its stderr if `stdout`, a file's path or BROKEN_PIPE, takes its stdout)."""
    log_path = cwd / f"{name}.log"
    log_path.touch()
    environment = {**os.environ, **(env or {})}
    process = _forkserver.Process(
        target=_run_cifarexp, args=(list(args), cwd, environment, log_path, stdout)
    )
    here = os.getcwd()
    os.chdir(ROOT)  # the server, started with the first process, works in no test's folder
    try:
        process.start()
    finally:
        os.chdir(here)
    return ForkedProcess(process, log_path)


def wait_for_epoch(
    client: MlflowClient, process: Process, timeout: float = 180, variant: str | None = None
):
    """The first run (of `variant`, if given) that has logged an epoch, once one has
    (polling the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ended before an epoch:\n{process.log()}"
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
