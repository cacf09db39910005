import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cifarexp.study import comparisons, runs
from cifarexp.study.comparisons import auto_sweep
from tests.conftest import TINY, TINY_ARGS, all_runs, without

ONE_EPOCH = [*without("--epochs"), "--epochs", "1"]
# Every child's summary (`engine.summary`): one chart per name in MLflow, a bar per child.
SUMMARY = ("final_acc", "final_loss", "avg_epoch_time_s", "avg_train_time_s", "avg_data_time_s")


def parent_and_children(client):
    runs = all_runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    [parent] = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, sorted(children, key=lambda r: r.info.start_time)


def artifacts(client, run_id):
    return {a.path for a in client.list_artifacts(run_id)}


def csv(client, run_id, name):
    return pd.read_csv(client.download_artifacts(run_id, name))


@pytest.mark.parametrize(
    ("times", "counts"),
    [
        ({0: 10, 4: 5, 8: 4.9}, [0, 4, 8]),  # 2% better is noise: stop
        ({0: 10, 4: 5, 8: 4, 12: 4.5}, [0, 4, 8, 12]),  # worse: stop
        ({0: 10, 4: 9, 8: 8, 12: 7, 16: 6}, [0, 4, 8, 12, 16]),  # still falling: the cap
    ],
)
def test_auto_sweep_stops_once_data_time_stops_falling(times, counts):
    assert auto_sweep(times.__getitem__, limit=16) == counts


@pytest.mark.parametrize(
    ("cpus", "times", "counts"),
    [
        (2, {0: 10, 2: 6, 4: 5.9}, [0, 2, 4]),  # 2 CPUs: 2 workers tried, 4 no better: stop
        (2, {0: 10, 2: 10, 4: 5, 8: 5}, [0, 2, 4, 8]),  # 2 no better never ends the sweep
        (6, {0: 10, 4: 6, 6: 5, 8: 5}, [0, 4, 6, 8]),  # 6 between 4 and 8
        (8, {0: 10, 4: 6, 8: 5.9}, [0, 4, 8]),  # on a step: nothing added
    ],
)
def test_auto_sweep_tries_the_cpu_count_between_steps(cpus, times, counts):
    assert auto_sweep(times.__getitem__, limit=16, cpus=cpus) == counts


def test_sweep_workers_logs_children_tables_plot_and_best(cli, client):
    result = cli("sweep-workers", *without("--workers", ONE_EPOCH), "--workers", "0,1")
    assert result.exit_code == 0, result.output
    assert "C3" in result.output and "C4" in result.output and "1 worker" in result.output

    parent, children = parent_and_children(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cifarexp.command"] == "sweep-workers"
    assert parent.data.tags["cifarexp.exercise"] == "C3"
    assert parent.data.tags["cifarexp.dataset"] == "synthetic"
    assert [c.data.tags["cifarexp.variant"] for c in children] == ["workers=0", "workers=1"]
    assert [c.info.run_name for c in children] == ["workers=0", "workers=1"]
    assert all(set(SUMMARY) <= set(c.data.metrics) for c in children)
    assert set(parent.data.metrics) == {"best_workers"}
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.params["epochs"] == "1" for c in children)
    assert {"c3_workers.csv", "c4_one_vs_best.csv", "c3_workers.png", "notes.md"} <= artifacts(
        client, parent.info.run_id
    )
    # the best count is one of the counts run (which one: the smallest within noise of the
    # shortest wait, tested in test_analysis), the one the table marks
    best = parent.data.metrics["best_workers"]
    assert best in {int(c.data.params["workers"]) for c in children}
    c3 = csv(client, parent.info.run_id, "c3_workers.csv")
    assert list(c3["workers"]) == [0, 1]
    assert c3.loc[c3["best"] == "yes", "workers"].item() == best


def test_workers_best_uses_the_latest_sweep_and_fails_clearly_without_one(cli, client):
    result = cli("time", *without("--workers", ONE_EPOCH), "--workers", "best")
    assert result.exit_code == 2 and "no finished sweep-workers run" in result.output
    assert all_runs(client) == []

    sweep_args = without("--workers", ONE_EPOCH)
    assert cli("sweep-workers", *sweep_args, "--workers", "1,0").exit_code == 0
    [sweep] = [r for r in all_runs(client) if "best_workers" in r.data.metrics]
    best = int(sweep.data.metrics["best_workers"])
    result = cli("time", *without("--workers", ONE_EPOCH), "--workers", "best")
    assert result.exit_code == 0, result.output
    assert sweep.info.run_id in result.output
    [run] = [r for r in all_runs(client) if r.data.tags["cifarexp.command"] == "time"]
    assert run.data.params["workers"] == str(best)
    assert run.data.tags["cifarexp.workers_from"] == sweep.info.run_id
    assert "cifarexp.workers_from" not in sweep.data.tags


