"""The tracking store: its URI checked, a sqlite store made whole, errors as one line, and
writes retried while another process holds SQLite's lock."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from cifarexp import processes
from cifarexp.config import CifarexpError, ConfigError

# Failures of the store itself: MLflow's, and SQLite's where cifarexp reads the file itself.
STORE_ERRORS: tuple[type[Exception], ...] = (MlflowException, sqlite3.DatabaseError)
# Tracking URI schemes MLflow can keep runs in (+driver allowed); never the legacy file store.
STORE_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
# MLflow retries a failed HTTP request 7 times with exponential backoff (minutes) and waits
# 120 s for each reply: too long to notice that a tracking server went away mid-run.
# Used unless the user has set them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# MLflow's SQLite sessions already wait up to 20 s for another process's lock (busy_timeout);
# a write still refused with "database is locked" is tried again after each of these pauses.
LOCKED_RETRY_DELAYS_S = (1, 2, 4, 8, 16, 32)
SYSTEM_METRICS_INTERVAL_S = 1  # MLflow's sampler: CPU, memory, GPU, once a second
log = logging.getLogger(__name__)


class StoreFailed(CifarexpError):
    """The tracking store failed mid-run: the message says which epochs reached it."""


def open_store(tracking_uri: str | None, *, writes: bool = True) -> str:
    """Point MLflow at `tracking_uri` (else MLFLOW_TRACKING_URI, else MLflow's default); the
    URI. Only a process that `writes` (rank 0 of a torchrun job) opens the store.

    The store is checked up front, fast: a malformed URI is a ConfigError; a sqlite file that
    cannot be written, a store that cannot be opened or a server that cannot be reached one
    clear CifarexpError (not minutes of retries), each naming where the URI came from. A new
    sqlite store is made whole or not at all (see `_prepare_sqlite`). cifarexp prints where a
    run is, not MLflow.
    """
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    # Their chatter, retries and tracebacks: a store error is cifarexp's one line, its cause
    # included (see root_cause).
    for name in ("mlflow", "alembic", "sqlalchemy", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    source = Source(tracking_uri)
    uri = tracking_uri or mlflow.get_tracking_uri()
    _check_uri(uri, source)
    mlflow.set_tracking_uri(uri)
    if not writes:  # rank 0 of a torchrun job opens (or creates) the store alone
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


class Source:
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


def _check_uri(uri: str, source: Source) -> None:
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
        parts = urllib.parse.urlsplit(uri)
        host, _ = parts.hostname, parts.port  # a port past 65535, or not a number, is an error
    except ValueError as exc:
        raise source.error(ConfigError, f"{shown} is not a valid URL ({exc})") from None
    if scheme in ("http", "https") and not host:
        raise source.error(ConfigError, f"{shown} names no host; give {scheme}://HOST:PORT")


def sqlite_path(uri: str) -> str:
    """The file of a sqlite:///PATH URI (its query left out)."""
    return uri.removeprefix("sqlite:///").split("?")[0]


def artifact_root(uri: str) -> Path | None:
    """Where the experiments of a sqlite store keep their artifacts: `mlartifacts/` beside
    the database file (never the legacy ./mlruns); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(sqlite_path(uri)).resolve().parent / "mlartifacts"


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


def store_error(exc: BaseException) -> str:
    """A failure of the store in use as one line: the store, and what SQLite or the server
    said (never the SQL MLflow sent)."""
    return f"the tracking store {shown_uri()} failed ({root_cause(exc)})"


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and every error behind it, nearest first: what each wraps (SQLAlchemy's
    `orig`), was raised from, and was raised while handling."""
    found, queue = [], [exc]
    while queue:
        error = queue.pop(0)
        if error is not None and error not in found:
            found.append(error)
            queue += [getattr(error, "orig", None), error.__cause__, error.__context__]
    return found


def root_cause(exc: BaseException) -> str:
    """The first line of the deepest error behind `exc` (what SQLite or the system said, not
    the wrapper around it: "database or disk is full", not "Query-invoked autoflush"),
    following each error's first link: what it wraps, else its cause, else its context."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    deepest = seen[-1]
    text = deepest.message if isinstance(deepest, MlflowException) else str(deepest)
    lines = str(text).strip().splitlines()
    return f"{type(deepest).__name__}: {redact(lines[0]) if lines else ''}"


# ---------------------------------------------------------------- a sqlite store


def _prepare_sqlite(path: Path, source: Source) -> None:
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
    with locked(folder, shown, source):
        state = _schema(path, shown, source)  # again: another process may have built it
        if state == "ready":
            return
        if state != "missing":
            kept = path.with_name(f"{path.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, kept)
            log.warning(f"{shown} was half-made ({state}, no runs): rebuilt; old file: {kept}")
        _build(path, shown, source)


def _schema(path: Path, shown: str, source: Source) -> str:
    """ "ready" (at this MLflow's schema, writable), "missing", or why a store without runs
    is not ready; a store with runs at another schema, or one that is not a writable SQLite
    database, is an error."""
    if not path.exists() or path.stat().st_size == 0:
        return "missing"
    head = _schema_head()
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=20)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
            version = None
            if "alembic_version" in tables:
                found = db.execute("select version_num from alembic_version").fetchone()
                version = found[0] if found else None
            runs = db.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
            _check_pages(db)
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


@functools.cache
def _schema_head() -> str:
    """The schema revision this MLflow expects (read from its migrations: 50 ms each time)."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def check_whole(uri: str) -> None:
    """A sqlite store read through, every page, from a connection of its own: MLflow's keeps
    pages in its cache and writes only those it changes, so a file damaged under it (written
    over by something else) takes its writes without an error. sqlite3.DatabaseError if a
    page is damaged, or the file is gone. Reads the whole file (SQLite's quick_check); other
    stores answer for themselves."""
    if not uri.startswith("sqlite:///"):
        return
    read_only = Path(sqlite_path(uri)).resolve().as_uri() + "?mode=ro"  # never creates it
    with contextlib.closing(sqlite3.connect(read_only, uri=True, timeout=20)) as db:
        _check_pages(db)


def _check_pages(db: sqlite3.Connection) -> None:
    found = [row[0] for row in db.execute("pragma quick_check(1)")]
    if found != ["ok"]:
        problem = found[0].splitlines()[-1] if found else "no answer"
        raise sqlite3.DatabaseError(f"database disk image is malformed: {problem}")


@contextmanager
def locked(folder: Path, shown: str, source: Source) -> Iterator[None]:
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


def _build(path: Path, shown: str, source: Source) -> None:
    """Build a new store in a temporary file beside `path`, then move it into place."""
    for stale in path.parent.glob(f".{path.name}.new-*"):  # a build interrupted earlier
        stale.unlink(missing_ok=True)
    building = path.with_name(f".{path.name}.new-{os.getpid()}")
    artifacts = artifact_root(f"sqlite:///{path}").as_uri()
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


def retry_locked(write: Callable[[], None], *, races: tuple[str, ...] = ()) -> None:
    """Run a store write; SQLite's "database is locked" (another process held the lock past
    MLflow's busy timeout) is tried again after each of LOCKED_RETRY_DELAYS_S, and so is
    an error naming one of `races` (a row that another process inserted meanwhile, which
    the write then finds)."""
    for delay in LOCKED_RETRY_DELAYS_S:
        try:
            write()
            return
        except STORE_ERRORS as exc:
            if not any(text in str(exc) for text in ("database is locked", *races)):
                raise
        time.sleep(delay)
    write()
