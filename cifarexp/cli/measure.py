"""The commands that train: time (C1, C2), sweep-workers (C3, C4), compare-device (C5),
compare-optim (C6), no-bn (C7), and the hidden launched-run of compare-device --gpus."""

from __future__ import annotations

import typer

from cifarexp.cli import options as opt
from cifarexp.cli.base import answer, command, open_session, parse_int, parse_list, training_config
from cifarexp.config import OPTIMIZERS, SCALINGS, ConfigError, TrainConfig

D = TrainConfig()  # the study's defaults, shown by --help
ALL_OPTIMIZERS, ALL_SCALINGS = ",".join(OPTIMIZERS), ",".join(SCALINGS)


@command("time", under_torchrun=True)
def time_(
    ctx: typer.Context,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    optimizer: opt.OptimizerName = D.optimizer,
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    scaling: opt.ScalingName = D.scaling,
    profile: opt.Profile = D.profile,
    fast: opt.Fast = False,
    nproc: opt.Nproc = 1,
    run_name: opt.RunName = None,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C1, C2: train and time every epoch: data-loading wait, computation, wall clock."""
    session = open_session(ctx)
    cfg = training_config(ctx, session)
    from cifarexp.study import runs

    answer(session, "C2", runs.time_run(cfg, session, run_name=run_name))


@command("sweep-workers")
def sweep_workers(
    ctx: typer.Context,
    worker_counts: opt.WorkerCounts = "auto",
    gpu_loader: opt.GpuLoaderRow = None,
    epochs: opt.Epochs = 1,
    optimizer: opt.OptimizerName = D.optimizer,
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C3, C4: data-loading time per DataLoader worker count, the best count, 1 vs best."""
    counts = None
    if worker_counts != "auto":
        counts = [parse_int("workers", w) for w in parse_list("workers", worker_counts)]
        if any(c < 0 for c in counts):
            raise ConfigError(f"counts must be >= 0, got {worker_counts!r}", "workers")
    session = open_session(ctx)
    cfg = training_config(ctx, session)
    from cifarexp.study import comparisons

    answer(session, "C3", comparisons.sweep_workers(cfg, counts, session, gpu_loader=gpu_loader))


@command("compare-device")
def compare_device(
    ctx: typer.Context,
    devices: opt.Devices = None,
    cpu_batches: opt.CpuBatches = None,
    gpus: opt.Gpus = None,
    scalings: opt.Scalings = ALL_SCALINGS,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    optimizer: opt.OptimizerName = D.optimizer,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C5: average epoch time on each device (GPU vs CPU) and the GPU speedup; with --gpus,
    epoch time, images/s, speedup and scaling efficiency on 1, 2, 4 ... GPUs."""
    session = open_session(ctx)
    cfg = training_config(ctx, session)
    from cifarexp.study import comparisons

    if gpus is not None:
        counts = [parse_int("gpus", g) for g in parse_list("gpus", gpus)]
        modes = parse_list("scaling", scalings, SCALINGS)
        parent = comparisons.compare_gpus(
            cfg, counts, modes, session, device=devices or "cuda", cpu_batches=cpu_batches
        )
        answer(session, "C5-scaling", parent)
        return
    import torch

    default = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    names = parse_list("devices", default if devices is None else devices)
    answer(session, "C5", comparisons.compare_device(cfg, names, session, cpu_batches=cpu_batches))


@command("launched-run", under_torchrun=True, hidden=True)
def launched_run(ctx: typer.Context) -> None:
    """One process of a variant that a comparison launched through torchrun."""
    from cifarexp.study import launch

    spec = launch.launched_run()
    session = open_session(
        ctx,  # the launcher's store, from MLFLOW_TRACKING_URI
        quiet=spec.quiet,
        device=spec.config.device,
        system_metrics=spec.system_metrics,
    )
    launch.train_launched(spec, session)


@command("compare-optim")
def compare_optim(
    ctx: typer.Context,
    optimizers: opt.Optimizers = ALL_OPTIMIZERS,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C6: SGD, Nesterov, Adagrad, Adadelta, Adam: training time, loss and accuracy."""
    names = parse_list("optimizers", optimizers, OPTIMIZERS)
    session = open_session(ctx)
    cfg = training_config(ctx, session)
    from cifarexp.study import comparisons

    answer(session, "C6", comparisons.compare_optim(cfg, names, session))


@command("no-bn")
def no_bn(
    ctx: typer.Context,
    baseline: opt.Baseline = True,
    epochs: opt.Epochs = D.epochs,
    workers: opt.Workers = str(D.workers),
    optimizer: opt.OptimizerName = D.optimizer,
    device: opt.Device = D.device,
    dataset: opt.DatasetName = D.dataset,
    data_dir: opt.DataDir = D.data_dir,
    train_size: opt.TrainSize = D.train_size,
    test_size: opt.TestSize = D.test_size,
    batch_size: opt.BatchSize = D.batch_size,
    lr: opt.Lr = D.lr,
    momentum: opt.Momentum = D.momentum,
    weight_decay: opt.WeightDecay = D.weight_decay,
    seed: opt.Seed = D.seed,
    pin_memory: opt.PinMemory = D.pin_memory,
    persistent_workers: opt.PersistentWorkers = D.persistent_workers,
    loader_timeout: opt.LoaderTimeout = D.loader_timeout,
    eval: opt.Eval = D.eval,
    warmup: opt.Warmup = D.warmup,
    loader: opt.LoaderName = D.loader,
    precision: opt.PrecisionName = D.precision,
    channels_last: opt.ChannelsLast = D.channels_last,
    compile: opt.Compile = D.compile,
    cuda_graph: opt.CudaGraph = D.cuda_graph,
    timing: opt.TimingName = D.timing,
    profile: opt.Profile = D.profile,
    resume: opt.Resume = False,
    tracking_uri: opt.TrackingUri = None,
    experiment: opt.Experiment = None,
    quiet: opt.Quiet = False,
    system_metrics: opt.SystemMetrics = True,
) -> None:
    """C7: the model without BatchNorm against the BN model: loss and accuracy."""
    session = open_session(ctx)
    cfg = training_config(ctx, session)
    from cifarexp.study import comparisons

    answer(session, "C7", comparisons.no_bn(cfg, session, baseline=baseline))
