from pathlib import Path

import torch

from cifarexp.training.build import Training
from tests.conftest import TINY, TINY_ARGS, all_runs, without

METRICS = {"data_time_s", "train_time_s", "epoch_time_s", "train_loss", "train_acc", "images_per_s"}


def test_time_logs_params_tags_one_point_per_epoch_and_the_summary(cli, client):
    result = cli("time", *TINY_ARGS, "--run-name", "tiny")
    assert result.exit_code == 0, result.output
    assert "data-loading s" in result.output and "total" in result.output
    # the one-sentence answer that the run's description holds, after the table
    [run] = all_runs(client)
    assert "An epoch took" in result.output
    assert run.data.tags["mlflow.note.content"].split("\n\n")[1] in " ".join(result.output.split())

    [run] = all_runs(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "cifarexp-time"
    params = run.data.params
    assert params["epochs"] == "2" and params["optimizer"] == "sgd"
    assert params["dataset"] == "synthetic" and params["workers"] == "0"
    tags = run.data.tags
    assert tags["cifarexp.command"] == "time" and tags["cifarexp.exercise"] == "C2"
    assert tags["cifarexp.dataset"] == "synthetic" and tags["cifarexp.device"] == "cpu"
    assert {
        "cifarexp.torch_version",
        "cifarexp.device_name",
        "cifarexp.cpu_count",
    } <= set(tags)
    assert ("cifarexp.torch_cuda_build" in tags) == (torch.version.cuda is not None)
    for name in METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    acc = client.get_metric_history(run.info.run_id, "train_acc")
    assert all(0 <= m.value <= 1 for m in acc)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "model_summary.txt" in artifacts
    summary = client.download_artifacts(run.info.run_id, "model_summary.txt")
    assert "Total params: 11,173,962" in Path(summary).read_text()


def test_params_say_what_ran_the_resolved_device_and_no_test_size_without_eval(cli, client):
    result = cli("time", *without("--device", TINY_ARGS), "--epochs", "1")  # device auto
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    params = run.data.params
    assert params["device"] == run.data.tags["cifarexp.device"] == "cpu"  # not "auto"
    assert params["device_requested"] == "auto"  # what was asked, beside it
    assert params["eval"] == "False" and "test_size" not in params


def test_eval_logs_test_metrics(cli, client):
    result = cli("time", *TINY_ARGS, "--epochs", "1", "--eval")
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    assert {"test_loss", "test_acc"} <= set(run.data.metrics)
    assert run.data.params["test_size"] == str(TINY.test_size)  # logged where evaluation is on


def test_experiment_option_and_env_tracking_uri(cli, client, store):
    result = cli("time", *TINY_ARGS, "--epochs", "1", "--experiment", "mine")
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    assert client.get_experiment(run.info.experiment_id).name == "mine"


def test_interrupt_after_epoch_one_ends_killed_with_epoch_one_kept(cli, client, after_each_epoch):
    def interrupt(result):
        raise KeyboardInterrupt

    after_each_epoch(interrupt)
    result = cli("time", *TINY_ARGS, "--epochs", "3")
    assert result.exit_code == 130
    [run] = all_runs(client)
    assert run.info.status == "KILLED"
    history = client.get_metric_history(run.info.run_id, "epoch_time_s")
    assert [m.step for m in history] == [1]


def test_a_crash_ends_failed_with_the_error_recorded(cli, client, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("worker died")

    monkeypatch.setattr(Training, "train", crash)
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError), result.output
    [run] = all_runs(client)
    assert run.info.status == "FAILED"
    assert "worker died" in run.data.tags["cifarexp.error"]


def test_off_a_terminal_each_epoch_and_each_variant_is_one_line(cli, store):
    args = [a for a in TINY_ARGS if a != "--quiet"]
    result = cli("time", *args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2  data ")
    assert all(word in lines[1] for word in ("train ", "total ", "loss ", "acc ")), lines
    result = cli("compare-optim", *args, "--optimizers", "sgd")
    assert result.exit_code == 0, result.output
    assert "optimizer=sgd  epoch 2/2  data " in result.output
    assert "optimizer=sgd: 2 epochs in " in result.output


def test_a_batch_other_than_the_studys_without_lr_says_the_lr_of_the_same_step(cli, store):
    # Given the study's lr (0.1 for batch 128), when a run trains batches of 4 without --lr,
    # then it says which lr takes the same step per image; with --lr it says nothing.
    notice = "lr 0.1 is the study's for batch 128; at --batch-size 4 the same step per image "
    notice += "is --lr 0.003125."
    without_lr, with_lr = cli("time", *TINY_ARGS), cli("time", *TINY_ARGS, "--lr", "0.1")
    assert without_lr.exit_code == with_lr.exit_code == 0, (without_lr.output, with_lr.output)
    assert notice in " ".join(without_lr.output.split())
    assert "same step per image" not in with_lr.output
