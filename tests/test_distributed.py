"""Several processes through torchrun, on CPU with gloo: one MLflow run from rank 0,
disjoint shards, the same maths as one process, a crash on one rank ends the run FAILED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifarexp import processes
from cifarexp.study import runs
from cifarexp.study.catalogue import Labels
from cifarexp.study.session import Session
from cifarexp.tracking import Tracker
from cifarexp.training.build import train_loader
from cifarexp.training.data import load_split
from cifarexp.training.distributed import COMM_BUDGET, Combiner, World
from cifarexp.training.engine import EpochResult, Execution
from tests import ddp_entry
from tests.conftest import TINY, TINY_ARGS, all_runs, one_message, without
from tests.processes import (
    free_port,
    processes_in,
    start_cifarexp,
    wait_for_epoch,
    wait_until_gone,
)

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"data_time_s", "train_time_s", "epoch_time_s", "train_loss", "train_acc"}


def torchrun(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240):
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`, finished."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *args]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


def test_time_under_torchrun_logs_one_run_from_rank_0(client, tmp_path):
    # 10 steps of 2 images per rank and epoch: the 20 steps of 2 epochs afford a pair of
    # comm passes (COMM_BUDGET), measured after epoch 2
    args = [*without("--batch-size", without("--train-size")), "--batch-size", "2"]
    args += ["--train-size", "40"]
    done = torchrun("-m", "cifarexp", "time", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    [run] = all_runs(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["world_size"], params["backend"], params["scaling"]) == ("2", "gloo", "weak")
    assert params["batch_size"] == "2"
    for name in METRICS:  # one point per epoch: rank 0 alone logged
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    [comm] = client.get_metric_history(run.info.run_id, "comm_time_s")
    assert comm.step == 2 and comm.value >= 0
    # weak scaling: each rank trains 20 of the 40 images, so an epoch covers all 40
    rate = client.get_metric_history(run.info.run_id, "images_per_s")[0].value
    epoch = client.get_metric_history(run.info.run_id, "epoch_time_s")[0].value
    assert rate * epoch == pytest.approx(40)


def test_each_rank_trains_a_disjoint_shard_reshuffled_every_epoch():
    # Given the training loaders of ranks 0 and 1 of two, as each rank builds its own,
    cfg = TINY.replace(train_size=16)
    train_set = load_split(cfg, train=True)
    loaders = [
        train_loader(cfg, World(r, 2, "gloo"), train_set, torch.device("cpu")) for r in (0, 1)
    ]

    # when each is iterated for two epochs,
    def shards(loader) -> list[list[int]]:
        epochs = []
        for _ in range(2):
            iter(loader)  # one epoch: reshuffles the shard
            epochs.append(list(loader.sampler))
        return epochs

    rank0, rank1 = (shards(loader) for loader in loaders)

    # then in each epoch the two shards split the set between them,
    for mine, theirs in zip(rank0, rank1, strict=True):
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == list(range(16))
    assert rank0[0] != rank0[1]  # and set_epoch draws a new shuffle each epoch


def test_two_ranks_train_as_one_process_with_the_global_batch_until_rank_1_crashes(
    client, tmp_path
):
    # Given two ranks training the BN-free model on 8 images with strong scaling (4 each),
    # rank 1 crashing as epoch CRASH_EPOCH starts,
    done = torchrun("-m", "tests.ddp_entry", cwd=tmp_path)

    # then the job fails naming the crash, and the one run (rank 0's) ends FAILED with the
    # error, its finished epochs kept,
    assert done.returncode != 0
    assert "rank 1 crashed" in done.stdout + done.stderr
    [ddp] = all_runs(client)
    assert ddp.info.status == "FAILED", done.stdout + done.stderr
    assert "cifarexp.error" in ddp.data.tags
    assert (ddp.data.params["world_size"], ddp.data.params["scaling"]) == ("2", "strong")

    # and those epochs are one process's with the global batch. Epoch 1: the same weights
    # on the same 8 augmented images. Epoch 2: after one step whose gradient DDP averaged
    # over the two halves, i.e. the mean over all 8.
    finished = ddp_entry.STRONG.replace(epochs=ddp_entry.CRASH_EPOCH - 1)
    session = Session(Tracker.open(None), experiment="one")
    single = runs.run_training(finished, Labels("time", "C2"), session)
    for name in ("train_loss", "train_acc"):
        history = client.get_metric_history(ddp.info.run_id, name)
        expected = [getattr(r, name) for r in single.results]
        assert [m.value for m in history] == pytest.approx(expected, rel=1e-5), name
    assert single.results[0].train_loss != single.results[1].train_loss  # it did learn


def test_nproc_relaunches_the_same_command_through_torch_distributed_run(cli, monkeypatch):
    launched = []

    def execv(path, argv):  # the real one replaces this process and never returns
        launched.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(processes.os, "execv", execv)
    argv = ["cifarexp", "time", *TINY_ARGS, "--nproc", "2", "--scaling", "strong"]
    monkeypatch.setattr(sys, "argv", argv)
    result = cli("time", *TINY_ARGS, "--nproc", "2", "--scaling", "strong")
    assert result.exit_code == 0, result.output
    [command] = launched
    assert command[1:] == [
        "-m", "cifarexp.torchrun", "--standalone", "--nproc-per-node=2",
        "-m", "cifarexp", "time", *TINY_ARGS, "--scaling", "strong",
    ]  # fmt: skip


def test_comparisons_refuse_torchrun_with_one_line(cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli("no-bn", *TINY_ARGS)
    assert result.exit_code == 2
    assert "does not run under torchrun" in result.output


def test_compare_device_gpus_runs_each_count_as_a_child_and_tabulates_scaling(cli, client):
    # CPU processes stand in for GPUs (gloo): 1 process alone, then 2 under torchrun
    args = [*without("--device"), "--devices", "cpu", "--gpus", "1,2", "--scaling", "strong"]
    result = cli("compare-device", *args)
    assert result.exit_code == 0, result.output
    assert "data-parallel scaling" in result.output and "gpus=1,2" in result.output
    assert "Incomplete" not in result.output  # a variant's name holds a comma
    runs = {r.data.tags.get("cifarexp.variant", ""): r for r in all_runs(client)}
    parent = runs.pop("")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cifarexp.exercise"] == "C5-scaling"
    assert set(runs) == {"gpus=1", "gpus=2,scaling=strong"}
    for child in runs.values():
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.experiment_id == parent.info.experiment_id
    ddp = runs["gpus=2,scaling=strong"].data.params
    assert (ddp["world_size"], ddp["scaling"]) == ("2", "strong")
    assert ddp["batch_size"] == str(TINY.batch_size)
    assert "world_size" not in runs["gpus=1"].data.params  # the baseline: no DDP
    assert "strong_scaling_efficiency" in parent.data.metrics


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "2,4", "--devices", "cpu"], "include 1"),
        (["--gpus", "1,2", "--devices", "cpu,cuda"], "one device"),
        (["--gpus", "1,2", "--devices", "cuda:1"], "cuda or cpu"),
        (["--gpus", "1,3", "--devices", "cpu"], "does not split over 3"),
        (["--gpus", "1,2", "--devices", "cpu", "--scaling", "wide"], "unknown 'wide'"),
    ],
)
def test_compare_device_gpus_rejects_bad_counts_with_one_line(cli, client, args, message):
    result = cli("compare-device", *without("--device"), *args)
    assert result.exit_code == 2
    assert message in one_message(result.output)
    assert all_runs(client) == []


@pytest.mark.parametrize(
    ("stop", "code", "parent"),
    [
        (signal.SIGTERM, 128 + signal.SIGTERM, "KILLED"),
        # Killed outright, the parent cannot end its own run; its torchrun job still stops.
        (signal.SIGKILL, -signal.SIGKILL, "RUNNING"),
    ],
)
def test_stopping_compare_device_gpus_stops_its_torchrun_job_and_its_run(
    client, tmp_path, stop, code, parent
):
    # 8 steps an epoch: the 1-process baseline is over in seconds; the 2-process child, 4
    # steps a rank, is stopped in the 3 epochs it has left after its first (about a second each)
    args = [*without("--device", without("--epochs", without("--train-size"))), "--epochs", "4"]
    args += ["--train-size", str(8 * TINY.batch_size), "--devices", "cpu"]
    process = start_cifarexp("compare-device", *args, "--gpus", "1,2", "--scaling", "weak",
                             cwd=tmp_path)  # fmt: skip
    try:
        wait_for_epoch(client, process, timeout=240, variant="gpus=2,scaling=weak")
        os.kill(process.pid, stop)  # this process alone, not its torchrun job
        assert process.wait(timeout=120) == code, process.log()
        assert wait_until_gone(tmp_path, timeout=60) == [], process.log()  # nothing is left
        assert "Traceback" not in process.log()  # torchrun's agent, stopped, printed one
    finally:
        process.stop()
        for pid in processes_in(tmp_path):
            os.kill(pid, signal.SIGKILL)

    status = {r.data.tags.get("cifarexp.variant", ""): r.info.status for r in all_runs(client)}
    assert status == {"": parent, "gpus=1": "FINISHED", "gpus=2,scaling=weak": "KILLED"}


@pytest.fixture
def group_of_one():
    """A gloo process group of this process alone, left after the test."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield World(0, 1, "gloo")
    dist.destroy_process_group()


