"""The only code that talks to MLflow.

A command's session opens one `Tracker` (tracker.py) and passes it to what logs. Beside
it: the store (store.py), the life of a run (lifecycle.py), reading runs (queries.py) and
the names cifarexp writes (names.py). What other packages read is re-exported here.
"""

from cifarexp.tracking.names import (
    COMMAND,
    COMMIT,
    CUDA_DEVICES,
    DATASET,
    DEVICE,
    DIVERGED,
    ENERGY,
    ERROR,
    EXERCISE,
    NOTE,
    PARENT,
    PRESET,
    TAG,
    TIMING_DISTURBED,
    VARIANT,
    VARIANTS,
    VARIANTS_SEPARATOR,
    VERDICT,
    VERSION,
    WORKERS_FROM,
    check_experiment,
    default_experiment,
)
from cifarexp.tracking.queries import (
    experiment_id,
    finished_children,
    finished_top_level,
    is_run_id,
    latest_sweep,
    load_text,
    metric_history,
    reading,
    search_runs,
    where,
)
from cifarexp.tracking.store import STORE_ERRORS, artifact_root, redact, shown_uri, store_error
from cifarexp.tracking.tabular import csv_text, rounded
from cifarexp.tracking.tracker import Tracker

__all__ = [
    "COMMAND", "COMMIT", "CUDA_DEVICES", "DATASET", "DEVICE", "DIVERGED", "ENERGY", "ERROR",
    "EXERCISE", "NOTE", "PARENT", "PRESET", "STORE_ERRORS", "TAG", "TIMING_DISTURBED",
    "VARIANT", "VARIANTS", "VARIANTS_SEPARATOR",
    "VERDICT", "VERSION", "WORKERS_FROM", "Tracker", "artifact_root", "check_experiment",
    "csv_text", "default_experiment", "experiment_id", "finished_children",
    "finished_top_level", "is_run_id", "latest_sweep", "load_text", "metric_history",
    "reading", "redact", "rounded", "search_runs", "shown_uri", "store_error", "where",
]  # fmt: skip
