"""The names cifarexp writes into the store: its tags, and each command's experiment."""

from __future__ import annotations

from cifarexp.config import ConfigError

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
DIVERGED = TAG + "diverged"  # the epoch from which the training loss is not finite
VERDICT = TAG + "verdict"  # what bounds a profiled run's step (see profiling)
ENERGY = TAG + "energy"  # what counted each epoch's energy, or why nothing did (see energy)
# Why a run's timing cannot be trusted (other processes' CPU use, its epochs' spread; see
# training.noise); on a comparison's parent, its disturbed variants with their reasons.
TIMING_DISTURBED = TAG + "timing_disturbed"
# A comparison's parent: a digest of its settings (set as it is created, so that --resume
# finds it even if it was killed at once), the process that runs it, the variants it ran.
SETTINGS, OWNER, VARIANTS = TAG + "settings", TAG + "owner", TAG + "variants"
VARIANTS_SEPARATOR = "; "  # between the variants in VARIANTS (a variant may hold a comma)
WORKERS_FROM = TAG + "workers_from"  # the sweep run whose best count `--workers best` took
PRESET = TAG + "preset"  # the lab preset (full, quick) a run was made by
REUSED_FROM = TAG + "reused_from"  # the finished run, of the same settings, a run copies
CUDA_DEVICES = TAG + "cuda_devices"  # on a C5 parent: the CUDA devices torch found (0: none)
PARENT = "mlflow.parentRunId"
EXPERIMENT_NAME_MAX = 500  # MLflow's limit (characters)


def default_experiment(command: str) -> str:
    """Each command's MLflow experiment, unless one is named."""
    return f"cifarexp-{command}"


def check_experiment(name: str) -> None:
    """A name MLflow takes for an experiment, else a ConfigError naming --experiment."""
    if not name.strip():
        raise ConfigError("give a name, not an empty one", "experiment")
    if len(name) > EXPERIMENT_NAME_MAX:
        raise ConfigError(
            f"{len(name)} characters; MLflow takes at most {EXPERIMENT_NAME_MAX}", "experiment"
        )
