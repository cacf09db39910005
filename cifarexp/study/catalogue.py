"""The study, declared once: each item's question, heading, the command that answers it and
its tables' titles, in the study's order; how a run is placed and named in it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cifarexp.tracking import COMMAND, EXERCISE, VARIANT


@dataclass(frozen=True)
class Item:
    """One item of the study."""

    question: str  # on its experiment and in its run's description
    heading: str  # of its section in the report
    command: str  # the command that answers it, as a user would type it
    tables: dict[str, str] = field(default_factory=dict)  # table name -> title
    # A parent run with a child per variant, which holds the answer's tables and plots (a
    # single run's answer is its own per-epoch metrics, plus a description).
    compares: bool = False


# In the study's order; "report" is the report's own run, "profiles" the report's last section.
ITEMS: dict[str, Item] = {
    "Q1-Q4": Item(
        "What does ResNet-18 contain: conv layers, the last layer's input, parameters, "
        "gradients, optimizer state?",
        "Q1-Q4: what the model contains",
        "cifarexp inspect",
        {"q1_q4": "Q1-Q4: the model's anatomy"},
    ),
    "C2": Item(
        "Where does the time of an epoch go: waiting for data, computing, in all?",
        "C1, C2: where the time of an epoch goes",
        "cifarexp time",
        {
            "c2_epochs": "C2: time of each epoch (data-loading, training, total), energy where "
            "measured, loss and accuracy"
        },
    ),
    "C3": Item(
        "How many DataLoader workers load data fastest, and why does 1 worker lose (C4)?",
        "C3, C4: how many DataLoader workers",
        "cifarexp sweep-workers",
        {
            "c3_workers": "C3: epoch times per DataLoader worker count (median, min–max over "
            "the epochs)",
            "c4_one_vs_best": "C4: 1 worker vs the best count (and the shortest epoch's)",
        },
        compares=True,
    ),
    "C5": Item(
        "How much faster than the CPU does the GPU train an epoch?",
        "C5: GPU vs CPU",
        "cifarexp compare-device --workers best",
        {"c5_devices": "C5: average epoch time per device"},
        compares=True,
    ),
    "C5-scaling": Item(
        "How does training scale over several GPUs (data-parallel)?",
        "C5 extended: 1, 2, 4 GPUs (data-parallel, torchrun)",
        "cifarexp compare-device --gpus 1,2,4 --workers best",
        {"c5_scaling": "C5: data-parallel scaling over GPUs (steady epochs: 2 on)"},
        compares=True,
    ),
    "C6": Item(
        "How do SGD, Nesterov, Adagrad, Adadelta and Adam train with the same learning rate?",
        "C6: five optimizers",
        "cifarexp compare-optim --workers best",
        {
            "c6_optimizers": "C6: optimizers, training time per epoch (median, min–max over the "
            "epochs) and the final epoch",
            "c6_accuracy": "C6: top-1 training accuracy per epoch",
            "c6_loss": "C6: training loss per epoch",
        },
        compares=True,
    ),
    "C7": Item(
        "What does BatchNorm change: the model with and without it?",
        "C7: without BatchNorm",
        "cifarexp no-bn --workers best",
        {"c7_batch_norm": "C7: with and without BatchNorm"},
        compares=True,
    ),
    "profiles": Item(
        "What bounds each profiled run's step?",
        "Profiles: what bounds the step",
        "cifarexp time --profile",
        {"profiles": "Profiles: what bounds each profiled run's step, and the step's split"},
    ),
    "report": Item("The study's tables and plots, built from the store.", "", "cifarexp report"),
    "compare": Item(
        "How does this study compare with a baseline study: faster, slower, within noise?",
        "",
        "cifarexp compare --baseline SOURCE",
        {"comparison": "Yours beside the baseline"},
    ),
}
# The items of the report's sections, in order (the profiles come last, from every run).
SECTIONS = ("C2", "C3", "C5", "C5-scaling", "C6", "C7", "Q1-Q4")
TITLES = {name: title for item in ITEMS.values() for name, title in item.tables.items()}
# Each item's figures beside the reference study's (analysis/reference.py builds them).
REFERENCE_TABLES = {
    item: f"{item.lower().replace('-', '_')}_reference"
    for item in ("C2", "C3", "C5", "C6", "C7", "Q1-Q4")
}
TITLES |= {name: f"{item}: beside the reference study" for item, name in REFERENCE_TABLES.items()}


@dataclass(frozen=True)
class Labels:
    """Where a run sits in the study: the command, the exercise (C2…C7, Q1-Q4), the variant."""

    command: str
    exercise: str
    variant: str = ""

    def tags(self) -> dict[str, str]:
        return {COMMAND: self.command, EXERCISE: self.exercise, VARIANT: self.variant}

    def run_name(self, *settings: str) -> str:
        """What the UI lists: a child by its variant, short (`short_name`), else the command
        and its main settings (e.g. `compare-optim synthetic cpu`)."""
        return short_name(self.variant) if self.variant else " ".join([self.command, *settings])

    def about(self) -> str:
        """A new experiment's description: the command and the question it answers."""
        return f"`cifarexp {self.command}` ({self.exercise}): {ITEMS[self.exercise].question}"


# The variants named by their value alone in the UI's run names (the field stays in the
# variant tag and the params): `adadelta`, `no-bn`, `cuda`; `workers=4` keeps its field.
BY_VALUE = ("optimizer", "model", "device")


def short_name(variant: str) -> str:
    """A child run's name, short enough for the UI's runs column to tell the children apart
    uncut: `optimizer=adadelta` -> `adadelta`, `model=no-bn` -> `no-bn`, `device=cuda` ->
    `cuda`, `gpus=2,scaling=weak` -> `gpus=2 weak`; other variants as they are."""
    field, _, value = variant.partition("=")
    if field in BY_VALUE and value:
        return value
    if field == "gpus" and ",scaling=" in value:
        count, _, scaling = value.partition(",scaling=")
        return f"gpus={count} {scaling}"
    return variant


def description(
    exercise: str, answer: str, settings: Mapping[str, object], notes: Sequence[str] = ()
) -> str:
    """A run's description (markdown): the study's question, its answer, what a reader must
    know before trusting it (`notes`: a disturbed timing, a divergence), the settings."""
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    warned = "".join(f"> **{note}**\n\n" for note in notes)
    return f"**{ITEMS[exercise].question}**\n\n{answer}\n\n{warned}Settings: {shown}."
