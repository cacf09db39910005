"""The reference study's figures (the report this project reproduces), as data, each with
what makes it not comparable; and each item's figures beside them."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from analysis import measures
from analysis.measures import Measure
from analysis.queries import Exercise
from cifarexp.study.catalogue import REFERENCE_TABLES

OLDER_GPU = "an older GPU, model unknown"
UNSYNCED = "timed without synchronising the GPU"
ONE_RUN = "one run of unknown seed: compare the ranking, not the digits"


@dataclass(frozen=True)
class Reference:
    """One figure of the reference report, beside the user's figure of the same name."""

    item: str
    figure: str  # a `measures.Measure` figure name
    low: float | None  # its value, or range (low, high); None: the reference is wrong
    high: float | None
    given: str  # as the reference report gave it
    caveat: str = ""  # what makes it not comparable with a measured figure
    note: str = ""  # what to keep in mind where it is comparable

    @property
    def value(self) -> float | None:
        return None if self.low is None else (self.low + self.high) / 2


def _one(item: str, figure: str, value: float, given: str, caveat: str = "") -> Reference:
    return Reference(item, figure, value, value, given, caveat)


def _accuracy(item: str, variant: str, value: float) -> Reference:
    return Reference(item, f"final accuracy ({variant})", value, value, f"{value:.1%}", "", ONE_RUN)


# The reference report's figures, as it gave them: batch 128, all 50,000 CIFAR-10 images, 5
# epochs, lr 0.1, on one GPU (2 DataLoader workers for C2, the best count after C3).
REFERENCE = [
    _one("C2", "data-loading s/epoch", 0.19, "≈ 0.19 s per epoch", UNSYNCED),
    Reference("C2", "training s/epoch", 13.0, 14.0, "13–14 s per epoch",
              f"{OLDER_GPU}; {UNSYNCED}"),
    _one("C2", "epoch s", 66.8 / 5, "66.8 s for 5 epochs", OLDER_GPU),
    _one("C3", "best workers", 18, "18 (every count from 4 to 40 within 1.58–1.65 s)",
         "a flat plateau on a CPU of unknown cores: any count on it is as good"),
    Reference("C3", "data-loading s/epoch (best count)", 1.58, 1.65,
              "1.58–1.65 s (1.97 s with 2 workers)", UNSYNCED),
    _one("C5", "epoch s (device=cpu)", 997 / 5, "997 s for 5 epochs", "a CPU of unknown model"),
    _one("C5", "epoch s (device=cuda)", 84 / 5, "84 s for 5 epochs", OLDER_GPU),
    _one("C5", "GPU speedup vs CPU", 997 / 84, "997 s / 84 s",
         f"{OLDER_GPU} against a CPU of unknown model"),
    _accuracy("C6", "optimizer=sgd", 0.719),
    _accuracy("C6", "optimizer=nesterov", 0.712),
    _accuracy("C6", "optimizer=adagrad", 0.651),
    _accuracy("C6", "optimizer=adadelta", 0.823),
    _accuracy("C6", "optimizer=adam", 0.311),
    _accuracy("C7", "model=no-bn", 0.613),
    Reference("Q1-Q4", "Q1 conv layers", None, None, "wrong",
              "the reference read it off torchsummary's row numbers; the answer here counts "
              "the model's Conv2d modules"),
    Reference("Q1-Q4", "Q2 last linear layer's input", None, None, "wrong",
              "the reference read it off a feature map's shape before pooling; the answer "
              "here is the Linear layer's in_features"),
]  # fmt: skip
# The settings the reference trained with: a figure measured with others is not comparable.
SETTINGS = {"train_size": "50000", "batch_size": "128", "epochs": "5", "lr": "0.1"}


def beside(item: str, ex: Exercise) -> dict[str, pd.DataFrame]:
    """`item`'s figures beside the reference's, as {table name: table} ({} where the
    reference has none): the reference's value as given, yours, yours / the reference's,
    and whether they can be compared (and why not)."""
    references = [r for r in REFERENCE if r.item == item]
    if not references:
        return {}
    yours = {m.figure: m for m in measures.measures(ex)}
    rows = [_row(reference, yours.get(reference.figure)) for reference in references]
    return {REFERENCE_TABLES[item]: pd.DataFrame(rows)}


def _row(reference: Reference, yours: Measure | None) -> dict[str, object]:
    ratio = (  # of quantities: a worker count is a choice, not a quantity (0 is no less)
        yours.value / reference.value
        if yours is not None
        and reference.value
        and yours.kind not in (measures.TEXT, measures.WORKERS)
        else None
    )
    return {
        "figure": reference.figure,
        "reference": reference.given,
        "yours": yours.shown() if yours is not None else "missing",
        "yours / reference": ratio,
        "comparable": _comparable(reference, yours),
    }


def _comparable(reference: Reference, yours: Measure | None) -> str:
    """'yes', or 'no: ' and why not (the reference's caveat, settings that differ); '–'
    where you have no such figure."""
    if reference.value is None:
        return f"no: the reference's answer is wrong ({reference.caveat})"
    if yours is None:
        return "–"  # nothing of yours to compare
    why = [reference.caveat] if reference.caveat else []
    relevant = yours.relevant
    differ = [
        f"{k} {relevant[k]} (the reference's {v})"
        for k, v in SETTINGS.items()
        if k in relevant and relevant[k] != v
    ]
    if yours.kind == measures.ACCURACY and relevant.get("dataset", "cifar10") != "cifar10":
        differ.insert(0, f"dataset {relevant['dataset']}")
    why += [f"yours trained with {', '.join(differ)}"] if differ else []
    if why:
        return f"no: {'; '.join(why)}"
    return f"yes: {reference.note}" if reference.note else "yes"
