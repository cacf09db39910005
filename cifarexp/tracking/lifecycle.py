"""The life of a run: started (or reopened by --resume, claimed by one process), ended
FINISHED, FAILED or KILLED, never left RUNNING by a failure or a stop."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import psutil
from mlflow.exceptions import MlflowException

from cifarexp import __version__, processes
from cifarexp.config import CifarexpError
from cifarexp.tracking.names import COMMIT, ERROR, EXPERIMENT_KIND, NOTE, OWNER, VERSION
from cifarexp.tracking.queries import children_filter
from cifarexp.tracking.store import (
    STORE_ERRORS,
    Source,
    StoreFailed,
    artifact_root,
    causes,
    locked,
    root_cause,
    shown_uri,
    sqlite_path,
)

if TYPE_CHECKING:
    from cifarexp.tracking.tracker import Tracker


@contextmanager
def start_run(
    tracker: Tracker,
    experiment: str,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, object] | None = None,
    parent: str | None = None,
    reopen: str | None = None,
    about: str = "",
    training: bool = False,
) -> Iterator[str | None]:
    """A run that ends FINISHED, FAILED (error recorded as a tag) or KILLED (Ctrl-C).

    Every run is tagged with cifarexp's version and source commit; a `training` run logs
    system metrics (see Tracker.system_metrics); `about` describes a new experiment.

    A child of `parent` (a run id: the active run of this process, or one another process
    keeps open) goes into its parent's experiment. Under `mlflow run` (MLFLOW_RUN_ID set)
    the project's run is this run, in the experiment `mlflow run` chose. `reopen` continues
    an earlier run (by id) instead of starting one, and marks KILLED its children that a
    process killed outright left RUNNING. If the store itself fails, the StoreFailed error
    says which epochs reached it. Yields the run id; on a process that does not write (a
    rank other than 0) nothing is written and it yields None.
    """
    if not tracker.writes:
        yield None
        return
    run_id = None
    try:
        with processes.uninterruptible():  # a stop meanwhile waits until the run can end KILLED
            tags = {**source_tags(), **(tags or {})}
            run_id = _create_run(
                tracker, experiment, run_name, tags, parent, reopen, about, training
            )
        tracker.log_params(params or {})
        yield run_id
        with processes.uninterruptible():  # then raises the one deferred while FINISHED was written
            if not processes.pending():  # a stop whose exception Python swallowed ends it KILLED
                _end_run(tracker, run_id, "FINISHED")
    except KeyboardInterrupt:
        _end_failed_run(tracker, run_id, "KILLED")
        raise
    except StoreFailed:
        _end_failed_run(tracker, run_id, "FAILED")  # one try, no error tag: the store is failing
        raise
    except STORE_ERRORS as exc:
        # MLflow wraps whatever is raised inside its store calls, ours included (e.g. a
        # signal handler's error arriving mid-write, or an error SQLAlchemy raised while
        # handling it): that is not a failing store.
        behind = causes(exc)
        stop = next((e for e in behind if isinstance(e, KeyboardInterrupt)), None)
        if stop is not None:
            _end_failed_run(tracker, run_id, "KILLED")
            raise stop from None
        ours = next((e for e in behind if isinstance(e, CifarexpError)), None)
        if ours is not None:
            _end_failed_run(tracker, run_id, "FAILED", error=ours)
            raise ours from None
        if run_id is None:
            raise CifarexpError(f"tracking store {shown_uri()}: {root_cause(exc)}") from None
        _end_failed_run(tracker, run_id, "FAILED")
        raise StoreFailed(_store_failed(tracker, run_id, exc)) from None
    except BaseException as exc:
        _end_failed_run(tracker, run_id, "FAILED", error=exc)
        raise


def _create_run(
    tracker: Tracker,
    experiment: str,
    run_name: str | None,
    tags: Mapping[str, str] | None,
    parent: str | None,
    reopen: str | None,
    about: str,
    training: bool,
) -> str:
    """Start (or, with `reopen`, continue) the run as MLflow's active run; its id."""
    if parent is None and not os.environ.get("MLFLOW_RUN_ID"):
        _set_experiment(experiment, about)
    if reopen is not None:
        _claim(reopen)
    run = mlflow.start_run(
        run_id=reopen,
        run_name=run_name,
        nested=parent is not None,
        parent_run_id=parent,
        experiment_id=mlflow.get_run(parent).info.experiment_id if parent else None,
        tags={k: v for k, v in {**(tags or {}), **tracker.later_tags}.items() if v != ""},
        log_system_metrics=training and tracker.system_metrics,
    )
    if reopen is not None:
        kill_stale_children(reopen)
    return run.info.run_id


