"""--profile: the trace, the summary, the split and the verdict of a run, and its timed
epochs left alone; the verdict weighing the epochs' wait for data with the window; the
split, the kernel classes and the verdict on constructed cases."""

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
    Epochs,
    kernel_classes,
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
STEP_S = 0.1  # a step made this much slower: a batch in memory is ready long before it ends
IMAGE_S = 0.25  # an image made this much slower to load: 0.5 s a batch, several steps' time


def epochs_data_share(client, run_id) -> float:
    """The run's epochs' data-loading share, from the store: C2.1 over C2.3, summed."""
    history = tracking.metric_history(run_id, ["data_time_s", "epoch_time_s"])
    return history["data_time_s"].sum() / history["epoch_time_s"].sum()


@pytest.fixture
def slow_images(monkeypatch):
    """Every training image takes IMAGE_S to transform while `slow["images"]` is true."""
    slow = {"images": True}
    study = data.train_transform

    def sleep(image):
        if slow["images"]:
            time.sleep(IMAGE_S)
        return image

    monkeypatch.setattr(data, "train_transform", lambda: transforms.Compose([sleep, study()]))
    return slow


def test_a_profiled_run_logs_its_profile_after_its_timed_epochs_which_it_leaves_alone(
    cli, client, monkeypatch, after_each_epoch
):
    # Given a record of each training step (was the profiler on?) and of each logged epoch,
    # and steps STEP_S slower, so that a batch in memory is ready long before one ends
    seen = []
    train_step = engine.train_step

    def recorded_step(*args, **kwargs):
        seen.append(torch._C._autograd._profiler_enabled())
        time.sleep(STEP_S)
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
    # the verdict: not input-bound (its epochs barely waited), naming both sources, as a tag,
    # on the terminal and in the description; no kineto line on the terminal
    assert epochs_data_share(client, run_id) < INPUT_BOUND_SHARE
    assert tags[tracking.VERDICT].startswith(
        "compute-bound: in the profiled steps the CPU computed"
    )
    assert "; the epochs waited " in tags[tracking.VERDICT]
    assert "Profiler clears events" not in result.output
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
    cli, client, slow_images
):
    # Given a data set whose every image takes IMAGE_S to transform (a batch of two: several
    # times a step), and a C3 sweep that found 4 workers best on this device
    experiment = client.create_experiment("sweeps")
    sweep = log_run(client, experiment, command="sweep-workers", exercise="C3", device="cpu",
                    metrics={"best_workers": 4})  # fmt: skip
    # When one batch of it trains for an epoch with 0 workers, profiled
    result = cli("time", *args(images=2, epochs=1), "--quiet", "--profile")
    assert result.exit_code == 0, result.output
    # Then its epoch and its profiled steps waited for data, and it is input-bound, told to
    # try the sweep's count (--quiet prints that too)
    run = next(r for r in all_runs(client) if r.info.run_id != sweep)
    assert epochs_data_share(client, run.info.run_id) >= INPUT_BOUND_SHARE
    assert run.data.metrics["profile_data_wait_share"] >= INPUT_BOUND_SHARE
    text = run.data.tags[tracking.VERDICT]
    assert text.startswith("input-bound: the epochs waited") and "(0 workers)" in text
    assert "; in the profiled steps the CPU computed" in text and "were ready" not in text
    assert f"(run {sweep}) found 4 workers best: try --workers 4" in text
    assert "Profile: input-bound: the epochs waited" in " ".join(result.output.split())
    summary = Path(client.download_artifacts(run.info.run_id, profiling.SUMMARY)).read_text()
    host_rows = [line for line in summary.splitlines() if line.startswith("host,")]
    assert any(row.startswith("host,enumerate(DataLoader)") for row in host_rows)


def test_a_run_whose_epochs_waited_is_input_bound_though_its_profiled_steps_did_not(
    cli, client, monkeypatch, slow_images, after_each_epoch
):
    # Given images slow to load during the timed epochs only, and steps slow after them
    # (the profile's window finds every batch ready, as a prefetching loader's would be)
    slow_step = {"on": False}
    train_step = engine.train_step

    def step(*args, **kwargs):
        if slow_step["on"]:
            time.sleep(STEP_S)
        return train_step(*args, **kwargs)

    def after_the_epochs(result):
        slow_images["images"], slow_step["on"] = False, True

    monkeypatch.setattr(build, "train_step", step)
    after_each_epoch(after_the_epochs)  # one epoch: its end is the last
    # When one batch trains for an epoch, profiled
    result = cli("time", *args(images=2, epochs=1), "--quiet", "--profile")
    assert result.exit_code == 0, result.output
    # Then the epoch waited, the window did not, and the verdict follows the epochs, saying so
    [run] = all_runs(client)
    assert epochs_data_share(client, run.info.run_id) >= INPUT_BOUND_SHARE
    assert run.data.metrics["profile_data_wait_share"] < INPUT_BOUND_SHARE
    text = run.data.tags[tracking.VERDICT]
    assert text.startswith("input-bound: the epochs waited") and "(0 workers)" in text
    assert "; in the profiled steps the CPU computed" in text
    assert ": its batches were ready, the epochs' were not;" in text


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