@pytest.mark.parametrize(("steps", "epochs"), [(391, 3), (25, 4), (5, 6), (2, 3)])
def test_measuring_comm_time_costs_at_most_a_tenth_of_the_steps_trained(
    group_of_one, steps, epochs
):
    # Given a model under DDP and epochs of `steps` steps each,
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    combiner = Combiner(
        group_of_one, DistributedDataParallel(model), torch.device("cpu"), Execution(),
        batch_size=2, steps_per_epoch=steps,
    )  # fmt: skip
    logged = []
    for epoch in range(1, epochs + 1):
        result = EpochResult(epoch, 0.1, 0.8, 1.0, 2.0, 0.5, images=2 * steps)
        logged.append(combiner(result).comm_time_s)
        # then the passes made never exceed a tenth of the steps trained so far,
        assert combiner.passes <= COMM_BUDGET * steps * epoch
    # and every epoch once a pair has been afforded has an estimate (none before).
    first = next((i for i, value in enumerate(logged) if value is not None), len(logged))
    assert all(value is not None and value >= 0 for value in logged[first:])
    assert combiner.passes == 2 * len(combiner.differences)
    assert (first < epochs) == (COMM_BUDGET * steps * epochs >= 2)


def test_an_epoch_cut_short_logs_its_comm_time_and_the_whole_epochs_scaled_as_its_time():
    # Given an epoch cut short after 1 s, estimated at 4 s whole, whose steps' all-reduce
    # left 0.2 s unhidden,
    result = EpochResult(
        1, 0.1, 0.8, 1.0, 2.0, 0.5, images=8, estimated_epoch_s=4.0, comm_time_s=0.2
    )
    # when its metrics are logged,
    metrics = result.metrics()
    # then the 0.2 s are its partial_comm_s, and comm_time_s is the whole epoch's, beside its
    # epoch_time_s.
    assert metrics["partial_comm_s"] == pytest.approx(0.2)
    assert metrics["comm_time_s"] == pytest.approx(0.8)
    assert metrics["epoch_time_s"] == pytest.approx(4.0)