def _set_experiment(name: str, about: str) -> None:
    """Make `name` the active experiment; with a local sqlite store its artifacts go into
    `mlartifacts/` beside the database file (never the legacy ./mlruns). A new one is
    described by `about` and opens on its runs in the UI."""
    root = artifact_root(mlflow.get_tracking_uri())
    if root is not None and mlflow.get_experiment_by_name(name) is None:
        with contextlib.suppress(MlflowException):  # created meanwhile by another command
            mlflow.create_experiment(name, artifact_location=root.as_uri())
    experiment = mlflow.set_experiment(name)
    _check_artifacts(experiment)
    client = mlflow.MlflowClient()
    for key, value in {NOTE: about, **EXPERIMENT_KIND}.items():
        if value and key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)


@functools.cache
def source_tags() -> dict[str, str]:
    """cifarexp's version and, when the package lives in a git checkout, its commit (MLflow
    records none for the console script of a git-ignored .venv)."""
    tags = {VERSION: __version__}
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return tags
    if found.returncode == 0:
        tags[COMMIT] = found.stdout.strip()
    return tags


def _check_artifacts(experiment: mlflow.entities.Experiment) -> None:
    """An experiment's artifacts, where they are local files, can be written: checked before
    a run starts, so that a read-only or full artifact folder is one line, not a FAILED run."""
    location = experiment.artifact_location
    if not location.startswith(("file:", "/")):
        return  # a server or a cloud store: it answers for itself
    folder = Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CifarexpError(
            f"cannot write the artifacts of experiment {experiment.name!r} to {folder} "
            f"({exc.strerror})"
        ) from None


def _end_run(
    tracker: Tracker, run_id: str | None, status: str, error: BaseException | None = None
) -> None:
    """End `run_id` (if it is still the active run) with `status`, recording `error` as a
    tag; a store that fails meanwhile must not hide the error being raised. Called while
    stops wait (`processes.uninterruptible`): MLflow forgets the active run before it
    writes its status."""
    active = mlflow.active_run()
    if run_id is None or active is None or active.info.run_id != run_id:
        return  # never started, or ended already
    with contextlib.suppress(*STORE_ERRORS):
        if error is not None:
            mlflow.set_tag(ERROR, f"{type(error).__name__}: {error}"[:5000])
    with contextlib.suppress(*STORE_ERRORS):
        mlflow.end_run(status)
        tracker.ended.append((run_id, status))


def _end_failed_run(
    tracker: Tracker, run_id: str | None, status: str, error: BaseException | None = None
) -> None:
    """End a run that an exception stopped (a stop's, or a failure); a new stop that came
    while it was ended is raised once it is."""
    processes.acknowledge()  # the stop behind the exception, if any, is being acted on
    with processes.uninterruptible():
        _end_run(tracker, run_id, status, error)


def fail_project_run(message: str) -> None:
    """End the run `mlflow run` opened (MLflow checks no integer parameter, so a bad value
    reaches the command line after the run exists) FAILED, `message` as its error tag."""
    client = mlflow.MlflowClient()
    run_id = os.environ["MLFLOW_RUN_ID"]
    with contextlib.suppress(*STORE_ERRORS):
        client.set_tag(run_id, ERROR, message[:5000])
        client.set_terminated(run_id, "FAILED")


