import math
import time

import pytest
import torch
from torch import nn

from cifarexp.config import OPTIMIZERS
from cifarexp.training import engine
from cifarexp.training.data import load_split, make_loader
from cifarexp.training.engine import (
    EpochResult,
    estimate_epoch,
    evaluate,
    summary,
    train,
    train_one_epoch,
)
from cifarexp.training.models import build_model
from cifarexp.training.optim import FACTORIES, build_optimizer
from tests.conftest import TINY

CPU = torch.device("cpu")


def tiny_setup(cfg=TINY):
    torch.manual_seed(0)
    model = build_model()
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    loader = make_loader(cfg, load_split(cfg, train=True), train=True)
    return model, optimizer, loader


def test_epoch_metrics_are_finite_and_the_times_fit_inside_the_total():
    model, optimizer, loader = tiny_setup()
    result = train_one_epoch(model, loader, optimizer, CPU, epoch=1)
    assert result.images == TINY.train_size
    assert math.isfinite(result.train_loss) and 0 <= result.train_acc <= 1
    assert result.data_time_s > 0 and result.train_time_s > 0 and result.epoch_time_s > 0
    assert result.data_time_s + result.train_time_s <= result.epoch_time_s
    assert set(result.metrics()) == {
        "data_time_s",
        "train_time_s",
        "epoch_time_s",
        "train_loss",
        "train_acc",
        "images_per_s",
    }


def test_loss_falls_when_overfitting_one_small_batch():
    torch.manual_seed(0)
    model = build_model()
    optimizer = build_optimizer("sgd", model.parameters(), lr=0.01)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    results = train(model, [(images, labels)], optimizer, CPU, epochs=15, on_epoch=lambda r: None)
    assert results[-1].train_loss < results[0].train_loss / 2
    assert results[-1].train_acc == 1.0


def test_each_epoch_is_reported_as_it_ends_and_evaluation_is_outside_the_timing(monkeypatch):
    model, optimizer, loader = tiny_setup()
    test_loader = make_loader(TINY, load_split(TINY, train=False), train=False)
    # an evaluation that takes 1000 s on the clock the engine reads
    real_evaluate, clock, skipped = engine.evaluate, time.perf_counter, [0.0]

    def slow_evaluate(*args, **kwargs):
        skipped[0] += 1000
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock() + skipped[0])
    seen = []
    results = train(
        model,
        loader,
        optimizer,
        CPU,
        epochs=2,
        on_epoch=seen.append,
        test_loader=[next(iter(test_loader))],
    )
    assert seen == results and [r.epoch for r in results] == [1, 2]
    assert all(r.test_loss is not None and 0 <= r.test_acc <= 1 for r in results)
    assert {"test_loss", "test_acc"} <= set(results[0].metrics())
    assert all(r.epoch_time_s < 1000 for r in results)  # the evaluation is in no epoch


def test_max_batches_stops_the_epoch_early():
    model, optimizer, loader = tiny_setup()
    result = train_one_epoch(model, loader, optimizer, CPU, epoch=1, max_batches=1)
    assert result.images == TINY.batch_size


def test_evaluate_returns_mean_loss_and_accuracy():
    # Given a model whose logits are all equal, and batches whose labels are known,
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    labels = torch.tensor([0, 0, 3, 7, 0, 9])
    batches = [(torch.randn(3, 3, 32, 32), labels[:3]), (torch.randn(3, 3, 32, 32), labels[3:])]
    # when it is evaluated,
    loss, acc = evaluate(model, batches, CPU)
    # then the loss is the mean cross-entropy, log 10, and a tie picks class 0 (3 of 6).
    assert loss == pytest.approx(math.log(10)) and acc == pytest.approx(3 / 6)


def test_every_optimizer_in_the_table_builds_and_steps():
    assert tuple(FACTORIES) == OPTIMIZERS  # the config's choices are the table's names
    for name in OPTIMIZERS:
        model = build_model()
        optimizer = build_optimizer(name, model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        assert optimizer.defaults["lr"] == 0.1 and optimizer.defaults["weight_decay"] == 5e-4
        after = list(model.parameters())
        assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True)), name
    nesterov = build_optimizer("nesterov", build_model().parameters())
    assert nesterov.defaults["nesterov"] and nesterov.defaults["momentum"] == 0.9


def test_a_partial_epoch_is_estimated_with_its_first_batch_once_and_a_range():
    # 3 of 10 batches ended 1.0, 1.5 and 2.5 s into the epoch: the first (the workers'
    # start) once, then 9 batches at the later ones' mean 0.75 s, fastest 0.5, slowest 1.0
    assert estimate_epoch([1.0, 1.5, 2.5], 10, 2.6) == {
        "estimated_epoch_s": 7.75, "estimate_low_s": 5.5, "estimate_high_s": 10.0,
    }  # fmt: skip
    one = estimate_epoch([1.0], 10, 1.2)  # one batch: no range, the partial time scaled
    assert one["estimated_epoch_s"] == 12.0 and one["estimate_low_s"] is None
    assert set(estimate_epoch([1.0, 2.0], 2, 2.0).values()) == {None}  # a whole epoch


def test_the_summary_is_the_last_epoch_and_the_mean_of_whole_epochs():
    whole = EpochResult(1, 0.2, 1.0, 1.5, 2.0, 0.1, 64, energy_j=30.0)
    partial = EpochResult(2, 0.1, 0.3, 0.5, 1.5, 0.4, 32, estimated_epoch_s=2.5, energy_j=10.0)
    values = summary([whole, partial])
    assert values == pytest.approx({
        "final_loss": 1.5, "final_acc": 0.4, "avg_epoch_time_s": 2.0,
        "avg_train_time_s": (1.0 + 0.3 * 5) / 2, "avg_data_time_s": (0.2 + 0.1 * 5) / 2,
        "avg_energy_j": (30.0 + 50.0) / 2,
    })  # fmt: skip
    assert "avg_energy_j" not in summary([EpochResult(1, 0.2, 1.0, 1.5, 2.0, 0.1, 64)])
