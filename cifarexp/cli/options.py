"""The command line's options, declared once: each an `Annotated` alias that the commands of
`cli` list in their own signatures; `Sets` marks those that set a config field
(`config.flag` turns a field back into its flag).

Importing this module loads typer and the config's choices only, so that `--help` answers
at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from cifarexp.config import (
    OPTIMIZERS,
    WORKERS_TOLERANCE,
    CompileMode,
    Dataset,
    Loader,
    Precision,
    Preset,
    Scaling,
    Timing,
    fast_flags,
    preset_text,
)

DATA, TRAINING, RUN = "Data", "Training", "Tracking and output"
FAST = "Fast path (GPU)"
SCALE = "Several processes (torchrun)"


@dataclass(frozen=True)
class Sets:
    """Marks an option as setting this field of the TrainConfig (see `cli.base.training_config`)."""

    field: str


def _option(help: str, panel: str, *names: str, **settings: object) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=panel, **settings)


def _env(field: str) -> str:
    """The environment variable a switch also reads (true or false): MLproject's entry points
    pass switches through it, so that a parameter's value can never become an option."""
    return "CIFAREXP_" + field.upper()


# ---------------------------------------------------------------- data

Workers = Annotated[
    str,
    _option(
        "DataLoader worker processes (C3), or 'best': the best count of the latest finished "
        "sweep-workers run for this device and dataset.",
        DATA,
    ),
    Sets("workers"),
]
DatasetName = Annotated[
    Dataset,
    _option("cifar10, or synthetic: CIFAR-shaped, learnable, made locally.", DATA, "--dataset"),
    Sets("dataset"),
]
DataDir = Annotated[
    str, _option("Where CIFAR-10 is (downloaded when absent).", DATA), Sets("data_dir")
]
TrainSize = Annotated[
    int | None, _option("Train on the first N images only.", DATA), Sets("train_size")
]
TestSize = Annotated[
    int | None, _option("Evaluate on the first N test images only.", DATA), Sets("test_size")
]
PinMemory = Annotated[
    bool, _option("DataLoader pin_memory.", DATA, envvar=_env("pin_memory")), Sets("pin_memory")
]
PersistentWorkers = Annotated[
    bool,
    _option("Keep DataLoader workers between epochs.", DATA, envvar=_env("persistent_workers")),
    Sets("persistent_workers"),
]
LoaderTimeout = Annotated[
    float,
    _option(
        "Seconds to wait for a batch from the DataLoader workers before the run fails "
        "(a stuck worker); 0 waits forever.",
        DATA,
    ),
    Sets("loader_timeout"),
]
Warmup = Annotated[
    bool,
    _option(
        "On CUDA, untimed training steps before epoch 1 (model and optimizer put back as they "
        "were; logged as warmup_s), so that epoch 1 measures training, not CUDA's start-up. "
        "--no-warmup keeps the cold epoch 1.",
        TRAINING,
        envvar=_env("warmup"),
    ),
    Sets("warmup"),
]
Eval = Annotated[
    bool, _option("Evaluate on the test split after each epoch (not timed).", DATA), Sets("eval")
]

# ---------------------------------------------------------------- training

Epochs = Annotated[int, _option("Epochs to train (the study: 5).", TRAINING), Sets("epochs")]
OptimizerName = Annotated[
    str,  # checked by the config, which suggests the closest name for a typo
    _option(
        "sgd, nesterov, adagrad, adadelta or adam (C6 compares all five).",
        TRAINING,
        "--optimizer",
        metavar="<name>",  # the choices in the help: a long metavar cut the option names
    ),
    Sets("optimizer"),
]
Device = Annotated[
    str, _option("auto (CUDA when present), cpu, cuda or cuda:N.", TRAINING), Sets("device")
]
BatchSize = Annotated[int, _option("Mini-batch size.", TRAINING), Sets("batch_size")]
StepImages = Annotated[
    int,
    _option(
        "Synthetic images in the one training step and the summary's input (the counts do "
        "not depend on it).",
        TRAINING,
        "--batch-size",
    ),
]
Lr = Annotated[float, _option("Learning rate.", TRAINING), Sets("lr")]
Momentum = Annotated[float, _option("Momentum (sgd, nesterov).", TRAINING), Sets("momentum")]
WeightDecay = Annotated[float, _option("Weight decay.", TRAINING), Sets("weight_decay")]
Seed = Annotated[
    int, _option("Seed for weights, shuffling and synthetic data.", TRAINING), Sets("seed")
]