def _store_failed(tracker: Tracker, run_id: str, exc: BaseException) -> str:
    epochs = tracker.epochs_logged.get(run_id)
    if not epochs:
        logged = "no epoch logged"
    elif len(epochs) > 2 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        logged = f"epochs logged: {epochs[0]}-{epochs[-1]}"
    else:
        logged = f"epochs logged: {', '.join(map(str, epochs))}"
    ended = tracker.last_ended() == (run_id, "FAILED")  # one try, on a failing store
    return (
        f"the tracking store {shown_uri()} failed during run {run_id} "
        f"({root_cause(exc)}); {logged}; the run is "
        f"{'FAILED' if ended else 'left unfinished'}"
    )


def kill_stale_children(parent_id: str) -> list[str]:
    """Mark KILLED the children of `parent_id` still RUNNING (their process was killed
    outright, so nothing ended them); their ids. Only for a parent being resumed."""
    stale = mlflow.search_runs(
        filter_string=children_filter(parent_id, "RUNNING"),
        search_all_experiments=True,
        output_format="list",
    )
    client = mlflow.MlflowClient()
    for run in stale:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in stale]


def owner_tag() -> dict[str, str]:
    """This process, as the owner of the run it starts: host, pid, start time (for people)
    and start in seconds since boot (what tells it from a later process of the same pid)."""
    me = psutil.Process()
    owner = {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}
    return {OWNER: json.dumps(owner | {"since_boot": _since_boot(me)})}


def _since_boot(process: psutil.Process) -> float:
    """When `process` started, in seconds since boot: unlike its start on the clock (psutil
    adds the boot time as the clock now puts it), no clock adjustment moves it."""
    return process.create_time() - psutil.boot_time()


def owner_alive(text: str | None) -> bool | None:
    """Whether the process of an owner tag still runs: None where it cannot be told (another
    host's process); False without a tag or its start since boot (a run from before they
    were recorded)."""
    try:
        owner = json.loads(text or "")
    except json.JSONDecodeError:
        return False
    if owner.get("host") != socket.gethostname():
        return None
    try:
        return abs(_since_boot(psutil.Process(owner["pid"])) - owner["since_boot"]) < 0.5
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


def _claim(run_id: str) -> None:
    """Make this process the owner of the unfinished run `run_id`, which it reopens; a run
    that another live process still runs is refused. On a sqlite store the check and the
    claim hold the store's folder lock (two --resume at once: one wins); elsewhere the tag
    is read back after a pause, the last writer owning it."""
    uri = mlflow.get_tracking_uri()
    local = uri.startswith("sqlite:///")
    lock = locked(Path(sqlite_path(uri)).parent.resolve(), uri, Source(uri)) if local else None
    client, mine = mlflow.MlflowClient(), owner_tag()[OWNER]
    with lock or contextlib.nullcontext():
        run = client.get_run(run_id)
        holder = run.data.tags.get(OWNER)
        if run.info.status == "RUNNING" and owner_alive(holder) is not False:
            raise CifarexpError(
                f"run {run_id} is still being run by {_describe(holder)}: wait for it to end, "
                "or stop it first (its finished variants are kept)"
            )
        client.set_tag(run_id, OWNER, mine)
        client.update_run(run_id, status="RUNNING")  # taken: a second claim sees it running
    if not local:
        time.sleep(1)
        holder = client.get_run(run_id).data.tags.get(OWNER)
        if holder != mine:
            raise CifarexpError(f"run {run_id} was taken over meanwhile by {_describe(holder)}")


def _describe(owner: str | None) -> str:
    try:
        found = json.loads(owner or "")
        return f"pid {found['pid']} on {found['host']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process"
