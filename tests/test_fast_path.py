"""The fast path on CPU: GPU-style augmentation, events timing, warm-up, options;
and, where there is one, on a CUDA device (marked gpu)."""

import copy
import importlib.util
import itertools
import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from cifarexp import tracking
from cifarexp.config import ConfigError, TrainConfig, fast_settings, has_fast_settings
from cifarexp.study.runs import warm_up_before_epoch_1
from cifarexp.training import engine, fastpath
from cifarexp.training.build import build_training
from cifarexp.training.data import (
    MEAN,
    STD,
    ImageArrayDataset,
    load_split,
    synthetic_arrays,
    train_transform,
)
from cifarexp.training.engine import (
    EpochResult,
    Execution,
    compiled_for_shapes,
    compiled_shapes_only,
    train,
    train_one_epoch,
    train_step,
)
from cifarexp.training.gpu_loader import GpuLoader, crop_flip_normalize, normalization, pad_images
from cifarexp.training.models import build_model
from cifarexp.training.optim import build_optimizer
from cifarexp.training.warmup import GraphedStep, warm_up
from tests.conftest import TINY, TINY_ARGS, all_runs, one_message

CPU = torch.device("cpu")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def loader_for(images: np.ndarray, labels: list[int], batch_size: int, **kwargs) -> GpuLoader:
    dataset = ImageArrayDataset(images, labels, train_transform())
    return GpuLoader(dataset, batch_size=batch_size, device=CPU, seed=0, **kwargs)


def small_model() -> nn.Module:
    """A seeded conv-BN-linear model: the engine's logic at a fraction of ResNet-18's cost."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)
    )


def unnormalize(images: torch.Tensor) -> torch.Tensor:
    """Back to the uint8 pixel values the augmentation read."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    return ((images * std + mean) * 255).round().long()


# ----------------------------------------------------------------- GPU augmentation


on_cuda = [pytest.mark.gpu, cuda_only]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "device, compiled",
    [("cpu", False), pytest.param("cuda", False, marks=on_cuda),
     pytest.param("cuda", True, marks=on_cuda, id="cuda-compiled")],
)  # fmt: skip
def test_gpu_augmentation_is_torchvisions_pixel_for_pixel_for_every_offset_and_flip(
    device, compiled, channels_last
):
    images, _ = synthetic_arrays(2, seed=0, train=True)
    padded = pad_images(torch.from_numpy(images).to(device))
    mean, std = normalization(torch.device(device))
    cases = list(itertools.product(range(2), range(9), range(9), (False, True)))
    index, tops, lefts, flips = (
        torch.tensor(column, device=device) for column in zip(*cases, strict=True)
    )
    offsets = torch.stack([tops, lefts], dim=1)

    augment = compiled_for_shapes(crop_flip_normalize) if compiled else crop_flip_normalize
    ours = augment(padded, index, offsets, flips, mean, std, channels_last=channels_last)

    for got, (i, top, left, flip) in zip(ours, cases, strict=True):
        image = TF.crop(TF.pad(Image.fromarray(images[i]), 4), top, left, 32, 32)
        image = TF.hflip(image) if flip else image
        expected = TF.normalize(TF.to_tensor(image), MEAN, STD)
        if device == "cpu":
            assert torch.equal(got, expected), (i, top, left, flip)
        else:  # the same pixels; CUDA's float division may round the last bit differently
            torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-6)
    assert ours.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def test_gpu_loader_offsets_are_uniform_over_0_to_8_and_half_the_images_flip():
    # Given one image whose pixels tell their own row and column (value = index + 1),
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    image = np.stack([rows + 1, cols + 1, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    n = 4096
    loader = loader_for(np.repeat(image[None], n, axis=0), [0] * n, batch_size=1024)

    # when one epoch of it is augmented,
    pixels = unnormalize(torch.cat([images for images, _ in loader]))

    # then each crop offset, read back from the centre pixels, is uniform over 0..8
    source_row = pixels[:, 0, 16, 16] - 1  # = top + 16 - 4
    source_col = pixels[:, 1, 16, 16] - 1
    flipped = pixels[:, 1, 16, 17] < pixels[:, 1, 16, 16]
    top = source_row - 12
    left = torch.where(flipped, source_col - 11, source_col - 12)  # flip: left + 31 - 16 - 4
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=9)
        assert len(counts) == 9 and counts.min() > 0.8 * n / 9 and counts.max() < 1.2 * n / 9
    # and about half of the images are flipped.
    assert 0.46 < flipped.float().mean().item() < 0.54


def test_gpu_loader_visits_every_image_once_per_epoch_with_its_label():
    n = 50
    images = np.broadcast_to(
        np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 32, 32, 3)
    )
    labels = [i % 10 for i in range(n)]
    loader = loader_for(np.ascontiguousarray(images), labels, batch_size=16)

    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(labels) for _, labels in batches] == [16, 16, 16, 2] == [16] * 3 + [2]
        index = torch.cat([unnormalize(images)[:, 0, 16, 16] - 1 for images, _ in batches])
        assert sorted(index.tolist()) == list(range(n))
        assert torch.equal(torch.cat([labels for _, labels in batches]), index % 10)
        epochs.append(index)
    assert len(loader) == 4 and not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_gpu_loader_warm_up_makes_a_batch_of_each_size_from_its_own_draws():
    # Given two loaders of one set and seed, one of them warmed up for its two batch sizes,
    images, labels = synthetic_arrays(40, seed=0, train=True)
    warmed, fresh = (loader_for(images, labels, batch_size=16) for _ in range(2))
    calls, generators = [], []
    augment, draw = warmed.augment, warmed.draw
    warmed.augment = lambda *args, **kwargs: calls.append(len(args[1])) or augment(*args, **kwargs)
    warmed.draw = lambda generator: generators.append(generator) or draw(generator)
    warmed.warm_up([16, 8])

    # then it drew once, from a generator of its own, and made one batch of each size as an
    # epoch does; and its epochs are the other's, batch for batch.
    assert calls == [16, 8]
    assert len(generators) == 1 and generators[0] is not warmed.generator
    for (a, a_labels), (b, b_labels) in zip(warmed, fresh, strict=True):
        assert torch.equal(a, b) and torch.equal(a_labels, b_labels)


