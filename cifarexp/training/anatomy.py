"""What the model contains (Q1–Q4), computed from its modules: no MLflow, no printing."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cifarexp.training.models import BasicBlock
from cifarexp.training.optim import build_optimizer

STEM, MAIN_PATH, SHORTCUT = "stem", "main path of the blocks", "shortcut projections"


@dataclass(frozen=True)
class Count:
    """Some tensors: how many, their elements and their bytes."""

    tensors: int = 0
    elements: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, tensors: Iterable[Tensor | None]) -> Count:
        """Counts the tensors given, skipping None (e.g. a gradient not computed yet)."""
        found = [t for t in tensors if t is not None]
        return cls(
            len(found),
            sum(t.numel() for t in found),
            sum(t.numel() * t.element_size() for t in found),
        )

    @property
    def mib(self) -> float:
        return self.bytes / 2**20

    def __add__(self, other: Count) -> Count:
        return Count(
            self.tensors + other.tensors, self.elements + other.elements, self.bytes + other.bytes
        )


# --- Q1: convolutional layers


def conv_layers(model: nn.Module) -> pd.DataFrame:
    """Q1 in detail: one row per nn.Conv2d module, with where it sits and its shape.

    Where: inside a residual block's shortcut, elsewhere inside a block (the main path),
    or outside every block (the stem).
    """
    place: dict[int, str] = {}  # id(module) -> where, for every module inside a block
    for block in (m for m in model.modules() if isinstance(m, BasicBlock)):
        place.update({id(m): MAIN_PATH for m in block.modules()})
        place.update({id(m): SHORTCUT for m in block.shortcut.modules()})
    rows = [
        {
            "module": name,
            "where": place.get(id(conv), STEM),
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel": "x".join(map(str, conv.kernel_size)),
            "stride": conv.stride[0],
            "parameters": sum(p.numel() for p in conv.parameters()),
        }
        for name, conv in model.named_modules()
        if isinstance(conv, nn.Conv2d)
    ]
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class ConvCount:
    """Q1: the number of convolutional layers, and where they are."""

    stem: int
    main_path: int
    shortcut: int

    @property
    def total(self) -> int:
        return self.stem + self.main_path + self.shortcut


def count_conv_layers(model: nn.Module) -> ConvCount:
    where = conv_layers(model)["where"]
    return ConvCount(*(int((where == place).sum()) for place in (STEM, MAIN_PATH, SHORTCUT)))


# --- Q2: the last linear layer


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last nn.Linear module and its name; Q2 is its `in_features`."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


# --- Q3, Q4: parameters, gradients, state


@dataclass(frozen=True)
class ParameterCounts:
    trainable: Count  # parameters with requires_grad: what the optimizer updates
    buffers: Count  # not trained: BatchNorm's running statistics and batch counter


def parameter_counts(model: nn.Module) -> ParameterCounts:
    return ParameterCounts(
        trainable=Count.of(p for p in model.parameters() if p.requires_grad),
        buffers=Count.of(model.buffers()),
    )


@dataclass(frozen=True)
class OptimizerAnatomy:
    """Q3/Q4 for one optimizer, measured around one real training step."""

    optimizer: str
    trainable: Count
    grads_before_backward: Count  # gradients do not exist before the first backward pass
    grads: Count  # after backward
    state: dict[str, Count]  # the optimizer's per-parameter state after the step, by key

    @property
    def state_total(self) -> Count:
        return sum(self.state.values(), Count())

    def quantities(self) -> dict[str, Count]:
        """Every count by its name in the Q3/Q4 tables, in their order."""
        return {
            "trainable parameters": self.trainable,
            "gradients before backward": self.grads_before_backward,
            "gradients after backward": self.grads,
            **{f"state: {key}": count for key, count in self.state.items()},
            "state: total": self.state_total,
        }


def optimizer_anatomy(
    model: nn.Module, optimizer: str, batch: tuple[Tensor, Tensor], **options: float
) -> OptimizerAnatomy:
    """One forward, cross-entropy loss, backward and `optimizer` step on a copy of `model`.

    `options` (lr, momentum, weight_decay) go to build_optimizer; `model` is left untouched.
    """
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, **options)
    grads_before = Count.of(p.grad for p in params)
    images, labels = batch
    F.cross_entropy(model(images), labels).backward()
    grads = Count.of(p.grad for p in params)
    opt.step()
    states = list(opt.state.values())
    keys = dict.fromkeys(key for state in states for key in state)  # in the optimizer's order
    state = {key: Count.of(s[key] for s in states if torch.is_tensor(s.get(key))) for key in keys}
    return OptimizerAnatomy(optimizer, Count.of(params), grads_before, grads, state)


def optimizers_frame(anatomies: Iterable[OptimizerAnatomy]) -> pd.DataFrame:
    """Q3/Q4 as one long table: a row per optimizer and quantity (tensors, elements, MiB)."""
    rows = []
    for a in anatomies:
        rows += [
            {
                "optimizer": a.optimizer,
                "quantity": quantity,
                "tensors": c.tensors,
                "elements": c.elements,
                "MiB": c.mib,
            }
            for quantity, c in a.quantities().items()
        ]
    return pd.DataFrame(rows)