GPU_STEP = {"data_wait": 0.05, "host": 0.5, "copy": 0.05, "compute": 0.4}  # host-launch-bound
FAST = TINY.replace(
    loader="gpu", precision="bf16", channels_last=True, compile="default", cuda_graph=True
)


@pytest.mark.parametrize(
    ("split", "device", "cfg", "epochs", "expected"),
    [
        # input-bound: from the epochs where they are known, else from the window
        ({"data_wait": 0.05, "host": 0.7, "copy": 0.02, "compute": 0.23}, "cuda",
         TINY.replace(workers=2), Epochs(0.39),
         "input-bound: the epochs waited 39% of their time for data (2 workers); in the "
         "profiled steps the GPU computed 23%, waited 70% for the host's launches, 2% for "
         "copies, 5% for data: its batches were ready, the epochs' were not; the C3 sweep on "
         "this machine (run abc) found 4 workers best: try --workers 4"),
        ({"data_wait": 0.6, "host": 0.1, "copy": 0.02, "compute": 0.28}, "cuda", TINY, None,
         "input-bound: in the profiled steps the GPU computed 28%, waited 10% for the host's "
         "launches, 2% for copies, 60% for data; the C3 sweep on this machine (run abc) found "
         "4 workers best: try --workers 4"),
        ({"data_wait": 0.3, "host": 0.1, "copy": 0.0, "compute": 0.6}, "cuda",
         TINY.replace(workers=4), Epochs(0.3), "input-bound: the epochs waited 30% of their "
         "time for data (4 workers); in the profiled steps the GPU computed 60%, waited 10% "
         "for the host's launches, 0% for copies, 30% for data; 4 workers is the C3 sweep's "
         "best: try --persistent-workers --pin-memory, or --loader gpu (the data kept on the "
         "device)"),
        # the step's own bounds, the epochs' wait beside them
        (GPU_STEP, "cuda", TINY, Epochs(0.03),
         "host-launch-bound: in the profiled steps the GPU computed 40%, waited 50% for the "
         "host's launches, 5% for copies, 5% for data; the epochs waited 3% of their time for "
         "data (0 workers); try `cifarexp time --fast` (--loader gpu --precision bf16 "
         "--channels-last --compile default --cuda-graph --timing events; the fast path with it "
         "took 0.94 s per epoch on an H200, the standard path 5.36 s)"),
        (GPU_STEP, "cuda", TINY.replace(optimizer="adam"), Epochs(0.03),
         "host-launch-bound: in the profiled steps the GPU computed 40%, waited 50% for the "
         "host's launches, 5% for copies, 5% for data; the epochs waited 3% of their time for "
         "data (0 workers); try `cifarexp time --fast` (--loader gpu --precision bf16 "
         "--channels-last --compile reduce-overhead --timing events; the fast path with it took "
         "1.52 s per epoch on an H200)"),
        # one setting short of --fast: that setting
        (GPU_STEP, "cuda", FAST, Epochs(0.0),
         "host-launch-bound: in the profiled steps the GPU computed 40%, waited 50% for the "
         "host's launches, 5% for copies, 5% for data; the epochs waited 0% of their time for "
         "data (batches made on the device); try --timing events (no wait for the device after "
         "each step)"),
        ({"data_wait": 0.25, "host": 0.35, "copy": 0.0, "compute": 0.4}, "cuda", TINY,
         Epochs(0.02), "host-launch-bound: in the profiled steps the GPU computed 40%, waited "
         "35% for the host's launches, 0% for copies, 25% for data: the window waited, having "
         "started its loader again; the epochs waited 2%"),
        ({"data_wait": 0.0, "host": 0.1, "copy": 0.0, "comm": 0.3, "compute": 0.6}, "cuda", TINY,
         Epochs(0.0), "communication-bound: in the profiled steps the GPU computed 60%, waited "
         "10% for the host's launches, 0% for copies, 30% for communication, 0% for data"),
        ({"data_wait": 0.05, "host": 0.1, "copy": 0.05, "compute": 0.8}, "cuda", TINY,
         Epochs(0.05), "compute-bound: in the profiled steps the GPU computed 80%, waited 10% "
         "for the host's launches, 5% for copies, 5% for data; the epochs waited 5% of their "
         "time for data (0 workers); try `cifarexp time --fast` (--loader gpu --precision bf16 "
         "--channels-last --compile default --cuda-graph --timing events; the fast path with it "
         "took 0.94 s per epoch on an H200"),
        ({"data_wait": 0.0, "host": 0.1, "copy": 0.0, "compute": 0.9}, "cuda", FAST, Epochs(0.0),
         "compute-bound: in the profiled steps the GPU computed 90%, waited 10% for the host's "
         "launches, 0% for copies, 0% for data; the epochs waited 0% of their time for data "
         f"(batches made on the device); try a larger --batch-size than {TINY.batch_size} (on "
         "an H200 the whole step took 2.06 ms per 128 images at batch 512"),
        # on a CPU
        ({"data_wait": 0.0, "compute": 1.0}, "cpu", TINY, Epochs(INPUT_BOUND_SHARE * 0.99),
         "compute-bound: in the profiled steps the CPU computed 100%, waited 0% for data; the "
         "epochs waited 20% of their time for data (0 workers); try a GPU"),
        ({"data_wait": 0.0, "compute": 1.0}, "cpu", TINY, Epochs(INPUT_BOUND_SHARE),
         "input-bound: the epochs waited 20% of their time for data (0 workers); in the "
         "profiled steps the CPU computed 100%, waited 0% for data: its batches were ready, the "
         "epochs' were not; no C3 sweep on cpu in this store yet: run `cifarexp sweep-workers`"),
    ],
)  # fmt: skip
def test_the_verdict_names_what_bounds_the_run_its_sources_and_what_to_try(
    split, device, cfg, epochs, expected
):
    best = (4, "abc") if device == "cuda" else None
    assert verdict(split, cfg, device, best, epochs=epochs).startswith(expected)