def test_gpu_loader_refuses_a_warm_up_batch_larger_than_its_epoch():
    # Given a loader of 10 images, when asked to warm up a batch of 16 (which an epoch would
    # cut to 10), then it refuses, naming both numbers.
    images, labels = synthetic_arrays(10, seed=0, train=True)
    with pytest.raises(ValueError, match="batch of 16 from 10 images"):
        loader_for(images, labels, batch_size=16).warm_up([16])


# ----------------------------------------------------------------- engine


class FakeCudaEvent:
    """torch.cuda.Event on the host clock, so events timing runs on CPU."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.time = None

    def record(self, stream=None) -> None:
        self.time = time.perf_counter()

    def elapsed_time(self, end: "FakeCudaEvent") -> float:
        return (end.time - self.time) * 1000


def test_events_timing_trains_as_sync_does_and_reports_every_batch_after_the_epoch(
    monkeypatch,
):
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    model = small_model()
    results, calls = {}, {}
    for timing in ("sync", "events"):
        copied = copy.deepcopy(model)
        optimizer = build_optimizer("sgd", copied.parameters())
        calls[timing] = []
        results[timing] = train_one_epoch(
            copied,
            batches,
            optimizer,
            CPU,
            epoch=1,
            on_batch=lambda *args, timing=timing: calls[timing].append(args),
            execution=Execution(timing=timing),
        )
    sync, events = results["sync"], results["events"]
    assert events.train_loss == pytest.approx(sync.train_loss, rel=1e-6)
    assert events.train_acc == sync.train_acc and events.images == sync.images == 8
    assert [i for i, *_ in calls["events"]] == [0, 1]
    assert calls["events"] == [(i, pytest.approx(loss), acc) for i, loss, acc in calls["sync"]]
    assert 0 < events.data_time_s + events.train_time_s <= events.epoch_time_s


def test_events_timing_estimates_an_epoch_cut_short_as_sync_timing_does(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    # Given 4 batches of which an epoch trains the first 3 (max_batches),
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(4)]
    for timing in ("sync", "events"):
        model = small_model()
        optimizer = build_optimizer("sgd", model.parameters())
        # when it is timed by each method,
        result = train_one_epoch(
            model, batches, optimizer, CPU, epoch=1, max_batches=3,
            execution=Execution(timing=timing),
        )  # fmt: skip
        # then each estimates the whole epoch alike: the first batch once, then 3 of the
        # later ones' time, with their range.
        assert result.images == 12
        low, estimate, high = (
            result.estimate_low_s,
            result.estimated_epoch_s,
            result.estimate_high_s,
        )
        assert 0 < low <= estimate <= high, (timing, result)
        assert estimate > result.epoch_time_s


def test_warm_up_leaves_model_optimizer_and_rng_as_they_were():
    model = small_model()
    optimizer = build_optimizer("sgd", model.parameters())
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()

    seconds = warm_up(model, optimizer, CPU, batch_sizes=[2], steps=1)

    assert seconds > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    assert optimizer.state_dict()["state"] == {}  # no momentum buffers
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_warm_up_of_no_steps_is_refused():
    model = small_model()
    optimizer = build_optimizer("sgd", model.parameters())
    with pytest.raises(ValueError, match="at least one step"):
        warm_up(model, optimizer, CPU, batch_sizes=[2], steps=0)


@pytest.mark.parametrize("name", ["sgd", "nesterov"])
def test_the_fused_sgd_of_a_captured_step_trains_as_the_studys_sgd_even_from_a_zeroed_state(
    name,
):
    # Given the study's SGD and the fused one a GraphedStep runs, on two copies of a model in
    # channels_last memory (as --fast keeps it), the fused one with momentum buffers that
    # earlier steps made and that were then zeroed in place (as GraphedStep's warm-up leaves
    # them),
    torch.manual_seed(0)
    study_model = small_model().to(memory_format=torch.channels_last)
    fused_model = copy.deepcopy(study_model)
    study = build_optimizer(name, study_model.parameters())
    fused = build_optimizer(name, fused_model.parameters(), fused=True)
    criterion = nn.CrossEntropyLoss()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(4)]
    before = copy.deepcopy(fused_model.state_dict())
    for images, labels in batches[:2]:
        train_step(fused_model, criterion, fused, images, labels, Execution())
    fused_model.load_state_dict(before)
    for state in fused.state.values():
        state["momentum_buffer"].zero_()

    # when both train on the same batches,
    for images, labels in batches:
        for model, optimizer in ((study_model, study), (fused_model, fused)):
            train_step(model, criterion, optimizer, images, labels, Execution())

    # then they end with the same weights and momentum (up to float rounding).
    assert fused.defaults["fused"] and not study.defaults["fused"]
    for p, q in zip(study_model.parameters(), fused_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        momenta = fused.state[q]["momentum_buffer"], study.state[p]["momentum_buffer"]
        torch.testing.assert_close(*momenta, rtol=1e-5, atol=1e-6)


def test_a_compiled_model_compiles_once_in_warm_up_and_trains_as_the_eager_one():
    # Given a small model compiled with a backend that only counts compilations,
    compilations = []

    def counting_backend(graph, inputs):
        compilations.append(graph)
        return graph.forward

    batches = [(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))) for n in (4, 4, 3)]
    eager = small_model()
    eager_results = train(
        eager,
        batches,
        build_optimizer("sgd", eager.parameters()),
        CPU,
        epochs=2,
        on_epoch=lambda r: None,
    )

    # when it is warmed up on both batch sizes and trained for two epochs,
    torch._dynamo.reset()
    model = small_model()
    optimizer = build_optimizer("sgd", model.parameters())
    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    execution = Execution(compiled=True)
    warm_up(compiled, optimizer, CPU, batch_sizes=[4, 3], execution=execution)
    compiled_in_warm_up = len(compilations)
    results = train(
        compiled, batches, optimizer, CPU, epochs=2, on_epoch=lambda r: None, execution=execution
    )

    # then only the full batch's shape was compiled, in the warm-up (the smaller last batch
    # runs eagerly),
    assert compiled_in_warm_up == len(compilations) == 1
    # and warm-up changed nothing that the epochs measure.
    for ours, theirs in zip(results, eager_results, strict=True):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-5)
        assert ours.train_acc == theirs.train_acc


# ----------------------------------------------------------------- FLOPs and MFU


def test_model_flops_per_trained_image_match_the_spec_and_leave_the_model_alone():
    model = build_model()
    before = copy.deepcopy(model.state_dict())
    flops = fastpath.flops_per_image(model)
    assert 3.2e9 < flops < 3.4e9  # ≈ 0.556 GMAC forward, x3 for backward: ≈ 3.3 GFLOP
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H200", "tf32", 494e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 494e12),  # cuDNN's TF32 convolutions
        ("Tesla T4", "bf16", None),
    ],
)
def test_peak_flops_come_from_the_table_and_are_absent_for_unknown_devices(
    monkeypatch, name, precision, peak
):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert fastpath.peak_flops(torch.device("cuda"), precision) == peak
    assert fastpath.peak_flops(CPU, precision) is None


def test_mfu_is_a_metric_only_where_the_peak_is_known():
    known = Execution(flops_per_image=3e9, peak_flops=1e12)
    assert known.mfu(images=1000, seconds=10.0) == pytest.approx(0.3)
    assert Execution(flops_per_image=3e9).mfu(images=1000, seconds=10.0) is None
    result = EpochResult(1, 0.1, 0.8, 1.0, 2.0, 0.5, 100)
    assert "mfu" not in result.metrics()
    assert EpochResult(1, 0.1, 0.8, 1.0, 2.0, 0.5, 100, mfu=0.3).metrics()["mfu"] == 0.3


@pytest.mark.parametrize(
    ("images", "batch_size", "max_batches", "sizes"),
    [(50_000, 128, None, [128, 80]), (32, 16, None, [16]), (40, 16, 2, [16]), (8, 16, None, [8])],
)
def test_warm_up_covers_the_batch_sizes_an_epoch_will_see(images, batch_size, max_batches, sizes):
    assert fastpath.warmup_batch_sizes(images, batch_size, max_batches) == sizes


# ----------------------------------------------------------------- options


def test_cuda_only_options_fail_off_cuda_naming_their_field():
    with pytest.raises(ConfigError, match="events needs a CUDA device") as error:
        TrainConfig(timing="events").check_device("cpu")
    assert error.value.field == "timing"  # the CLI names it --timing
    TrainConfig(timing="events", compile="max-autotune", precision="tf32").check_device("cuda")
    TrainConfig(cuda_graph=True, timing="events").check_device("cuda")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loader", "dali"], "'--loader': 'dali' is not one of 'torch', 'gpu'"),
        (["--precision", "fp16"], "'--precision': 'fp16' is not one of"),
        (["--compile", "fast"], "'--compile': 'fast' is not one of"),
        (["--timing", "wall"], "'--timing': 'wall' is not one of"),
        (["--timing", "events"], "--timing: events needs a CUDA device"),
        (["--compile", "reduce-overhead"], "--compile: reduce-overhead needs a CUDA device"),
        (["--precision", "tf32"], "--precision: tf32 needs a CUDA device"),
        (["--cuda-graph"], "--cuda-graph: needs a CUDA device"),
        (["--cuda-graph", "--optimizer", "adam"], "--cuda-graph: captures sgd and nesterov"),
        (["--cuda-graph", "--compile", "default"], "--compile: default needs a CUDA device"),
        (
            ["--cuda-graph", "--compile", "reduce-overhead"],
            "--cuda-graph: captures the eager or the default-compiled step, not compile "
            "reduce-overhead",
        ),
        (
            ["--cuda-graph", "--compile", "default", "--optimizer", "adagrad"],
            "--cuda-graph: captures sgd and nesterov steps only, not adagrad",
        ),
        (["--no-warmup", "--compile", "default"], "--warmup: cannot be off with compile"),
        (["--no-warmup", "--cuda-graph"], "--warmup: cannot be off with cuda_graph"),
    ],
)
def test_bad_or_cuda_only_fast_path_options_are_a_usage_error_and_leave_no_run(
    cli, client, args, message
):
    result = cli("time", *TINY_ARGS, *args)
    assert result.exit_code == 2, result.output
    assert message in one_message(result.output)
    assert all_runs(client) == []


@pytest.mark.parametrize(
    ("warms_up", "compile_mode", "announced"),
    [(True, "default", True), (True, "none", False), (False, "default", False)],
)
def test_a_compiling_warm_up_is_announced_before_its_silent_seconds(
    caplog, monkeypatch, warms_up, compile_mode, announced
):
    # Given a run about to warm up (on CUDA) or not, compiling or not (its notices caught
    # where the CLI's own handler would show them),
    monkeypatch.setattr(logging.getLogger("cifarexp"), "handlers", [caplog.handler])
    logged = {}
    tracker = SimpleNamespace(writes=True, log_metrics=logged.update)
    cfg = TINY.replace(compile=compile_mode)
    warmup_s = 12.5 if warms_up else None
    training = SimpleNamespace(cfg=cfg, warms_up=warms_up, warm_up=lambda: warmup_s)

    # when it warms up,
    with caplog.at_level("INFO", logger="cifarexp"):
        warm_up_before_epoch_1(tracker, training)

    # then a compilation is announced first, and the warm-up's seconds are logged.
    said = [r.getMessage() for r in caplog.records]
    expected = ["Compiling the model (--compile default) in the untimed warm-up..."]
    assert said == (expected if announced else [])
    assert logged == ({"warmup_s": 12.5} if warms_up else {})


def test_fast_picks_the_fastest_settings_per_device_optimizer_and_processes():
    # the compiled model's step captured on CUDA for SGD in one process; a model compiled
    # with CUDA graphs for the other optimizers, under torchrun and beside a compile mode
    # with graphs of its own: each a config it can train
    assert fast_settings("cuda", "nesterov") == {
        "loader": "gpu", "precision": "bf16", "channels_last": True, "compile": "default",
        "cuda_graph": True, "timing": "events",
    }  # fmt: skip
    adam = fast_settings("cuda", "adam")
    assert (adam["cuda_graph"], adam["compile"]) == (False, "reduce-overhead")
    TrainConfig(**adam, optimizer="adam").check_device("cuda")
    several = fast_settings("cuda", "sgd", several=True)
    assert (several["cuda_graph"], several["compile"]) == (False, "reduce-overhead")
    TrainConfig(**several).check_processes(several=True)
    # a compile mode given that captures graphs of its own: no captured step beside it
    own = fast_settings("cuda", "sgd", compile="max-autotune") | {"compile": "max-autotune"}
    assert own["cuda_graph"] is False
    TrainConfig(**own).check_device("cuda")
    assert fast_settings("cuda", "sgd", compile="none")["cuda_graph"] is True
    assert fast_settings("cpu", "sgd") == {"loader": "gpu"}
    # where torch.compile cannot build (no Triton), nothing compiled: the eager step captured,
    # or for what a graph cannot capture, no graph
    for optimizer, graphed in (("sgd", True), ("adam", False)):
        settings = fast_settings("cuda", optimizer, compiles=False)
        assert "compile" not in settings and settings["cuda_graph"] is graphed
        TrainConfig(**settings, optimizer=optimizer).check_device("cuda")


def test_fast_without_triton_compiles_nothing_says_so_and_names_its_run_by_the_full_settings(
    cli, client, monkeypatch
):
    # Given a CUDA device (as the CLI resolves it) and no Triton for torch.compile,
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "triton" else find_spec(name)
    )
    monkeypatch.setattr(
        "cifarexp.training.engine.resolve_device", lambda name: torch.device("cuda")
    )
    # then --fast's settings compile nothing, and a run without --compile is not named fast,
    settings = fast_settings("cuda", "sgd")
    assert "compile" not in settings and settings["cuda_graph"] is True
    assert not has_fast_settings(TrainConfig(**settings), "cuda")
    assert has_fast_settings(TrainConfig(**settings, compile="default"), "cuda")
    # and `time --fast` says so before anything else (here, this machine's lack of CUDA).
    result = cli("time", *TINY_ARGS, "--fast")
    assert "Triton is not installed: --fast runs without --compile" in result.output
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize(
    ("args", "expected", "name"),
    [
        ([], {"loader": "gpu", "precision": "fp32", "compile": "none", "timing": "sync"},
         "time synthetic cpu fast"),
        (["--loader", "torch"], {"loader": "torch", "precision": "fp32"},  # given: kept
         "time synthetic cpu"),
        (["--precision", "bf16"], {"loader": "gpu", "precision": "bf16"},
         "time synthetic cpu fast"),
    ],
)  # fmt: skip
def test_fast_on_cpu_takes_its_settings_where_no_option_is_given(cli, client, args, expected, name):
    # Given --fast on this CPU-only machine, with or without options of its own,
    result = cli("time", *TINY_ARGS, "--epochs", "1", "--fast", *args)
    # then the run trains, its params the settings resolved, named fast where it has them all.
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    assert {k: run.data.params[k] for k in expected} == expected
    assert run.info.run_name == name


def test_fast_path_options_reach_the_run_params_and_train_on_cpu(cli, client):
    result = cli(
        "time",
        *TINY_ARGS,
        *("--train-size", "8", "--batch-size", "8", "--epochs", "1"),
        *("--loader", "gpu", "--precision", "bf16", "--channels-last"),
    )
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["loader"], params["precision"], params["channels_last"]) == (
        "gpu",
        "bf16",
        "True",
    )
    assert (params["compile"], params["timing"]) == ("none", "sync")
    assert (params["cuda_graph"], params["warmup"]) == ("False", "True")
    metrics = run.data.metrics
    assert 3.2e9 < float(params["flops_per_image"]) < 3.4e9
    assert {"epoch_time_s", "train_acc"} <= set(metrics)
    assert "mfu" not in metrics and "warmup_s" not in metrics  # CPU: no peak, no warm-up


# ----------------------------------------------------------------- on CUDA (skipped elsewhere)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("compile_mode", ["none", "reduce-overhead"])
def test_on_cuda_an_events_epoch_never_waits_for_the_device_before_its_end(
    monkeypatch, compile_mode
):
    # Given a warmed-up fast path with its last batch smaller (1000 = 7 x 128 + 104),
    device = torch.device("cuda")
    cfg = TINY.replace(train_size=1000, batch_size=128, device="cuda", loader="gpu")
    cfg = cfg.replace(precision="bf16", channels_last=True, compile=compile_mode, timing="events")
    loader = GpuLoader(
        load_split(cfg, train=True), batch_size=128, device=device, seed=0, channels_last=True,
        compiled=compile_mode != "none",
    )  # fmt: skip
    model = build_model().to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer("sgd", model.parameters())
    execution = fastpath.execution(cfg, model, device)
    compiled = fastpath.compile_model(model, compile_mode)
    loader.warm_up([128, 104])
    warm_up(compiled, optimizer, device, batch_sizes=[128, 104], execution=execution)

    # when an epoch runs with any host-device synchronisation an error, until its one wait,
    def allow_then_synchronize(device):
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)

    monkeypatch.setattr("cifarexp.training.engine.synchronize", allow_then_synchronize)
    torch.cuda.set_sync_debug_mode("error")
    try:
        [result] = train(
            compiled,
            loader,
            optimizer,
            device,
            epochs=1,
            on_epoch=lambda r: None,
            execution=execution,
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)

    # then it ran through, and its times are attributed.
    assert result.images == 1000 and 0 <= result.train_acc <= 1
    assert result.data_time_s > 0 and 0 < result.train_time_s < result.epoch_time_s


def relative_change_error(
    before: list[torch.Tensor], eager: list[torch.Tensor], other: list[torch.Tensor]
) -> float:
    """|other's change - eager's change| / |eager's change|, over all the tensors together:
    a lost or doubled update is off by 100%."""
    diff = sum(((o.float() - e.float()) ** 2).sum() for e, o in zip(eager, other, strict=True))
    change = sum(((e.float() - b.float()) ** 2).sum() for b, e in zip(before, eager, strict=True))
    return float((diff / change).sqrt())


def change_errors(before: nn.Module, models: tuple[nn.Module, nn.Module], optimizers) -> dict:
    """How far the second model's training moved it otherwise than the first's: in the
    weights, the batch-norm statistics and the momentum, each apart."""
    weights = [[p.detach() for p in m.parameters()] for m in models]
    statistics = [[b for b in m.buffers() if b.is_floating_point()] for m in models]
    momenta = [
        [opt.state[p]["momentum_buffer"] for p in m.parameters()]
        for m, opt in zip(models, optimizers, strict=True)
    ]
    return {
        "weights": relative_change_error([p.detach() for p in before.parameters()], *weights),
        "batch-norm statistics": relative_change_error(
            [b for b in before.buffers() if b.is_floating_point()], *statistics
        ),
        "momentum": relative_change_error([torch.zeros_like(m) for m in momenta[0]], *momenta),
    }


# How closely the captured step's kernels, run uncaptured, train as the study's step: (the
# steps compared, the tolerance on their losses and on the change they made). The eager
# model's kernels and the fused SGD (the study's SGD's maths) agree every step, to rounding.
# The compiled model's, measured on an H100 (torch 2.11): each loss as the study's (1e-7 on
# the first), the first gradients 0.4% off (0.6% on batch-norm parameters). Inductor's fp32
# batch-norm kernels round more than eager's: against a float64 step on CPU, its first
# gradients were 6e-3 off and eager's 1.3e-4, and without batch norm both were as close.
# Each further step on random labels amplified the difference about five-fold, to 45% of
# the weights' change after five steps, so the compiled kernels are held to their first
# step: a lost or doubled update, or a wrong gradient, is off by 100%.
STUDY_TOLERANCE = {"none": (5, 1e-4, 1e-3), "default": (1, 1e-5, 2e-2)}


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("compile_mode", ["none", "default"])
def test_on_cuda_a_graphed_step_trains_as_its_kernels_do_uncaptured_and_as_the_study_step(
    monkeypatch, compile_mode
):
    # Given three copies of one model: one stepped as the study steps (eager, its SGD); one
    # by the step a GraphedStep captures (the eager or the compiled model, the fused SGD),
    # uncaptured; one through the GraphedStep, captured during the warm-up, its optimizer's
    # state then zeroed in place,
    device = torch.device("cuda")
    # Exact fp32 convolutions, chosen the same way for all: TF32 and autotuning would each
    # round differently, and capture may pick other algorithms than eager steps do.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    study = build_model().to(device)
    before, uncaptured, graphed = (copy.deepcopy(study) for _ in range(3))
    # (lr 0.01: on random data lr 0.1 diverges, and a diverging run amplifies any rounding.)
    optimizers = [build_optimizer("nesterov", study.parameters(), lr=0.01)] + [
        build_optimizer("nesterov", m.parameters(), lr=0.01, fused=True)
        for m in (uncaptured, graphed)
    ]
    execution = Execution(compiled=compile_mode != "none")
    steps = [train_step, train_step, GraphedStep()]
    trained = [study] + [fastpath.compile_model(m, compile_mode) for m in (uncaptured, graphed)]
    for model, optimizer, step in zip(trained[1:], optimizers[1:], steps[1:], strict=True):
        warm_up(model, optimizer, device, batch_sizes=[32, 8], execution=execution, step=step)
    assert set(steps[2].graphs) == {torch.Size([n, 3, 32, 32]) for n in (32, 8)}

    # when all three train the same batches, one of them of the other size (its own graph of
    # the eager model's kernels, as the compiled model runs that shape uncaptured),
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator(device).manual_seed(1)
    compared, loss_tolerance, change_tolerance = STUDY_TOLERANCE[compile_mode]
    losses = []
    for index, size in enumerate((32, 32, 8, 32, 32)):
        images = torch.randn(size, 3, 32, 32, device=device, generator=generator)
        labels = torch.randint(0, 10, (size,), device=device, generator=generator)
        step_losses = [train_step(study, criterion, optimizers[0], images, labels, Execution())]
        with compiled_shapes_only(execution):
            for model, optimizer, step in zip(trained[1:], optimizers[1:], steps[1:], strict=True):
                step_losses.append(step(model, criterion, optimizer, images, labels, execution))
        losses.append([loss.item() for loss, _ in step_losses])
        if index + 1 == compared:
            study_errors = change_errors(before, (study, uncaptured), optimizers[:2])

    # then the graphed step trains exactly as its kernels do uncaptured, every step;
    assert all(g == pytest.approx(u, rel=1e-5) for _, u, g in losses), losses
    captured = change_errors(before, (uncaptured, graphed), optimizers[1:])
    assert max(captured.values()) <= 1e-4, captured
    # and those kernels' steps compared are the study's: the same losses and changes.
    studied = losses[:compared]
    assert all(u == pytest.approx(s, rel=loss_tolerance) for s, u, _ in studied), losses
    assert max(study_errors.values()) <= change_tolerance, (study_errors, losses)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("warmup", [True, False])
def test_on_cuda_the_study_path_warms_up_unless_told_not_to(cli, client, warmup):
    args = () if warmup else ("--no-warmup",)
    result = cli("time", *TINY_ARGS, "--device", "cuda", *args)
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    assert ("warmup_s" in run.data.metrics) == warmup
    assert run.data.params["warmup"] == str(warmup)


# A CUDA run of full batches and a smaller last one (1000 = 7 x 128 + 104).
CUDA_BATCHES = ("--device", "cuda", "--train-size", "1000", "--batch-size", "128")


@pytest.mark.gpu
@cuda_only
def test_on_cuda_the_fast_path_logs_warm_up_and_mfu(cli, client):
    result = cli(
        "time",
        *TINY_ARGS,
        *CUDA_BATCHES,
        *("--loader", "gpu", "--precision", "bf16", "--channels-last"),
        *("--compile", "reduce-overhead", "--timing", "events"),
    )
    assert result.exit_code == 0, result.output
    [run] = all_runs(client)
    metrics = run.data.metrics
    assert metrics["warmup_s"] > 0 and metrics["train_time_s"] > 0
    name = torch.cuda.get_device_name().lower()
    assert ("mfu" in metrics) == any(fragment in name for fragment, _ in fastpath.PEAK_FLOPS)


@pytest.mark.gpu
@cuda_only
def test_on_cuda_a_warmed_fast_epoch_runs_only_what_the_warm_up_compiled(monkeypatch):
    # Given --fast on CUDA (the model, the augmentation and each step's stats compiled), warmed
    # up for its two batch sizes (1000 = 7 x 128 + 104), its epochs made to fail on any
    # recompilation instead of running a new shape eagerly,
    cfg = TINY.replace(train_size=1000, batch_size=128, device="cuda")
    training = build_training(cfg.replace(**fast_settings("cuda", cfg.optimizer)))
    training.warm_up()
    monkeypatch.setattr(
        engine, "compiled_shapes_only", lambda _: torch.compiler.set_stance("fail_on_recompile")
    )

    # when it trains an epoch, then nothing compiled in the warm-up compiles again.
    (result,) = training.train(lambda result: None, epochs=1)
    assert result.images == 1000 and result.train_time_s > 0


@pytest.mark.gpu
@cuda_only
def test_on_cuda_fast_trains_and_profiles_the_compiled_step_captured_whole(cli, client):
    # Given --fast on CUDA, which compiles the model and captures its step whole,
    result = cli("time", *TINY_ARGS, *CUDA_BATCHES, "--fast", "--profile")

    # then the run trained with those settings, said it was compiling, warmed up, and its
    # profile gave a verdict.
    assert result.exit_code == 0, result.output
    assert "Compiling the model (--compile default)" in result.output
    [run] = all_runs(client)
    params = run.data.params
    assert (params["compile"], params["cuda_graph"], params["loader"]) == ("default", "True", "gpu")
    assert run.data.metrics["warmup_s"] > 0 and run.data.metrics["train_time_s"] > 0
    assert run.data.tags[tracking.VERDICT]
