"""Runs of realistic shape logged straight into a store (no training), for analysis tests
and the report benchmark."""

from __future__ import annotations

import json
import time

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

C = "cifarexp."


def log_run(
    client: MlflowClient,
    experiment_id: str,
    *,
    command: str,
    exercise: str,
    variant: str = "",
    params: dict | None = None,
    epochs: list[dict[str, float]] = (),
    metrics: dict[str, float] | None = None,
    parent_id: str | None = None,
    status: str = "FINISHED",
    dataset: str = "synthetic",
    device: str = "cuda",
    tags: dict[str, str] | None = None,
) -> str:
    """One run with cifarexp's tags (and `tags`), `params`, per-epoch metrics (step = epoch)
    and single `metrics`; returns its id."""
    tags = {
        **(tags or {}),
        C + "command": command, C + "exercise": exercise, C + "variant": variant,
        C + "dataset": dataset, C + "device": device, C + "device_name": "Fake GPU",
        C + "cpu_count": "16",
    }  # fmt: skip
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run_id = client.create_run(experiment_id, tags=tags, run_name=variant or command).info.run_id
    now = int(time.time() * 1000)
    values = [
        Metric(key, float(value), now, step)
        for step, epoch in enumerate(epochs, start=1)
        for key, value in epoch.items()
    ] + [Metric(key, float(value), now, 0) for key, value in (metrics or {}).items()]
    client.log_batch(
        run_id,
        metrics=values,
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.set_terminated(run_id, status)
    return run_id


def epoch(data: float, train: float, total: float, loss: float, acc: float) -> dict[str, float]:
    return {
        "data_time_s": data, "train_time_s": train, "epoch_time_s": total,
        "train_loss": loss, "train_acc": acc, "images_per_s": 50_000 / total,
    }  # fmt: skip


def partial(measured: dict[str, float], *, whole_epoch_s: float) -> dict[str, float]:
    """An epoch cut short (max_batches), as cifarexp logs it: its own times as partial_*,
    the whole-epoch estimate as epoch_time_s."""
    rest = {k: v for k, v in measured.items() if k not in ("data_time_s", "train_time_s")}
    return {
        **rest, "partial_data_s": measured["data_time_s"],
        "partial_train_s": measured["train_time_s"],
        "partial_total_s": measured["epoch_time_s"], "epoch_time_s": whole_epoch_s,
    }  # fmt: skip


def log_study(client: MlflowClient, prefix: str = "cifarexp") -> dict[str, str]:
    """One finished run (or parent with children) per item of the study, with known values;
    returns item -> top-level run id."""
    exp = lambda name: client.create_experiment(f"{prefix}-{name}-{time.time_ns()}")  # noqa: E731
    ids = {}
    e = exp("time")
    ids["C2"] = log_run(
        client, e, command="time", exercise="C2", params={"workers": 2},
        epochs=[epoch(0.2, 14.0, 14.5, 1.5, 0.45), epoch(0.2, 13.0, 13.5, 1.0, 0.65)],
        metrics={"warmup_s": 3.1},
    )  # fmt: skip
    e = exp("sweep-workers")
    ids["C3"] = parent = log_run(
        client, e, command="sweep-workers", exercise="C3", metrics={"best_workers": 8}
    )
    for workers, data in ((1, 5.9), (0, 11.6), (4, 0.97), (8, 0.90)):
        log_run(
            client, e, command="sweep-workers", exercise="C3", variant=f"workers={workers}",
            params={"workers": workers, "loader": "torch"}, parent_id=parent,
            epochs=[epoch(data, 4.0, data + 4.5, 2.0, 0.3)],
        )  # fmt: skip
    e = exp("compare-device")
    ids["C5"] = parent = log_run(client, e, command="compare-device", exercise="C5")
    log_run(
        client, e, command="compare-device", exercise="C5", variant="device=cpu",
        params={"device": "cpu"}, parent_id=parent, device="cpu",
        epochs=[partial(epoch(0.1, 9.0, 10.0, 2.0, 0.2), whole_epoch_s=200.0)],
    )  # fmt: skip
    log_run(
        client, e, command="compare-device", exercise="C5", variant="device=cuda",
        params={"device": "cuda"}, parent_id=parent,
        epochs=[epoch(0.9, 3.9, 5.0, 2.0, 0.2), epoch(0.9, 3.9, 5.0, 1.8, 0.3)],
    )  # fmt: skip
    ids["C5-scaling"] = parent = log_run(
        client, e, command="compare-device", exercise="C5-scaling", params={"gpus": "1,2,4"}
    )
    # 50,000 images an epoch; epoch 1 (autotuning) is slow; from epoch 2 on: 1 GPU 5 s,
    # weak (128 a GPU) 2.6 s and 1.4 s, strong (128 in all) 2.8 s and 1.75 s
    for variant, gpus, scaling, steady in (
        ("gpus=1", None, "weak", 5.0),
        ("gpus=2,scaling=weak", 2, "weak", 2.6),
        ("gpus=4,scaling=weak", 4, "weak", 1.4),
        ("gpus=2,scaling=strong", 2, "strong", 2.8),
        ("gpus=4,scaling=strong", 4, "strong", 1.75),
    ):
        params = {"batch_size": 128, "scaling": scaling}
        if gpus:
            params["world_size"] = gpus
        comm = {"comm_time_s": 0.1} if gpus else {}
        steps = [epoch(0.5, 9.0, 10.0, 2.0, 0.1)] + [epoch(0.5, 4.0, steady, 1.8, 0.3)] * 2
        log_run(
            client, e, command="compare-device", exercise="C5-scaling", variant=variant,
            params=params, parent_id=parent, epochs=[{**step, **comm} for step in steps],
        )  # fmt: skip
    e = exp("compare-optim")
    ids["C6"] = parent = log_run(client, e, command="compare-optim", exercise="C6")
    for name, acc in (("sgd", 0.72), ("adam", 0.31)):
        log_run(
            client, e, command="compare-optim", exercise="C6", variant=f"optimizer={name}",
            params={"optimizer": name}, parent_id=parent,
            epochs=[epoch(0.2, 4.0, 4.5, 1.6, acc - 0.1), epoch(0.2, 6.0, 6.5, 1.2, acc)],
        )  # fmt: skip
    e = exp("no-bn")
    ids["C7"] = parent = log_run(client, e, command="no-bn", exercise="C7")
    for bn, acc in (("False", 0.61), ("True", 0.72)):
        log_run(
            client, e, command="no-bn", exercise="C7",
            variant="model=bn" if bn == "True" else "model=no-bn",
            params={"batch_norm": bn}, parent_id=parent,
            epochs=[epoch(0.2, 4.0, 4.5, 1.6, acc - 0.2), epoch(0.2, 4.0, 4.5, 1.0, acc)],
        )  # fmt: skip
    e = exp("inspect")
    ids["Q1-Q4"] = log_run(
        client, e, command="inspect", exercise="Q1-Q4", params={"optimizers": "sgd,adam"},
        metrics={"conv_layers": 20, "last_linear_in_features": 512, "trainable_params": P},
    )  # fmt: skip
    client.log_text(ids["Q1-Q4"], json.dumps(inspect_answers(ids["Q1-Q4"])), "answers.json")
    return ids


P, TENSORS = 11_173_962, 62  # ResNet-18's trainable parameters, and their tensors


def count(tensors: int, elements: int) -> dict[str, float]:
    return {"tensors": tensors, "elements": elements, "bytes": 4 * elements,
            "mib": round(4 * elements / 2**20, 3)}  # fmt: skip


def inspect_answers(run_id: str) -> dict:
    """The answers.json of an inspect run of ResNet-18 with SGD and Adam (its schema:
    cifarexp.study.inspection.Inspection.answers)."""
    params = count(TENSORS, P)
    return {
        "run_id": run_id, "model": "resnet18", "variant": "bn", "dataset": "synthetic",
        "batch_size": 8,
        "q1_conv_layers": {"total": 20, "stem": 1, "main_path": 16, "shortcut": 3},
        "q2_last_linear": {"module": "fc", "in_features": 512, "out_features": 10},
        "trainable_parameters": params, "buffers": count(60, 9_620),
        "q3_q4_optimizers": {
            "sgd": {
                "trainable_parameters": params, "gradients_before_backward": count(0, 0),
                "gradients_after_backward": params, "state": {"momentum_buffer": params},
                "state_total": params,
            },
            "adam": {
                "trainable_parameters": params, "gradients_before_backward": count(0, 0),
                "gradients_after_backward": params,
                "state": {"step": count(TENSORS, TENSORS), "exp_avg": params,
                          "exp_avg_sq": params},
                "state_total": count(3 * TENSORS, 2 * P + TENSORS),
            },
        },
    }  # fmt: skip
