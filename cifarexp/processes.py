"""Processes and signals: what a stop signal does to a run, and the launcher that runs a
command as several processes through torchrun.

A stop is any signal that would end the process and that it can catch (SIGINT: Ctrl-C;
SIGTERM: `kill`, a scheduler's limit; SIGHUP: a closed terminal; SIGQUIT, SIGUSR1, SIGXCPU,
...: see STOPS). It is recorded when it arrives and raised as an exception: `Interrupted`
(a KeyboardInterrupt), which ends the runs KILLED and the process with exit code 128 +
the signal's number, or, under torchrun, `Stopped` for its SIGTERM, which ends them FAILED
(torchrun stops every rank once one has failed). While a run is being started or ended
(`stops_deferred`) a stop is only recorded, and `raise_pending` raises it once the run's
status is written; a stop whose exception Python swallowed (one raised inside a
garbage-collector callback, say) is still pending, so the run it interrupted cannot end
FINISHED.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cifarexp.config import CifarexpError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in each process
LAUNCH_GRACE_S = 30  # after Ctrl-C, how long a launched job gets to end its runs
PR_SET_PDEATHSIG = 1  # prctl(2)
# Every signal whose default action ends the process and that a handler can catch, save
# those a fault of the process itself raises (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT,
# SIGTRAP, SIGSYS: it cannot go on after them) and SIGPIPE, which Python ignores (a write to
# a closed pipe fails instead; see console.guard_output).
STOPS = (
    *(signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1),
    *(signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGXCPU),
    *(signal.SIGXFSZ, signal.SIGIO, signal.SIGPWR, signal.SIGSTKFLT),
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),  # the real-time signals
)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived (a KeyboardInterrupt, as Ctrl-C's: every run it interrupts
    ends KILLED); the process exits with 128 + its number, as the shell reports a process
    the signal ended."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(stop: KeyboardInterrupt) -> int:
    """The exit code of a process that `stop` ended: 128 + the signal's number (130 for a
    plain KeyboardInterrupt, Ctrl-C's)."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


def signal_name(stop: KeyboardInterrupt) -> str:
    return signal.Signals(getattr(stop, "signum", signal.SIGINT)).name


class Stopped(CifarexpError):
    """torchrun stopped this process (SIGTERM): another rank failed, or the job was stopped."""

    def __init__(self) -> None:
        super().__init__(
            "torchrun stopped this process: another rank failed (its error is in torchrun's "
            "output) or the job was stopped; the run is FAILED"
        )


class _Stops:
    """The stops this process received and has not acted upon yet."""

    def __init__(self, under_torchrun: bool = False) -> None:
        self.pending: list[int] = []
        self.deferring = 0  # depth of stops_deferred
        self.under_torchrun = under_torchrun
        self.stopping = False  # under torchrun: the first stop came; later ones are ignored

    def handle(self, signum: int) -> None:
        if self.stopping:
            return
        self.stopping = self.under_torchrun
        self.pending.append(signum)
        if not self.deferring:
            raise self.error(signum)

    def error(self, signum: int) -> BaseException:
        if self.under_torchrun and signum == signal.SIGTERM:
            return Stopped()
        return Interrupted(signum)


_stops = _Stops()


def handle_stops(*, under_torchrun: bool) -> None:
    """Take every stop (STOPS) as a run should: a stop ends the run KILLED (exit 128 + the
    signal's number: 130 for Ctrl-C, 143 for SIGTERM); under torchrun its SIGTERM ends it
    FAILED, and once stopping, a rank ignores further stops
    (torchrun may send several: a launcher's death reaches it once per thread of that
    launcher, and each one makes it signal the ranks again; it SIGKILLs a rank that has not
    exited after its grace period)."""
    global _stops
    _stops = _Stops(under_torchrun)
    for stop in STOPS:
        signal.signal(stop, _on_signal)
    if not isinstance(sys.unraisablehook, _QuietStops):
        sys.unraisablehook = _QuietStops(sys.unraisablehook)


class _QuietStops:
    """Python's report of an exception it could not raise (in a garbage-collector callback,
    or in a callback at a DataLoader worker's fork), except a stop's: that one is still
    pending (see `raise_pending`), so it is no error, and its traceback is no news."""

    def __init__(self, hook: Callable) -> None:
        self.hook = hook

    def __call__(self, unraisable: object) -> None:
        if not isinstance(unraisable.exc_value, (Interrupted, Stopped)):
            self.hook(unraisable)


def _on_signal(signum: int, frame: object) -> None:
    """Every stop's handler; SIGUSR1 is also how `interrupt_main` reaches the main thread.

    A stop turns PyTorch's SIGCHLD check off: the same signal often reaches the DataLoader's
    workers too (Ctrl-C in a terminal, `timeout`, a scheduler signalling the process group),
    and the check would raise their death as a worker failure wherever the main thread is
    then, the run's ending included. A worker that dies on its own is still found, by the
    DataLoader's own poll."""
    if _for_main:
        raise _for_main.pop()
    # (A no-op handler, not SIG_DFL: a SIGCHLD already arriving would raise "ignored due
    # to race condition".)
    signal.signal(signal.SIGCHLD, _no_check)
    _stops.handle(signum)


def _no_check(signum: int, frame: object) -> None:
    """SIGCHLD once stopping: the children's death is expected."""