def test_compare_device_estimates_the_cpu_epoch_from_its_first_batches(cli, client):
    args = without("--device", ONE_EPOCH)
    result = cli("compare-device", *args, "--devices", "cpu", "--cpu-batches", "1")
    assert result.exit_code == 0, result.output
    assert "estimated" in result.output
    parent, [child] = parent_and_children(client)
    assert child.data.tags["cifarexp.variant"] == "device=cpu"
    assert child.data.params["max_batches"] == "1"
    # 1 of the 2 batches ran: the partial epoch says so, the epoch is about twice as long
    metrics = child.data.metrics
    assert {"partial_data_s", "partial_train_s", "partial_total_s"} <= set(metrics)
    assert "data_time_s" not in metrics and "est_epoch_time_s" not in metrics
    assert metrics["epoch_time_s"] == pytest.approx(2 * metrics["partial_total_s"])
    c5 = csv(client, parent.info.run_id, "c5_devices.csv")
    assert list(c5["estimated"]) == ["estimated"]
    assert "c5_devices.png" in artifacts(client, parent.info.run_id)


def test_compare_device_without_cuda_says_what_c5_needs_and_marks_partial_epochs(
    cli, client, monkeypatch
):
    # Given a machine where torch finds no CUDA device, 16 batches an epoch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = [*without("--train-size", without("--device", ONE_EPOCH)), "--train-size", "64"]
    args.remove("--quiet")
    # When C5 runs with its default devices, the CPU's epochs cut at 3 batches
    result = cli("compare-device", *args, "--cpu-batches", "3")
    # Then it says plainly that no CUDA device was found and what C5 needs, at once and in
    # its answer
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    before_training = output.split("epoch 1/1")[0]
    assert "No CUDA device was found: C5 compares a CUDA GPU with the CPU and needs one" in (
        before_training
    )
    parent, [child] = parent_and_children(client)
    note = parent.data.tags["mlflow.note.content"]
    assert "No CUDA device was found: C5 compares a CUDA GPU with the CPU and needs one" in note
    assert parent.data.tags["cifarexp.cuda_devices"] == "0"
    # and no speedup of the CPU over itself
    c5 = csv(client, parent.info.run_id, "c5_devices.csv")
    assert "speedup vs cpu" not in c5 and "gpu_speedup" not in parent.data.metrics
    # and the progress marks the partial epoch, with the whole epoch it estimates
    assert "device=cpu epoch 1/1 partial (first 3 batches): data " in output
    assert "; whole epoch estimated " in output
    assert "device=cpu: 1 partial epoch (3 batches each) in " in output
    # and the estimate comes with its range, from the batches after the first
    metrics = child.data.metrics
    low, high = metrics["estimate_low_s"], metrics["estimate_high_s"]
    assert low <= metrics["epoch_time_s"] <= high
    assert list(c5["estimate low s"]) == pytest.approx([low], rel=1e-5)
    assert f"cpu {metrics['epoch_time_s']:.2f} s (estimated from 3 batches an epoch, " in note
    assert f"{low:.2f}–{high:.2f} s)" in note


def test_compare_optim_has_a_child_per_optimizer_and_per_epoch_curves(cli, client):
    result = cli("compare-optim", *TINY_ARGS, "--optimizers", "sgd,adam")
    assert result.exit_code == 0, result.output
    assert "Final training accuracy, best first: " in result.output  # its answer, printed
    parent, children = parent_and_children(client)
    assert parent.data.tags["cifarexp.exercise"] == "C6"
    assert [c.data.params["optimizer"] for c in children] == ["sgd", "adam"]
    c6 = csv(client, parent.info.run_id, "c6_optimizers.csv")
    assert list(c6["optimizer"]) == ["sgd", "adam"]
    accuracy = csv(client, parent.info.run_id, "c6_accuracy.csv")
    assert list(accuracy.columns) == ["optimizer", "accuracy 1 %", "accuracy 2 %"]
    assert list(csv(client, parent.info.run_id, "c6_loss.csv")["optimizer"]) == ["sgd", "adam"]
    # the MLflow table holds the CSV's numbers, rounded once alike (was 79.6904556056)
    table = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "c6_optimizers.json")).read_text()
    )
    shown = pd.DataFrame(table["data"], columns=table["columns"])
    assert list(shown.columns) == list(c6.columns) and "final accuracy %" in shown
    assert shown["final accuracy %"].tolist() == pytest.approx(
        c6["final accuracy %"].tolist(), abs=0
    )
    assert all(len(f"{v:.15g}".replace(".", "").lstrip("0")) <= 6 for v in shown["final loss"])
    assert "c6_optimizers.png" in artifacts(client, parent.info.run_id)
    # MLflow's charts compare the children: each has the same summary metrics, and a name
    # that tells it apart; the parent has its headline alone.
    assert [c.info.run_name for c in children] == ["sgd", "adam"]
    variants = [c.data.tags["cifarexp.variant"] for c in children]
    assert variants == ["optimizer=sgd", "optimizer=adam"]  # the field, for --resume
    for child in children:
        metrics = child.data.metrics
        assert set(SUMMARY) <= set(metrics)
        assert metrics["final_acc"] == metrics["train_acc"]  # the last epoch's
        assert metrics["final_loss"] == metrics["train_loss"]
        history = client.get_metric_history(child.info.run_id, "epoch_time_s")
        assert metrics["avg_epoch_time_s"] == pytest.approx(
            sum(m.value for m in history) / len(history)
        )
    assert set(parent.data.metrics) == {"best_final_acc"}
    assert parent.data.metrics["best_final_acc"] == pytest.approx(max(c6["final accuracy %"]) / 100)
    # and it prints the link to MLflow's compare page of its variants
    ids = "%2C".join(f"%22{c.info.run_id}%22" for c in children)
    compare = (
        f"/#/compare-runs?runs=%5B{ids}%5D&experiments=%5B%22{parent.info.experiment_id}%22%5D"
    )
    assert f"Its variants side by side: http://127.0.0.1:5000{compare}" in result.output


