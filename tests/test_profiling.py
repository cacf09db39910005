"""--profile: the trace, the summary, the split and the verdict of a run, and its timed
epochs left alone; the split and the verdict on constructed cases."""

import gzip
import json
import time
from pathlib import Path

import pytest
import torch
from torchvision import transforms

from benchmarks.fake_runs import log_run
from cifarexp import tracking
from cifarexp.training import build, data, engine, profiling
from cifarexp.training.profiling import (
    ACTIVE_STEPS,
    INPUT_BOUND_SHARE,
    WARMUP_STEPS,
    step_split,
    verdict,
)
from tests.conftest import TINY, all_runs


def args(images: int = 4, epochs: int = 2) -> list[str]:
    """A tiny CPU run of batches of 2 images (by default two epochs of two batches: the
    cheapest run with an epoch before its last), data in memory, no workers."""
    return ["--dataset", "synthetic", "--train-size", str(images), "--batch-size", "2",
            "--workers", "0", "--epochs", str(epochs), "--device", "cpu"]  # fmt: skip


SHARES = [f"profile_{part}_share" for part in ("data_wait", "compute")]  # what a CPU run has


def test_a_profiled_run_logs_its_profile_after_its_timed_epochs_which_it_leaves_alone(
    cli, client, monkeypatch, after_each_epoch
):
    # Given a record of each training step (was the profiler on?) and of each logged epoch
    seen = []
    train_step = engine.train_step

    def recorded_step(*args, **kwargs):
        seen.append(torch._C._autograd._profiler_enabled())
        return train_step(*args, **kwargs)

    monkeypatch.setattr(build, "train_step", recorded_step)  # the step a run is built with
    after_each_epoch(lambda result: seen.append(f"epoch {result.epoch}"))
    # When a tiny run (data in memory, no workers) is profiled
    result = cli("time", *args(), "--profile", "--run-name", "profiled")
    assert result.exit_code == 0, result.output
    # Then the timed epochs ran without the profiler; the window came after the last epoch
    assert (
        seen
        == [False, False, "epoch 1", False, False, "epoch 2"]
        + [False] * WARMUP_STEPS
        + [True] * ACTIVE_STEPS
    )
    [run] = all_runs(client)
    run_id, metrics, tags = run.info.run_id, run.data.metrics, run.data.tags
    # the trace: gzipped Chrome JSON with the operators of the recorded steps
    trace = Path(client.download_artifacts(run_id, profiling.TRACE))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("cat") == "cpu_op" and e["name"].startswith("aten::conv") for e in events)
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == ACTIVE_STEPS
    # the summary table, in the store and on the terminal
    summary = Path(client.download_artifacts(run_id, profiling.SUMMARY)).read_text()
    assert summary.splitlines()[0] == "by,name,calls,ms per step,of step %"
    assert "\nhost,aten::" in summary
    assert f"profile: {ACTIVE_STEPS} recorded steps" in result.output
    # the split: shares between 0 and 1 adding up to 1; its cost
    assert set(SHARES) <= set(metrics)
    assert all(0 <= metrics[name] <= 1 for name in SHARES)
    assert sum(metrics[name] for name in SHARES) == pytest.approx(1)
    assert metrics["profile_s"] > 0
    # the verdict: not input-bound, as a tag, on the terminal and in the description
    assert tags[tracking.VERDICT].startswith("compute-bound: the CPU computed")
    shown = " ".join(result.output.split())
    assert f"Profile: {tags[tracking.VERDICT]}." in shown  # once: the end of the answer
    assert shown.count(tags[tracking.VERDICT]) == 1
    note = tags["mlflow.note.content"]  # the answer first, then the profile
    assert note.startswith("**Where does the time") and "\n\n**Profile**" in note
    assert tags[tracking.VERDICT] in tags["mlflow.note.content"]

    # And the same run without --profile logged the same epochs
    assert cli("time", *args(), "--quiet", "--run-name", "plain").exit_code == 0
    plain = next(r for r in all_runs(client) if r.info.run_name == "plain")

    # (system/* metrics are sampled once a second: a short run may end before the first.)
    def trained(keys):
        return {k for k in keys if not k.startswith("system/")}

    assert trained(metrics) - trained(plain.data.metrics) == {*SHARES, "profile_s"}
    for name in ("train_loss", "train_acc", "images_per_s", "epoch_time_s"):
        ours, theirs = (
            [m.step for m in client.get_metric_history(r, name)]
            for r in (run_id, plain.info.run_id)
        )
        assert ours == theirs == [1, 2], name
    for name in ("train_loss", "train_acc"):
        ours, theirs = (
            [m.value for m in client.get_metric_history(r, name)]
            for r in (run_id, plain.info.run_id)
        )
        assert ours == pytest.approx(theirs), name
    assert tracking.VERDICT not in plain.data.tags


def test_a_run_whose_transform_sleeps_is_input_bound_and_told_the_sweeps_best(
    cli, client, monkeypatch
):
    # Given a data set whose every image takes 0.3 s to transform, and a C3 sweep that found
    # 4 workers best on this device
    study = data.train_transform

    def slow(image):
        time.sleep(0.3)
        return image

    monkeypatch.setattr(data, "train_transform", lambda: transforms.Compose([slow, study()]))
    experiment = client.create_experiment("sweeps")
    sweep = log_run(client, experiment, command="sweep-workers", exercise="C3", device="cpu",
                    metrics={"best_workers": 4})  # fmt: skip
    # When one batch of it trains for an epoch with 0 workers, profiled
    result = cli("time", *args(images=2, epochs=1), "--quiet", "--profile")
    assert result.exit_code == 0, result.output
    # Then it is input-bound, and told to try the sweep's count (--quiet prints that too)
    run = next(r for r in all_runs(client) if r.info.run_id != sweep)
    assert run.data.metrics["profile_data_wait_share"] >= INPUT_BOUND_SHARE
    text = run.data.tags[tracking.VERDICT]
    assert text.startswith("input-bound: the CPU waited") and "(0 workers)" in text
    assert f"(run {sweep}) found 4 workers best: try --workers 4" in text
    assert "Profile: input-bound: the CPU waited" in " ".join(result.output.split())
    summary = Path(client.download_artifacts(run.info.run_id, profiling.SUMMARY)).read_text()
    host_rows = [line for line in summary.splitlines() if line.startswith("host,")]
    assert any(row.startswith("host,enumerate(DataLoader)") for row in host_rows)


