"""The only module that talks to MLflow: the store, runs and their status, what gets logged."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
import psutil
from mlflow.entities import RunData
from mlflow.exceptions import MlflowException

from cifarexp import __version__, processes
from cifarexp.config import CifarexpError, ConfigError
from cifarexp.distributed import World

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cifarexp.engine import EpochResult

TAG = "cifarexp."  # prefix of every tag this project sets
COMMAND, EXERCISE, VARIANT, DATASET, DEVICE = (
    TAG + name for name in ("command", "exercise", "variant", "dataset", "device")
)
ERROR = TAG + "error"
VERSION, COMMIT = TAG + "version", "mlflow.source.git.commit"
NOTE = "mlflow.note.content"  # the description the UI shows on a run or an experiment
APPENDED = TAG + "description_appended"  # what a run added to its description as it ran
# The UI opens an experiment of this kind on its runs (not on GenAI traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SYSTEM_METRICS_INTERVAL_S = 1  # MLflow's sampler: CPU, memory, GPU, once a second
DIVERGED = TAG + "diverged"  # the epoch from which the training loss is not finite
VERDICT = TAG + "verdict"  # what bounds a profiled run's step (see profiling)
# A comparison's parent: a digest of its settings (set as it is created, so that --resume
# finds it even if it was killed at once), the process that runs it, the variants it ran.
SETTINGS, OWNER, VARIANTS = TAG + "settings", TAG + "owner", TAG + "variants"
WORKERS_FROM = TAG + "workers_from"  # the sweep run whose best count `--workers best` took
PRESET = TAG + "preset"  # the lab preset (full, quick) a run was made by
STORE_ERRORS: tuple[type[Exception], ...] = (MlflowException,)  # failures of the store itself
# Tracking URI schemes MLflow can keep runs in (+driver allowed); never the legacy file store.
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
# MLflow retries a failed HTTP request 7 times with exponential backoff (minutes) and waits
# 120 s for each reply: too long to notice that a tracking server went away mid-run.
# Used unless the user has set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow's SQLite sessions already wait up to 20 s for another process's lock (busy_timeout);
# a write still refused with "database is locked" is tried again after each of these pauses.
LOCKED_RETRY_DELAYS_S = (1, 2, 4, 8, 16, 32)
log = logging.getLogger(__name__)


class StoreFailed(CifarexpError):
    """The tracking store failed mid-run: the message says which epochs reached it."""


_epochs_logged: dict[str, list[int]] = {}  # run id -> epochs whose metrics reached the store
_ended: list[tuple[str, str]] = []  # (run id, status) of the runs this process ended, in order
_world = World()  # this process's place in its run (see use_store)
_system_metrics = True  # whether training runs log MLflow's system metrics (see use_store)
_later_run_tags: dict[str, str] = {}  # set on every run started from now on (tag_later_runs)


def use_store(
    tracking_uri: str | None, world: World = World(), *, system_metrics: bool = True
) -> str:
    """Point MLflow at `tracking_uri` (else MLFLOW_TRACKING_URI, else MLflow's default), as
    `world`'s process: only a process that writes (rank 0) opens the store.

    The store is checked up front, fast: a malformed URI is a ConfigError; a sqlite file that
    cannot be written, a store that cannot be opened or a server that cannot be reached one
    clear CifarexpError (not minutes of retries), each naming where the URI came from. A new
    sqlite store is made whole or not at all (see `_prepare_sqlite`). Training runs log
    MLflow's system metrics if `system_metrics`; cifarexp prints where a run is, not MLflow.
    """
    global _world, _system_metrics
    _world, _system_metrics = world, system_metrics
    _later_run_tags.clear()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    # Their chatter, retries and tracebacks: a store error is cifarexp's one line, its cause
    # included (see root_cause).
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    source = _Source(tracking_uri)
    uri = tracking_uri or mlflow.get_tracking_uri()
    _check_uri(uri, source)
    mlflow.set_tracking_uri(uri)
    if not is_writer():  # rank 0 of a torchrun job opens (or creates) the store alone
        return uri
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise source.error(
                CifarexpError, f"cannot reach the tracking server at {redact(uri)} ({reason})"
            ) from None
        return uri
    if uri.startswith("sqlite:///"):
        _prepare_sqlite(Path(sqlite_path(uri)), source)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as exc:  # any failure to open it: missing driver, not a database, ...
        raise source.error(
            CifarexpError, f"cannot open the tracking store {redact(uri)} ({root_cause(exc)})"
        ) from None
    return uri


class _Source:
    """Where the tracking URI came from: the tracking_uri option, MLFLOW_TRACKING_URI, or
    MLflow's default; errors about the store name it."""

    def __init__(self, tracking_uri: str | None) -> None:
        self.given = bool(tracking_uri)
        self.from_env = not tracking_uri and bool(os.environ.get("MLFLOW_TRACKING_URI"))

    def error(self, kind: type[CifarexpError | ConfigError], message: str) -> Exception:
        if self.given:
            return kind(message, "tracking_uri")
        where = "MLFLOW_TRACKING_URI" if self.from_env else "the default tracking store"
        return kind(f"{where}: {message}")


def _check_uri(uri: str, source: _Source) -> None:
    """A URI MLflow can keep runs in, else a ConfigError naming `source`."""
    scheme, _, rest = uri.partition(":")
    scheme = scheme.split("+")[0]
    shown = repr(redact(uri))
    if scheme not in STORE_SCHEMES or not rest:
        raise source.error(
            ConfigError,
            f"{shown} is not a tracking URI cifarexp can use; give sqlite:///PATH.db, "
            "http(s)://HOST:PORT or a database URL",
        )
    path = sqlite_path(uri)
    if scheme == "sqlite" and (not rest.startswith("///") or path in ("", ":memory:")):
        raise source.error(
            ConfigError,
            f"{shown} is not a sqlite file (an in-memory store keeps nothing); give "
            "sqlite:///PATH.db",
        )
    try:
        host = urllib.parse.urlsplit(uri).hostname
    except ValueError as exc:
        raise source.error(ConfigError, f"{shown} is not a valid URL ({exc})") from None
    if scheme in ("http", "https") and not host:
        raise source.error(ConfigError, f"{shown} names no host; give {scheme}://HOST:PORT")


def sqlite_path(uri: str) -> str:
    """The file of a sqlite:///PATH URI (its query left out)."""
    return uri.removeprefix("sqlite:///").split("?")[0]


def redact(uri: str) -> str:
    """`uri` with any password replaced by ***, as cifarexp shows or writes it."""
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri.split("@")[-1] if "@" in uri else uri
    if not password:
        return uri
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def shown_uri() -> str:
    """The tracking URI in use, as cifarexp shows it (credentials masked)."""
    return redact(mlflow.get_tracking_uri())


def root_cause(exc: BaseException) -> str:
    """The first line of the deepest error behind `exc` (what SQLite or the system said, not
    the wrapper around it: "database or disk is full", not "Query-invoked autoflush")."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    deepest = seen[-1]
    text = deepest.message if isinstance(deepest, MlflowException) else str(deepest)
    lines = str(text).strip().splitlines()
    return f"{type(deepest).__name__}: {redact(lines[0]) if lines else ''}"


# ---------------------------------------------------------------- a sqlite store


def _prepare_sqlite(path: Path, source: _Source) -> None:
    """A sqlite store ready to use, or one clear error.

    Checked without MLflow (which retries for minutes): the folder exists and takes new
    files; the file, if there, is a writable SQLite database at the schema this MLflow
    expects. A store that does not exist yet is built in a temporary file of its folder and
    moved into place, under a lock on the folder: one process builds it while the others
    wait, and an interrupted build leaves no store at all. A store left half-made (an older
    cifarexp interrupted while MLflow built it in place) holds no run: it is rebuilt, the old
    file kept beside it. One at another schema, with runs, is named with the command that
    upgrades it.
    """
    shown = f"sqlite:///{path}"
    folder = path.parent.resolve()
    if path.is_dir():
        raise source.error(CifarexpError, f"{shown} is a folder, not a database file")
    if not folder.is_dir():
        raise source.error(CifarexpError, f"cannot make {shown}: no folder {folder}")
    if _schema(path, shown, source) == "ready":
        return
    with _locked(folder, shown, source):
        state = _schema(path, shown, source)  # again: another process may have built it
        if state == "ready":
            return
        if state != "missing":
            kept = path.with_name(f"{path.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, kept)
            log.warning(f"{shown} was half-made ({state}, no runs): rebuilt; old file: {kept}")
        _build(path, shown, source)


def _schema(path: Path, shown: str, source: _Source) -> str:
    """ "ready" (at this MLflow's schema, writable), "missing", or why a store without runs
    is not ready; a store with runs at another schema, or one that is not a writable SQLite
    database, is an error."""
    if not path.exists() or path.stat().st_size == 0:
        return "missing"
    from mlflow.store.db.utils import _get_latest_schema_revision  # what MLflow expects

    head = _get_latest_schema_revision()
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=20)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
            version = None
            if "alembic_version" in tables:
                found = db.execute("select version_num from alembic_version").fetchone()
                version = found[0] if found else None
            runs = db.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
            db.execute("begin immediate")  # a write, undone: fails on a read-only file or folder
            db.execute("create table cifarexp_write_check (x)")
            db.rollback()
    except sqlite3.Error as exc:
        raise source.error(CifarexpError, f"cannot use {shown} ({exc})") from None
    if version == head:
        return "ready"
    state = f"schema {version or 'none'}, expected {head}"
    if runs:
        raise source.error(
            CifarexpError,
            f"{shown} holds {runs} runs at {state}: back it up, then run "
            f"`mlflow db upgrade {shown}`",
        )
    return state


@contextmanager
def _locked(folder: Path, shown: str, source: _Source) -> Iterator[None]:
    """An exclusive lock on `folder`, held by one process at a time (released if it dies)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise source.error(CifarexpError, f"cannot make {shown} ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _build(path: Path, shown: str, source: _Source) -> None:
    """Build a new store in a temporary file beside `path`, then move it into place."""
    for stale in path.parent.glob(f".{path.name}.new-*"):  # a build interrupted earlier
        stale.unlink(missing_ok=True)
    building = path.with_name(f".{path.name}.new-{os.getpid()}")
    artifacts = (path.parent.resolve() / "mlartifacts").as_uri()
    with processes.uninterruptible():  # a few seconds; a stop waits, then comes
        try:
            with open(building, "xb"):  # the folder takes files: else fail now, not in retries
                pass
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = SqlAlchemyStore(f"sqlite:///{building}", artifacts)
            store.engine.dispose()
            os.replace(building, path)
        except Exception as exc:  # the folder, the disk, MLflow's migrations: one line
            message = f"cannot make {shown} ({root_cause(exc)})"
            raise source.error(CifarexpError, message) from None
        finally:
            building.unlink(missing_ok=True)


def is_writer() -> bool:
    """Whether this process writes to the store, as its world says: only rank 0 of a
    torchrun job does (the other ranks' runs exist only through rank 0's reduced metrics)."""
    return _world.writes


def logs_system_metrics() -> bool:
    """Whether this process's training runs log system metrics (see use_store)."""
    return _system_metrics


def current_uri() -> str:
    return mlflow.get_tracking_uri()


def default_experiment(command: str) -> str:
    """Each command's MLflow experiment, unless one is named."""
    return f"cifarexp-{command}"


@contextmanager
def start_run(
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
    system metrics (see use_store); `about` describes a new experiment.

    A child of `parent` (a run id: the active run of this process, or one another process
    keeps open) goes into its parent's experiment. Under `mlflow run` (MLFLOW_RUN_ID set)
    the project's run is this run, in the experiment `mlflow run` chose. `reopen` continues
    an earlier run (by id) instead of starting one, and marks KILLED its children that a
    process killed outright left RUNNING. If the store itself fails, the StoreFailed error
    says which epochs reached it. Yields the run id; on a rank other than 0 (`is_writer`)
    nothing is written and it yields None.
    """
    if not is_writer():
        yield None
        return
    run_id = None
    try:
        with processes.uninterruptible():  # a stop meanwhile waits until the run can end KILLED
            tags = {**source_tags(), **(tags or {})}
            run_id = _create_run(experiment, run_name, tags, parent, reopen, about, training)
        _log_params(params or {})
        yield run_id
        with processes.uninterruptible():  # then raises the one deferred while FINISHED was written
            if not processes.pending():  # a stop whose exception Python swallowed ends it KILLED
                _end_run(run_id, "FINISHED")
    except KeyboardInterrupt:
        _end_failed_run(run_id, "KILLED")
        raise
    except StoreFailed:
        _end_failed_run(run_id, "FAILED")  # one try, no error tag: the store is failing
        raise
    except STORE_ERRORS as exc:
        # MLflow wraps whatever is raised inside its store calls, ours included (e.g. a
        # signal handler's error arriving mid-write): that is not a failing store.
        if isinstance(exc.__cause__, CifarexpError):
            _end_failed_run(run_id, "FAILED", error=exc.__cause__)
            raise exc.__cause__ from None
        if run_id is None:
            raise CifarexpError(f"tracking store {shown_uri()}: {root_cause(exc)}") from None
        _end_failed_run(run_id, "FAILED")
        raise StoreFailed(_store_failed(run_id, exc)) from None
    except BaseException as exc:
        _end_failed_run(run_id, "FAILED", error=exc)
        raise


def _create_run(
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
        tags={k: v for k, v in {**(tags or {}), **_later_run_tags}.items() if v != ""},
        log_system_metrics=training and _system_metrics,
    )
    if reopen is not None:
        kill_stale_children(reopen)
    return run.info.run_id


def tag_later_runs(tags: Mapping[str, str]) -> None:
    """Set `tags` on every run this process starts from now on (until the next use_store),
    e.g. the sweep a `--workers best` count came from."""
    _later_run_tags.update(tags)


def later_run_tags() -> dict[str, str]:
    """The tags `tag_later_runs` set (passed on to the processes a run launches)."""
    return dict(_later_run_tags)


def _active_run_data() -> RunData:
    """What the store holds of the active run: its params, tags and latest metrics."""
    return mlflow.get_run(mlflow.active_run().info.run_id).data


def _log_params(params: Mapping[str, object]) -> None:
    """Log params; one that `mlflow run` already logged differently (e.g. workers=best)
    keeps its value and the resolved one goes into a tag."""
    given = _active_run_data().params
    _retry_locked(lambda: mlflow.log_params({k: v for k, v in params.items() if k not in given}))
    set_tags(
        {TAG + "resolved." + k: v for k, v in params.items() if given.get(k, str(v)) != str(v)}
    )


def _set_experiment(name: str, about: str) -> None:
    """Make `name` the active experiment; with a local sqlite store its artifacts go into
    `mlartifacts/` beside the database file (never the legacy ./mlruns). A new one is
    described by `about` and opens on its runs in the UI."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(name) is None:
        root = Path(sqlite_path(uri)).resolve().parent / "mlartifacts"
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


def _end_run(run_id: str | None, status: str, error: BaseException | None = None) -> None:
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
        _ended.append((run_id, status))


def _end_failed_run(run_id: str | None, status: str, error: BaseException | None = None) -> None:
    """End a run that an exception stopped (a stop's, or a failure); a new stop that came
    while it was ended is raised once it is."""
    processes.acknowledge()  # the stop behind the exception, if any, is being acted on
    with processes.uninterruptible():
        _end_run(run_id, status, error)


def fail_project_run(message: str) -> None:
    """End the run `mlflow run` opened (MLflow checks no integer parameter, so a bad value
    reaches the command line after the run exists) FAILED, `message` as its error tag."""
    client = mlflow.MlflowClient()
    run_id = os.environ["MLFLOW_RUN_ID"]
    with contextlib.suppress(*STORE_ERRORS):
        client.set_tag(run_id, ERROR, message[:5000])
        client.set_terminated(run_id, "FAILED")


def last_ended() -> tuple[str, str] | None:
    """The (run id, status) of the run this process ended last, if any."""
    return _ended[-1] if _ended else None


def _store_failed(run_id: str, exc: BaseException) -> str:
    epochs = _epochs_logged.get(run_id)
    if not epochs:
        logged = "no epoch logged"
    elif len(epochs) > 2 and epochs == list(range(epochs[0], epochs[-1] + 1)):
        logged = f"epochs logged: {epochs[0]}-{epochs[-1]}"
    else:
        logged = f"epochs logged: {', '.join(map(str, epochs))}"
    return (
        f"the tracking store {shown_uri()} failed during run {run_id} "
        f"({root_cause(exc)}); {logged}; the run is left unfinished"
    )


def kill_stale_children(parent_id: str) -> list[str]:
    """Mark KILLED the children of `parent_id` still RUNNING (their process was killed
    outright, so nothing ended them); their ids. Only for a parent being resumed."""
    stale = mlflow.search_runs(
        filter_string=_children(parent_id, "RUNNING"),
        search_all_experiments=True,
        output_format="list",
    )
    client = mlflow.MlflowClient()
    for run in stale:
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in stale]


def _retry_locked(write: Callable[[], None], *, races: tuple[str, ...] = ()) -> None:
    """Run a store write; SQLite's "database is locked" (another process held the lock past
    MLflow's busy timeout) is tried again after each of LOCKED_RETRY_DELAYS_S, and so is
    an error naming one of `races` (a row that another process inserted meanwhile, which
    the write then finds)."""
    for delay in LOCKED_RETRY_DELAYS_S:
        try:
            write()
            return
        except MlflowException as exc:
            if not any(text in str(exc) for text in ("database is locked", *races)):
                raise
        time.sleep(delay)
    write()


def has_tag(key: str) -> bool:
    """Whether the active run has the tag `key` (False on a process that does not write)."""
    if not is_writer():
        return False
    return key in _active_run_data().tags


def set_tags(tags: Mapping[str, object]) -> None:
    if not is_writer():
        return
    _retry_locked(lambda: mlflow.set_tags({key: str(value) for key, value in tags.items()}))


def append_description(paragraph: str) -> None:
    """Add a paragraph to the active run's description, after what it holds already; kept
    (in APPENDED) when `describe` writes the description later."""
    if not is_writer():
        return
    tags = _active_run_data().tags
    set_tags(
        {
            NOTE: f"{tags.get(NOTE, '')}\n\n{paragraph}".strip(),
            APPENDED: f"{tags.get(APPENDED, '')}\n\n{paragraph}".strip(),
        }
    )


def log_params(params: Mapping[str, object]) -> None:
    if is_writer():
        _log_params(params)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    if not is_writer():
        return
    _retry_locked(lambda: mlflow.log_metrics(dict(metrics), step=step))


def log_epoch(result: EpochResult) -> None:
    """The per-epoch metrics of one finished epoch, step = epoch number."""
    if not is_writer():
        return
    _retry_locked(lambda: mlflow.log_metrics(result.metrics(), step=result.epoch))
    _epochs_logged.setdefault(mlflow.active_run().info.run_id, []).append(result.epoch)


@contextmanager
def _writing_artifact(name: str) -> Iterator[None]:
    """An artifact that cannot be written (a full disk, a read-only folder) as one line."""
    try:
        yield
    except OSError as exc:
        raise CifarexpError(
            f"cannot write the artifact {name} of the run ({exc.strerror})"
        ) from None


def log_text(text: str, artifact_file: str) -> None:
    if not is_writer():
        return
    with _writing_artifact(artifact_file):
        mlflow.log_text(text, artifact_file)


def log_artifacts(folder: Path) -> None:
    if not is_writer():
        return
    with _writing_artifact(str(folder)):
        mlflow.log_artifacts(str(folder))


def log_table(table: pd.DataFrame, name: str) -> None:
    """A table as `name`.csv (readable by any tool, 6 significant digits) and as an MLflow
    table, `name`.json, which the UI shows and compares across runs."""
    log_text(table.to_csv(index=False, float_format="%.6g"), f"{name}.csv")
    if is_writer():
        with _writing_artifact(f"{name}.json"):
            mlflow.log_table(table.astype(object).where(table.notna(), None), f"{name}.json")


def log_dataset(targets: np.ndarray, *, name: str, source: Mapping[str, str]) -> None:
    """The training set as the run's dataset input (the UI's Dataset column): recorded by
    its labels (a digest of them, their count), never its images; `source` says where the
    images come from."""
    if not is_writer():
        return
    from mlflow.data.code_dataset_source import CodeDatasetSource

    dataset = mlflow.data.from_numpy(
        targets, source=CodeDatasetSource(tags=dict(source)), name=name
    )
    # Two runs of one experiment logging the same set at once may both try to insert it.
    race = "UNIQUE constraint failed: datasets."
    _retry_locked(lambda: mlflow.log_input(dataset, context="training"), races=(race,))


def describe(run_id: str, text: str) -> None:
    """`text` (markdown) as the run's description in the UI, then the paragraphs appended to
    it as it ran (`append_description`: its profile's)."""
    if is_writer():
        client = mlflow.MlflowClient()
        appended = client.get_run(run_id).data.tags.get(APPENDED)
        note = f"{text}\n\n{appended}" if appended else text
        _retry_locked(lambda: client.set_tag(run_id, NOTE, note))


def where(run_id: str) -> list[str]:
    """Where to find `run_id`: its experiment and run, the UI links (runs view), and for a
    local store the command that starts the UI (credentials masked)."""
    run = mlflow.get_run(run_id)
    experiment = mlflow.get_experiment(run.info.experiment_id)
    uri = mlflow.get_tracking_uri()
    local = not uri.startswith(("http://", "https://"))
    base = "http://127.0.0.1:5000" if local else redact(uri).rstrip("/")
    page = f"{base}/#/experiments/{experiment.experiment_id}"
    lines = [
        f"Experiment {experiment.name!r}, run {run.info.run_name!r} ({run_id}).",
        f"In the MLflow UI: {page}?workflowType=machine_learning (the experiment's runs), "
        f"{page}/runs/{run_id}?workflowType=machine_learning (this run).",
    ]
    if local:
        lines.append(f"Start the UI with: mlflow ui --backend-store-uri {redact(uri)}")
    return lines


def log_figure(figure: Figure, artifact_file: str) -> None:
    if not is_writer():
        return
    with _writing_artifact(artifact_file):
        mlflow.log_figure(figure, artifact_file)


def search_runs(filter_string: str = "") -> pd.DataFrame:
    """Runs of every experiment matching `filter_string`, newest first, as MLflow's DataFrame
    (columns run_id, status, start_time, params.*, tags.*, metrics.*)."""
    return mlflow.search_runs(
        filter_string=filter_string,
        search_all_experiments=True,
        order_by=["attributes.start_time DESC"],
    )


def load_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact of `run_id`, or None where the run has none of that name."""
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError):
        return None


def metric_history(run_id: str, keys: list[str]) -> pd.DataFrame:
    """One row per step of `run_id`, one column per metric key (absent keys are left out)."""
    client = mlflow.MlflowClient()
    series = {
        key: pd.Series({m.step: m.value for m in client.get_metric_history(run_id, key)})
        for key in keys
    }
    frame = pd.DataFrame({k: v for k, v in series.items() if not v.empty})
    return frame.rename_axis("step").reset_index()


RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: a UUID's 32 hex digits


def is_run_id(text: str) -> bool:
    """Whether `text` has the form of a run id (checked before it goes into a filter)."""
    return RUN_ID.fullmatch(text) is not None


def tag_filter(tags: Mapping[str, str]) -> str:
    """An MLflow filter string matching every tag exactly."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


# ---------------------------------------------------------------- finding runs

PARENT = "tags.mlflow.parentRunId"


def top_level(runs: pd.DataFrame) -> pd.DataFrame:
    """Only the runs without a parent."""
    if PARENT not in runs:
        return runs
    return runs[runs[PARENT].isna() | (runs[PARENT] == "")]


def finished_children(parent_id: str) -> pd.DataFrame:
    """The FINISHED children of a run, the newest one per variant, in the order they ran."""
    children = search_runs(_children(parent_id, "FINISHED"))
    if children.empty:  # no columns at all: give callers the ones they index
        return pd.DataFrame(columns=["run_id", f"tags.{VARIANT}"])
    children = children.drop_duplicates(f"tags.{VARIANT}", keep="first")
    return children.sort_values("start_time").reset_index(drop=True)


def _children(parent_id: str, status: str) -> str:
    """The filter of the children of `parent_id` with `status`."""
    return f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = '{status}'"


def finished_top_level(tags: Mapping[str, str]) -> pd.DataFrame:
    """The FINISHED runs without a parent whose tags have these values, newest first."""
    return top_level(search_runs(tag_filter(tags) + " and attributes.status = 'FINISHED'"))


def latest_sweep(device_type: str, dataset: str) -> pd.Series | None:
    """The newest finished workers sweep (C3) for this device type and dataset."""
    found = finished_top_level({EXERCISE: "C3", DEVICE: device_type, DATASET: dataset})
    found = found[found["metrics.best_workers"].notna()] if not found.empty else found
    return None if found.empty else found.iloc[0]


def settings_digest(params: Mapping[str, object]) -> str:
    """A short digest of a comparison's settings (its params)."""
    text = json.dumps({k: str(v) for k, v in params.items()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def unfinished(exercise: str, params: Mapping[str, object]) -> pd.Series | None:
    """The newest top-level run of `exercise` (C3, C5, C5-scaling, ...) with these settings,
    if it did not finish (FAILED, KILLED, or RUNNING because its process was killed outright
    or is still running: see `start_run`'s reopen)."""
    found = top_level(search_runs(tag_filter({EXERCISE: exercise})))
    digest = settings_digest(params)
    for _, run in found.iterrows():
        same = run.get(f"tags.{SETTINGS}") == digest or all(
            str(run.get(f"params.{k}")) == str(v) for k, v in params.items()
        )
        if same:
            return None if run["status"] == "FINISHED" else run
    return None


# ---------------------------------------------------------------- who runs a comparison


def owner_tag() -> dict[str, str]:
    """This process, as the owner of the run it starts: host, pid and start time."""
    me = psutil.Process()
    return {
        OWNER: json.dumps(
            {"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()}
        )
    }


def _owner_alive(text: str | None) -> bool | None:
    """Whether the process of an owner tag still runs: None where it cannot be told (another
    host's process); False without a tag (a run from before owners were recorded)."""
    try:
        owner = json.loads(text or "")
    except json.JSONDecodeError:
        return False
    if owner.get("host") != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner["started"]) < 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


def _claim(run_id: str) -> None:
    """Make this process the owner of the unfinished run `run_id`, which it reopens; a run
    that another live process still runs is refused. On a sqlite store the check and the
    claim hold the store's folder lock (two --resume at once: one wins); elsewhere the tag
    is read back after a pause, the last writer owning it."""
    uri = mlflow.get_tracking_uri()
    local = uri.startswith("sqlite:///")
    lock = _locked(Path(sqlite_path(uri)).parent.resolve(), uri, _Source(uri)) if local else None
    client, mine = mlflow.MlflowClient(), owner_tag()[OWNER]
    with lock or contextlib.nullcontext():
        run = client.get_run(run_id)
        holder = run.data.tags.get(OWNER)
        if run.info.status == "RUNNING" and _owner_alive(holder) is not False:
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