# ---------------------------------------------------------------- the fast path

LoaderName = Annotated[
    Loader,
    _option(
        "torch: the study's DataLoader; gpu keeps the uint8 train set on the device and "
        "augments whole batches there, as the study's transforms do (--workers, --pin-memory "
        "unused; on CPU the same code runs on CPU tensors).",
        FAST,
        "--loader",
    ),
    Sets("loader"),
]
PrecisionName = Annotated[
    Precision,
    _option(
        "fp32 is PyTorch's default (cuDNN may use TF32 for convolutions), tf32 adds TF32 "
        "matmuls (CUDA only), bf16 is autocast.",
        FAST,
        "--precision",
    ),
    Sets("precision"),
]
ChannelsLast = Annotated[
    bool,
    _option("Model and inputs in NHWC memory order.", FAST, envvar=_env("channels_last")),
    Sets("channels_last"),
]
Compile = Annotated[
    CompileMode,
    _option(
        "torch.compile mode: none, default, reduce-overhead or max-autotune (CUDA only; "
        "compiled during the warm-up, logged as warmup_s).",
        FAST,
        "--compile",
        metavar="<mode>",
    ),
    Sets("compile"),
]
CudaGraph = Annotated[
    bool,
    _option(
        "Capture the whole training step (forward, backward, SGD step) as one CUDA graph "
        "during the warm-up and replay it each step: no per-kernel launches (CUDA, sgd or "
        "nesterov, as a fused SGD; with --compile default, the compiled model's kernels).",
        FAST,
        envvar=_env("cuda_graph"),
    ),
    Sets("cuda_graph"),
]
TimingName = Annotated[
    Timing,
    _option(
        "sync synchronises every step (the study's C2); events times with CUDA events and "
        "waits once per epoch (CUDA only).",
        FAST,
        "--timing",
    ),
    Sets("timing"),
]

Fast = Annotated[
    bool,
    _option(
        "The fastest settings this tool has for the device: on CUDA "
        + ", ".join(fast_flags("cuda"))
        + " (--compile reduce-overhead for --cuda-graph where a step cannot be captured: "
        "adagrad, adadelta, adam, --nproc; no --cuda-graph beside a --compile mode with graphs "
        "of its own); on CPU "
        + ", ".join(fast_flags("cpu"))
        + ". An option given as well overrides its part.",
        FAST,
    ),
]

# ---------------------------------------------------------------- several processes

ScalingName = Annotated[
    Scaling,
    _option(
        "Under torchrun: weak trains --batch-size images per process and step, strong "
        "--batch-size in total, split over the processes.",
        SCALE,
        "--scaling",
    ),
    Sets("scaling"),
]
Nproc = Annotated[
    int,
    typer.Option(
        help="Run this command as N processes on this machine, one per GPU (or N CPU processes "
        "with --device cpu), through torch.distributed.run; 1 = this process only.",
        rich_help_panel=SCALE,
        min=1,
    ),
]

# ---------------------------------------------------------------- tracking and output

