"""The lab, end to end, on a preset shrunk to seconds: every item answered in the store, the
report written, and a variant the lab has trained already reused, not trained again."""

from __future__ import annotations

import pytest

from cifarexp import config, tracking
from tests.conftest import TINY, all_runs


@pytest.fixture
def tiny_preset(monkeypatch):
    sizes = {"train_size": TINY.train_size, "epochs": TINY.epochs, "batch_size": TINY.batch_size,
             "lr": 0.0125, "cpu_batches": 1}  # fmt: skip
    monkeypatch.setitem(config.PRESETS, "quick", sizes)


@pytest.mark.slow
def test_the_lab_answers_every_item_and_reuses_a_variant_it_trained(cli, client, tiny_preset):
    # Given the whole study on a tiny preset,
    result = cli("lab", "--preset", "quick", "--dataset", "synthetic", "--device", "cpu", "--quiet")

    # then it ends well, with a finished top-level run for every item and the report,
    assert result.exit_code == 0, result.output
    runs = all_runs(client)
    top = {
        r.data.tags["cifarexp.exercise"] for r in runs if "mlflow.parentRunId" not in r.data.tags
    }
    assert top == {"Q1-Q4", "C2", "C3", "C5", "C6", "C7", "report"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # each item's links printed as it finished, the report's last, and once how to open the UI
    output = " ".join(result.output.split())
    assert output.count("In the MLflow UI: http://127.0.0.1:5000/#/experiments/") == 7
    assert output.count("cifarexp ui") == 1
    assert output.endswith("See it in the MLflow UI: cifarexp ui")
    trained = [r for r in runs if "epochs" in r.data.params]
    assert trained and all(r.data.params["lr"] == "0.0125" for r in trained)
    assert "Report written to report/report.md" in " ".join(result.output.split())
    # the report run is no training run: no worker count came to it from the sweep
    [report] = [r for r in runs if r.data.tags["cifarexp.exercise"] == "report"]
    assert tracking.WORKERS_FROM not in report.data.tags
    assert (
        tracking.WORKERS_FROM
        in next(r for r in runs if r.data.tags["cifarexp.exercise"] == "C6").data.tags
    )
    assert "mlflow.note.content" in report.data.tags  # its description: each item's answer

    # and C7's BN model, the same settings as C6's SGD child, is that run's copy, saying so.
    by_variant = {
        (r.data.tags["cifarexp.exercise"], r.data.tags.get("cifarexp.variant")): r for r in runs
    }
    sgd, bn = by_variant["C6", "optimizer=sgd"], by_variant["C7", "model=bn"]
    assert bn.data.tags["cifarexp.reused_from"] == sgd.info.run_id
    assert "cifarexp.reused_from" not in by_variant["C7", "model=no-bn"].data.tags
    assert bn.data.params == sgd.data.params
    for key in ("train_loss", "train_acc", "epoch_time_s"):
        history = [(m.step, m.value) for m in client.get_metric_history(bn.info.run_id, key)]
        assert history == [
            (m.step, m.value) for m in client.get_metric_history(sgd.info.run_id, key)
        ]
        assert [step for step, _ in history] == [1, 2]