def test_a_compute_bound_step_says_where_its_kernel_time_went_and_what_its_epochs_used():
    # Given the fast path's profiled kernels (names as cuDNN, PyTorch and Triton give them,
    # µs of device time) and epochs that used 300 J each at 250 W
    events = [
        {"cat": "kernel", "name": name, "dur": us}
        for name, us in [
            ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 250),
            ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 200),
            ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 250),
            ("cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>", 80),
            ("void at::native::batch_norm_backward_kernel<float>", 40),
            ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>", 100),
            ("void at::native::multi_tensor_apply_kernel<FusedSgdMathFunctor<float>>", 30),
            ("void at::native::reduce_kernel<512, 1>", 40),
            ("triton_poi_fused__to_copy_convert_element_type_0", 10),  # a cast: no convolution
        ]
    ] + [
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)", "dur": 500},
        {"cat": "gpu_user_annotation", "name": "ProfilerStep#2", "dur": 1000},  # spans kernels
        {"cat": "cpu_op", "name": "aten::add_", "dur": 7},
    ]  # fmt: skip
    kernels = kernel_classes(events)
    split = {"data_wait": 0.0, "host": 0.1, "copy": 0.0, "compute": 0.9}
    text = verdict(split, FAST, "cuda", epochs=Epochs(0.0, 300.0, 250.0), kernels=kernels)
    # Then the classes share the kernel time, largest first, and the verdict names them,
    # offers a setting of this tool, and ends with the epochs' energy
    assert kernels == pytest.approx(
        {
            "convolutions backward": 0.45,
            "convolutions forward": 0.25,
            "batch-norm": 0.12,
            "elementwise": 0.11,
            "other": 0.04,
            "optimizer": 0.03,
        }  # fmt: skip
    )
    assert list(kernels) == ["convolutions backward", "convolutions forward", "batch-norm",
                             "elementwise", "other", "optimizer"]  # fmt: skip
    assert text.startswith(
        "compute-bound: in the profiled steps the GPU computed 90%, waited 10% for the host's "
        "launches, 0% for copies, 0% for data; its kernel time: convolutions backward 45%, "
        "convolutions forward 25%, batch-norm 12%, elementwise 11%, other 4%, optimizer 3%; "
        "the epochs waited 0% of their time for data (batches made on the device); try a "
        "larger --batch-size"
    )
    assert text.endswith("; the epochs used 300 J each (250 W)")
    assert "only" not in text and "nothing" not in text