def test_no_bn_trains_both_models_unless_no_baseline(cli, client):
    result = cli("no-bn", *ONE_EPOCH)
    assert result.exit_code == 0, result.output
    parent, children = parent_and_children(client)
    assert [c.data.params["batch_norm"] for c in children] == ["False", "True"]
    c7 = csv(client, parent.info.run_id, "c7_batch_norm.csv")
    assert list(c7["model"]) == ["no BN", "BN"]
    assert [c.info.run_name for c in children] == ["no-bn", "bn"]
    assert all(set(SUMMARY) <= set(c.data.metrics) for c in children)
    assert set(parent.data.metrics) == {"acc_gap"}
    assert "c7_batch_norm.png" in artifacts(client, parent.info.run_id)


def test_no_bn_with_no_baseline_trains_the_bn_free_model_alone(cli, client):
    result = cli("no-bn", *ONE_EPOCH, "--no-baseline")
    assert result.exit_code == 0, result.output
    _, children = parent_and_children(client)
    assert [c.data.params["batch_norm"] for c in children] == ["False"]


def test_interrupted_sweep_resumes_reusing_finished_children(cli, client, monkeypatch):
    real = runs.run_training
    calls = []

    def interrupt_second(cfg, labels, *args, **kwargs):
        calls.append(labels.variant)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, labels, *args, **kwargs)

    monkeypatch.setattr(comparisons, "run_training", interrupt_second)
    args = [*without("--workers", ONE_EPOCH), "--workers", "0,1"]
    assert cli("sweep-workers", *args).exit_code == 130
    parent, children = parent_and_children(client)
    assert parent.info.status == "KILLED" and len(children) == 1

    monkeypatch.setattr(comparisons, "run_training", real)
    result = cli("sweep-workers", *args, "--resume")
    assert result.exit_code == 0, result.output
    assert "reusing finished run" in result.output
    resumed, children = parent_and_children(client)
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert sorted(c.data.tags["cifarexp.variant"] for c in children) == ["workers=0", "workers=1"]


@pytest.mark.slow
def test_mlflow_run_entry_point_sweep_workers(client, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # set by earlier tests' mlflow.set_experiment
    # mlflow run runs the project in its own folder: keep the run's artifacts in tmp_path
    client.create_experiment("via-mlflow-run", artifact_location=(tmp_path / "art").as_uri())
    params = dict(
        dataset="synthetic", train_size=str(TINY.train_size), batch_size=str(TINY.batch_size),
        workers_list="0,1", device="cpu", epochs="1",
    )  # fmt: skip
    command = [sys.executable, "-m", "mlflow", "run", str(root), "-e", "sweep-workers",
               "--env-manager", "local", "--experiment-name", "via-mlflow-run"]  # fmt: skip
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "C3: epoch times per DataLoader worker count" in done.stdout
    parent, children = parent_and_children(client)
    assert parent.data.tags["cifarexp.command"] == "sweep-workers"
    # what mlflow run logged agrees with cifarexp: the counts, no base worker count
    assert parent.data.params["workers_list"] == "0,1" and "workers" not in parent.data.params
    assert not any(k.startswith("cifarexp.resolved.") for k in parent.data.tags)
    assert [c.data.tags["cifarexp.variant"] for c in children] == ["workers=0", "workers=1"]
    assert not (root / "mlruns").exists()