TrackingUri = Annotated[
    str | None,
    _option("MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).", RUN),
]
Experiment = Annotated[str | None, _option("MLflow experiment (default: cifarexp-COMMAND).", RUN)]
Quiet = Annotated[
    bool,
    _option(
        "No progress: only the answer at the end (report and lab: only where the report is).",
        RUN,
    ),
]
SystemMetrics = Annotated[
    bool,
    _option(
        "Log MLflow's system metrics (CPU, memory, GPU use and memory, once a second) on "
        "training runs.",
        RUN,
        envvar=_env("system_metrics"),
    ),
]
RunName = Annotated[str | None, _option("MLflow run name.", RUN)]
Resume = Annotated[
    bool,
    _option(
        "Continue the previous run with the same settings if it did not finish: reuse its "
        "finished variants, run the rest.",
        RUN,
    ),
]
Profile = Annotated[
    bool,
    _option(
        "After the timed epochs, profile a few more training steps of the run (torch.profiler): "
        "a trace, the top operators and kernels, the step's split (data wait, host, copies, "
        "compute, communication) and a verdict on what bounds the run (its epochs' wait for "
        "data, the step's device timeline), logged on the run.",
        RUN,
        envvar=_env("profile"),
    ),
    Sets("profile"),
]
Out = Annotated[Path, _option("Folder for report.md, the CSVs and the PNGs.", RUN)]
Runs = Annotated[
    str | None,
    _option(
        "Use these runs instead of the latest finished ones, e.g. C3=<run id>,C6=<run id> "
        "(items: C2, C3, C5, C5-scaling, C6, C7, Q1-Q4).",
        RUN,
    ),
]
Json = Annotated[bool, _option("Print only the answers, as JSON.", RUN, "--json")]
Port = Annotated[
    int | None,
    _option("Port of the MLflow UI on 127.0.0.1 (default: 5000 if free, else a free one).", RUN,
            min=1, max=65535),
]  # fmt: skip

# ---------------------------------------------------------------- what a command varies

WorkerCounts = Annotated[
    str,
    _option(
        "Worker counts to run, e.g. 0,4,8,12; auto: 1 (for C4), then 0, 4, 8, ... (and the "
        "CPU count between them: 2 on 2 CPUs) until data-loading time stops falling by more "
        f"than {WORKERS_TOLERANCE:.0%}.",
        DATA,
        "--workers",
    ),
]
GpuLoaderRow = Annotated[
    bool | None,
    _option(
        "Add a row with the data kept on the device (--loader gpu), to compare with every "
        "worker count. Default: on when training on CUDA.",
        DATA,
    ),
]
Devices = Annotated[
    str | None,
    _option("Devices to compare, e.g. cpu,cuda (default: cpu, plus cuda when present).", TRAINING),
]
CpuBatches = Annotated[
    int | None,
    _option(
        "On CPU time only the first N batches of each epoch and estimate the epoch from their "
        "throughput (marked estimated).",
        TRAINING,
    ),
]
Gpus = Annotated[
    str | None,
    _option(
        "Compare GPU counts instead, e.g. 1,2,4 (must include 1, the baseline): data-parallel "
        "training, one torchrun process per GPU. With --devices cpu: CPU processes (gloo). Add "
        "--persistent-workers --pin-memory to measure DDP, not the workers' start-up that "
        "every epoch of every process pays.",
        SCALE,
    ),
]
Scalings = Annotated[
    str,
    _option(
        "With --gpus: weak (--batch-size per GPU), strong (--batch-size in total, split), or "
        "weak,strong (both).",
        SCALE,
        "--scaling",
    ),
]
Optimizers = Annotated[
    str, _option(f"Optimizers, comma-separated: any of {', '.join(OPTIMIZERS)}.", TRAINING)
]
Baseline = Annotated[bool, _option("Also train the BN model with the same settings.", TRAINING)]
BatchNorm = Annotated[
    bool,
    _option(
        "The BN model or the BN-free one.", TRAINING, "--bn/--no-bn", envvar=_env("batch_norm")
    ),
]


PresetName = Annotated[
    Preset,
    _option(
        f"full: the study's sizes ({preset_text('full')}); quick: a few minutes on a 2-core "
        f"CPU ({preset_text('quick')}).",
        TRAINING,
        "--preset",
    ),
]
BaselineSource = Annotated[
    str,
    _option(
        "The study to compare yours with: another tracking store (sqlite:///other.db, its "
        "latest finished runs), an experiment of this store, or run ids (comma-separated).",
        RUN,
        "--baseline",
    ),
]
FailIfSlower = Annotated[
    str | None,
    _option(
        "Exit 1, with a line for each, if a time is slower than the baseline's by more than "
        "this percentage (e.g. 5%) and beyond the spread of both sides' epochs.",
        RUN,
        "--fail-if-slower",
    ),
]
CompareOut = Annotated[
    Path, _option("Folder for compare.md, comparison.csv and the plots.", RUN, "--out")
]