@contextmanager
def stops_deferred() -> Iterator[None]:
    """Inside, a stop is recorded and not raised (see `raise_pending`): a run being started
    or ended is not interrupted half-written, which would leave it RUNNING."""
    _stops.deferring += 1
    try:
        yield
    finally:
        _stops.deferring -= 1


@contextmanager
def uninterruptible() -> Iterator[None]:
    """`stops_deferred`, then the stop received meanwhile raised (unless an error is leaving
    already: the stop stays pending)."""
    with stops_deferred():
        yield
    raise_pending()


def pending() -> bool:
    """Whether a stop was received and not acted upon yet."""
    return bool(_stops.pending)


def raise_pending() -> None:
    """Raise the stop received meanwhile (deferred, or swallowed by Python), if any."""
    if _stops.pending and not _stops.deferring:
        signum = _stops.pending[0]
        _stops.pending.clear()  # the exception raised now stands for them
        raise _stops.error(signum)


def acknowledge() -> None:
    """The stops received so far have been acted upon (their runs are ended)."""
    _stops.pending.clear()


_for_main: list[BaseException] = []  # what interrupt_main raises in the main thread


def allow_interrupts() -> bool:
    """Let `interrupt_main` reach this process's main thread (call it from there); whether
    it can (signal handlers are set from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGUSR1, _on_signal)  # already so under `main`; not in a test
    return True


def interrupt_main(error: BaseException) -> None:
    """Raise `error` in the main thread, even one blocked in a system call that would never
    return (a read from a stopped DataLoader worker): SIGUSR1 interrupts the call and its
    handler raises `error` (a SIGUSR1 from outside, with no error waiting, is a stop). Only
    after `allow_interrupts`; `withdraw_interrupt` cancels it."""
    _for_main.append(error)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


def withdraw_interrupt() -> None:
    """The main thread has acted on its own: a late interrupt raises nothing."""
    _for_main.clear()


def kill_children() -> None:
    """SIGKILL this process's multiprocessing children (a DataLoader's workers) and reap
    them. From the main thread, with PyTorch's SIGCHLD check off meanwhile: it would raise
    their death wherever the main thread is then."""
    in_main = threading.current_thread() is threading.main_thread()
    check = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if in_main else None
    try:
        for child in multiprocessing.active_children():
            child.kill()
            child.join()
    finally:
        if in_main:
            signal.signal(signal.SIGCHLD, check)


# ---------------------------------------------------------------- several processes


def launched() -> bool:
    """Whether a launcher (torchrun) started this process: any of its variables is set."""
    return any(name in os.environ for name in LAUNCH_VARIABLES)


def relaunch(nproc: int, argv: list[str]) -> None:
    """Run this command again as `nproc` processes on this machine, through torchrun's own
    launcher (torch.distributed.run, as `cifarexp.torchrun` runs it), in place of this
    process; never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, torchrun_command(nproc, without_nproc(argv)))


def launch(nproc: int, argv: list[str], env: dict[str, str]) -> int:
    """Run `cifarexp ARGV` as `nproc` processes on this machine through torchrun's launcher,
    with `env` added to this environment, and wait; their exit code. They run in a process
    group of their own, which this process stops if it is stopped (see `_stop`), or which
    stops itself if this process is killed outright (see `interrupt_on_parent_death`)."""
    environment = {**os.environ, **env}
    environment.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run is this process's, not theirs
    command = torchrun_command(nproc, argv)
    process = subprocess.Popen(
        command, env=environment, start_new_session=True, preexec_fn=interrupt_on_parent_death()
    )
    try:
        return process.wait()
    except BaseException:  # Ctrl-C, a SIGTERM, or any other exit
        _stop(process)
        raise


def interrupt_on_parent_death() -> Callable[[], None] | None:
    """On Linux, what a launched process (torchrun, `cifarexp ui`'s server) runs before it
    starts: ask the kernel for a SIGINT when this process dies, even killed outright
    (SIGKILL), so that a job stops as on a Ctrl-C (every rank ends its run KILLED) rather
    than training on with no one waiting. prctl is looked up here, in this process: the
    child calls it and nothing else."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGINT))
        if os.getppid() != parent:  # it died before the request: nothing waits for the job
            os._exit(1)

    return set_parent_death_signal


def _stop(process: subprocess.Popen) -> None:
    """Stop a launched job as Ctrl-C stops a run: SIGINT to torchrun, which passes it on to
    every rank (each ends its run KILLED). If the job has not ended LAUNCH_GRACE_S later (or
    on another Ctrl-C): SIGTERM to torchrun, then SIGKILL to the job's whole group."""
    for stop in (
        lambda: process.send_signal(signal.SIGINT),
        process.terminate,
        lambda: os.killpg(process.pid, signal.SIGKILL),
    ):
        with contextlib.suppress(ProcessLookupError):
            stop()
        with contextlib.suppress(subprocess.TimeoutExpired, KeyboardInterrupt):
            process.wait(timeout=LAUNCH_GRACE_S)
            return


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's launcher (`cifarexp.torchrun`) running `cifarexp ARGV` as `nproc`
    processes here."""
    return [
        sys.executable,
        "-m",
        "cifarexp.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cifarexp",
        *argv,
    ]


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` less `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