def _event(name, ts, dur, cat="cpu_op"):
    return {"name": name, "cat": cat, "ts": ts, "dur": dur}


def test_the_split_of_a_gpu_trace_follows_the_device_timeline():
    # Given two recorded steps on a GPU under torchrun (µs): the host waits for batches, the
    # device copies, computes (the second step's kernels running past the host's step) and
    # all-reduces, partly beside compute
    events = [
        _event("ProfilerStep#2", 0, 100, "user_annotation"),
        _event("ProfilerStep#3", 100, 100, "user_annotation"),
        _event(profiling.DATA_WAIT, 0, 30, "user_annotation"),
        _event(profiling.DATA_WAIT, 100, 10, "user_annotation"),
        _event("Memcpy HtoD", 30, 5, "gpu_memcpy"),
        _event("Memcpy HtoD", 120, 5, "gpu_memcpy"),
        _event("cudnn_conv", 40, 50, "kernel"),
        _event("ncclDevKernel_AllReduce", 85, 15, "kernel"),  # 5 hidden, 10 exposed
        _event("cudnn_conv", 150, 60, "kernel"),
        _event("aten::conv2d", 40, 20),  # host work: no part of the device's timeline
    ]
    # When it is split
    split, window_us = step_split(events, "cuda", comm=True)
    # Then each instant of the 210 µs counts once, by what the device did
    assert window_us == 210
    assert split == pytest.approx(
        {
            "data_wait": 40 / 210,
            "host": 40 / 210,
            "copy": 10 / 210,
            "comm": 10 / 210,
            "compute": 110 / 210,
        }  # fmt: skip
    )
    # and on one GPU communication is not a part
    assert set(step_split(events, "cuda")[0]) == {"data_wait", "host", "copy", "compute"}


@pytest.mark.parametrize(
    ("split", "device", "cfg", "expected"),
    [
        ({"data_wait": 0.6, "host": 0.1, "copy": 0.02, "compute": 0.28}, "cuda", TINY,
         "input-bound: the GPU waited 60% of each step for the next batch (0 workers); the C3 "
         "sweep on this machine (run abc) found 4 workers best: try --workers 4"),
        ({"data_wait": 0.3, "host": 0.1, "copy": 0.0, "compute": 0.6}, "cuda",
         TINY.replace(workers=4), "input-bound: the GPU waited 30% of each step for the next "
         "batch (4 workers); 4 workers is the C3 sweep's best: try --persistent-workers "
         "--pin-memory, or --loader gpu (the data kept on the device)"),
        ({"data_wait": 0.05, "host": 0.5, "copy": 0.05, "compute": 0.4}, "cuda", TINY,
         "host-launch-bound: the GPU waited 50% of each step for the host's launches (it "
         "computed 40%); try --cuda-graph with --timing events (the whole step launched at "
         "once; or --compile reduce-overhead)"),
        ({"data_wait": 0.0, "host": 0.1, "copy": 0.0, "compute": 0.9}, "cuda",
         TINY.replace(loader="gpu", precision="bf16", channels_last=True, cuda_graph=True),
         "compute-bound: the GPU computed 90% of each step (data wait 0%); the kernels bound "
         "the step"),
        ({"data_wait": 0.05, "host": 0.5, "copy": 0.05, "compute": 0.4}, "cuda",
         TINY.replace(optimizer="adam"), "host-launch-bound: the GPU waited 50% of each step "
         "for the host's launches (it computed 40%); try --compile reduce-overhead with "
         "--timing events"),  # --cuda-graph captures sgd and nesterov only
        ({"data_wait": 0.25, "host": 0.35, "copy": 0.0, "compute": 0.4}, "cuda", TINY,
         "host-launch-bound: the GPU waited 35% of each step"),  # the largest bound wins
        ({"data_wait": 0.0, "host": 0.1, "copy": 0.0, "comm": 0.3, "compute": 0.6}, "cuda", TINY,
         "communication-bound: the GPUs waited 30% of each step for gradients all-reduced"),
        ({"data_wait": 0.05, "host": 0.1, "copy": 0.05, "compute": 0.8}, "cuda", TINY,
         "compute-bound: the GPU computed 80% of each step (data wait 5%); try --precision bf16 "
         "--channels-last (tensor cores)"),
        ({"data_wait": INPUT_BOUND_SHARE * 0.99, "compute": 1 - INPUT_BOUND_SHARE * 0.99}, "cpu",
         TINY, "compute-bound: the CPU computed 80% of each step (data wait 20%); try a GPU"),
        ({"data_wait": INPUT_BOUND_SHARE, "compute": 1 - INPUT_BOUND_SHARE}, "cpu", TINY,
         "input-bound: the CPU waited 20% of each step for the next batch (0 workers); no C3 "
         "sweep on cpu in this store yet: run `cifarexp sweep-workers`"),
    ],
)  # fmt: skip
def test_the_verdict_names_what_bounds_the_step_and_what_to_try(split, device, cfg, expected):
    best = (4, "abc") if device == "cuda" else None
    assert verdict(split, cfg, device, best).startswith(expected)
