"""The study's five optimizers (C6), built from one table."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from cifarexp.config import did_you_mean

# name (config.OPTIMIZERS) -> (factory, whether it takes the momentum setting)
FACTORIES: dict[str, tuple[Callable[..., torch.optim.Optimizer], bool]] = {
    "sgd": (torch.optim.SGD, True),
    "nesterov": (partial(torch.optim.SGD, nesterov=True), True),
    "adagrad": (torch.optim.Adagrad, False),
    "adadelta": (torch.optim.Adadelta, False),
    "adam": (torch.optim.Adam, False),
}


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    *,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer called `name`; unknown names fail listing the valid ones. `fused`:
    PyTorch's fused implementation, its update in one kernel (the same maths; sgd and
    nesterov only: what a captured step runs, see `warmup.GraphedStep`)."""
    try:
        factory, takes_momentum = FACTORIES[name]
    except KeyError:
        raise KeyError(
            f"unknown optimizer {name!r}{did_you_mean(name, FACTORIES)}; choose from "
            f"{', '.join(FACTORIES)}"
        ) from None
    extra = {"momentum": momentum} if takes_momentum else {}
    if fused:
        extra["fused"] = True
    return factory(params, lr=lr, weight_decay=weight_decay, **extra)
