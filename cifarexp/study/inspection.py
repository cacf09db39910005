"""`cifarexp inspect`: Q1–Q4 answered from the model, recorded in one MLflow run.

The answers have one schema, `Inspection.answers()`: printed by `--json`, logged as the
run's answers.json and read back from there by the report."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from cifarexp import tracking
from cifarexp.config import TrainConfig
from cifarexp.study.catalogue import Labels, description
from cifarexp.study.runs import environment_tags
from cifarexp.study.session import Session
from cifarexp.training import models
from cifarexp.training.anatomy import (
    ConvCount,
    Count,
    OptimizerAnatomy,
    ParameterCounts,
    conv_layers,
    count_conv_layers,
    last_linear,
    optimizer_anatomy,
    optimizers_frame,
    parameter_counts,
)
from cifarexp.training.data import load_split, make_loader
from cifarexp.training.models import build_model


def variant(cfg: TrainConfig) -> str:
    return "bn" if cfg.batch_norm else "no-bn"


def first_batch(cfg: TrainConfig) -> tuple[Tensor, Tensor]:
    """The first training batch of cfg's dataset, loaded and transformed as in training."""
    loader = make_loader(cfg, load_split(cfg, train=True), train=True)
    return next(iter(loader))


@dataclass(frozen=True)
class Inspection:
    """The answers to Q1–Q4 for one model variant, and the run that holds them."""

    run_id: str
    cfg: TrainConfig
    convs: pd.DataFrame  # one row per conv layer
    conv_count: ConvCount
    last_linear: tuple[str, int, int]  # module name, in_features, out_features
    params: ParameterCounts
    optimizers: list[OptimizerAnatomy]

    def answers(self) -> dict[str, object]:
        """Everything a script needs, as plain JSON-ready values."""
        name, in_features, out_features = self.last_linear
        return {
            "run_id": self.run_id,
            "model": self.cfg.model,
            "variant": variant(self.cfg),
            "dataset": self.cfg.dataset,
            "batch_size": self.cfg.batch_size,
            "q1_conv_layers": {
                "total": self.conv_count.total,
                "stem": self.conv_count.stem,
                "main_path": self.conv_count.main_path,
                "shortcut": self.conv_count.shortcut,
            },
            "q2_last_linear": {
                "module": name,
                "in_features": in_features,
                "out_features": out_features,
            },
            "trainable_parameters": _json(self.params.trainable),
            "buffers": _json(self.params.buffers),
            "q3_q4_optimizers": {
                a.optimizer: {
                    "trainable_parameters": _json(a.trainable),
                    "gradients_before_backward": _json(a.grads_before_backward),
                    "gradients_after_backward": _json(a.grads),
                    "state": {key: _json(count) for key, count in a.state.items()},
                    "state_total": _json(a.state_total),
                }
                for a in self.optimizers
            },
        }

    def answer(self) -> str:
        """Q1-Q4 answered in a few lines (markdown), for the run's description."""
        c, (name, in_features, _) = self.conv_count, self.last_linear
        trainable = self.params.trainable
        lines = [
            f"- **Q1**: {c.total} convolutional layers (nn.Conv2d modules): {c.stem} in the stem, "
            f"{c.main_path} on the blocks' main path, {c.shortcut} in shortcut projections.",
            f"- **Q2**: the last linear layer ({name}) receives a vector of {in_features} "
            "features.",
        ]
        grads = {a.optimizer: a.grads.elements for a in self.optimizers}
        same = len(set(grads.values())) == 1
        shown = (
            f"{next(iter(grads.values())):,} gradients after backward with {' and '.join(grads)}"
            if same
            else "; ".join(f"{n:,} gradients after backward with {o}" for o, n in grads.items())
        )
        lines.append(
            f"- **Q3**: {trainable.elements:,} trainable parameters in {trainable.tensors} "
            f"tensors; {shown} (none before the first backward)."
        )
        for a in self.optimizers:
            kept = ", ".join(a.state) or "nothing"
            lines.append(
                f"- **Q4** ({a.optimizer}): keeps {kept} per parameter, "
                f"{a.state_total.elements:,} elements ({a.state_total.mib:.2f} MiB)."
            )
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(self.answers(), indent=2)

    def metrics(self) -> dict[str, float]:
        """The counts as MLflow metrics (per-key state counts prefixed by the optimizer)."""
        metrics = {
            "conv_layers": self.conv_count.total,
            "conv_layers_stem": self.conv_count.stem,
            "conv_layers_main_path": self.conv_count.main_path,
            "conv_layers_shortcut": self.conv_count.shortcut,
            "last_linear_in_features": self.last_linear[1],
            "trainable_param_tensors": self.params.trainable.tensors,
            "trainable_params": self.params.trainable.elements,
            "buffer_tensors": self.params.buffers.tensors,
            "buffer_elements": self.params.buffers.elements,
        }
        for a in self.optimizers:
            counts = {
                "grad_tensors_before_backward": a.grads_before_backward.tensors,
                "grad_tensors": a.grads.tensors,
                "grad_elements": a.grads.elements,
                "state_tensors": a.state_total.tensors,
                "state_elements": a.state_total.elements,
                "state_mib": a.state_total.mib,
            }
            for key, count in a.state.items():
                counts[f"state_{key}_tensors"] = count.tensors
                counts[f"state_{key}_elements"] = count.elements
            metrics |= {f"{a.optimizer}_{name}": value for name, value in counts.items()}
        return metrics


def _json(count: Count) -> dict[str, float]:
    return {
        "tensors": count.tensors,
        "elements": count.elements,
        "bytes": count.bytes,
        "mib": count.mib,  # exact: rounded once, where it is shown
    }


def run_inspection(cfg: TrainConfig, optimizers: tuple[str, ...], session: Session) -> Inspection:
    """Measure Q1–Q4 on CPU for cfg's model variant and record them in one MLflow run.

    The counts do not depend on the batch: it only has to be real so that backward and the
    optimizer step are real.
    """
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, batch_norm=cfg.batch_norm)
    batch = first_batch(cfg)
    hyper = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    anatomies = [optimizer_anatomy(model, name, batch, **hyper) for name in optimizers]
    fc_name, fc = last_linear(model)
    cpu = torch.device("cpu")
    labels = Labels("inspect", "Q1-Q4", variant(cfg))
    tags = {**labels.tags(), tracking.DATASET: cfg.dataset, **environment_tags(cpu)}
    params = {
        "model": cfg.model,
        "batch_norm": cfg.batch_norm,
        "optimizers": ",".join(optimizers),
        "dataset": cfg.dataset,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        **hyper,
    }
    name = f"inspect {variant(cfg)} {','.join(optimizers)}"
    tracker = session.tracker
    with tracker.start_run(
        session.experiment_of(labels.command), run_name=name, tags=tags, params=params,
        about=labels.about(),
    ) as run_id:  # fmt: skip
        result = Inspection(
            run_id,
            cfg,
            conv_layers(model),
            count_conv_layers(model),
            (fc_name, fc.in_features, fc.out_features),
            parameter_counts(model),
            anatomies,
        )
        tracker.log_text(models.summary(model, cfg.batch_size, cpu), "model_summary.txt")
        tracker.log_metrics(result.metrics())
        tracker.log_table(result.convs, "q1_conv_layers")
        tracker.log_table(optimizers_frame(anatomies), "q3_q4_optimizers")
        tracker.log_text(result.json(), "answers.json")
    if run_id is not None:
        tracker.describe(run_id, description(labels.exercise, result.answer(), params))
    return result
