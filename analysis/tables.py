"""The study's tables, one per item, built from an Exercise's DataFrames (pure functions)."""

from __future__ import annotations

import pandas as pd

from analysis.noise import Timing, disturbed_column, spread
from analysis.queries import Exercise, run_settings
from cifarexp import tracking
from cifarexp.config import WORKERS_TOLERANCE, plural
from cifarexp.training import profiling

DATA, TRAIN, TOTAL = "data-loading s", "training s", "total s"
GPU_LOADER = "gpu loader"  # C3's row of a --loader gpu run
EPOCH_NOISE = 0.01  # a difference under 1% of the epoch is noise, however small the wait
TIMES = {"data_time_s": DATA, "train_time_s": TRAIN, "epoch_time_s": TOTAL}
ENERGY, POWER, EPOCH_J = "energy J", "power W", "J/epoch"  # where a counter measured them
ENERGY_VS_CPU = "energy vs cpu"  # the CPU's J/epoch over this device's
# One rule for units in every table, CSV and MLflow table: the column's name says the unit and
# the value is in it. Shares and accuracies are percentages (81.7 in a column ending " %"),
# never fractions; the metrics logged per epoch keep MLflow's fractions (train_acc 0-1).
ACCURACY, FINAL_ACCURACY = "accuracy %", "final accuracy %"
WAITING, EFFICIENCY = "waiting %", "efficiency %"
# C5: an estimated epoch's range, from its batches' fastest and slowest (engine.estimate_epoch)
ESTIMATE_LOW, ESTIMATE_HIGH = "estimate low s", "estimate high s"
C6_TIME = "training s/epoch"  # C6: the median over the epochs, with its min and max


def per_run_means(ex: Exercise, first_epoch: int = 1) -> pd.DataFrame:
    """Each measured run's metrics averaged over its epochs (from `first_epoch` on), with its
    params, in run order."""
    epochs = ex.epochs[ex.epochs["epoch"] >= first_epoch]
    means = epochs.drop(columns=["variant", "epoch"]).groupby("run_id", sort=False).mean()
    params = ex.runs.set_index("run_id")
    joined = params.join(means, how="inner")
    return joined.loc[[r for r in params.index if r in joined.index]].reset_index()


def measured(frame: pd.DataFrame, column: str) -> bool:
    """Whether `frame` has `column` with a value (energy: only where a counter measured it)."""
    return column in frame and bool(frame[column].notna().any())


def c2_epochs(ex: Exercise) -> pd.DataFrame:
    """C2: the untimed warm-up as its own line (when the run had one: its seconds as the
    total), one row per epoch (data-loading, training, total, energy and power where
    measured, loss, accuracy), then the epochs' totals (times and energy summed), means
    and, over 2 epochs or more, medians, which never include the warm-up."""
    names = {**TIMES, "energy_j": ENERGY, "power_w": POWER}
    frame = ex.epochs.rename(columns={**names, "train_loss": "loss", "train_acc": ACCURACY})
    frame[ACCURACY] = frame[ACCURACY] * 100
    energy = [c for c in (ENERGY, POWER) if measured(frame, c)]
    columns = ["epoch", DATA, TRAIN, TOTAL, *energy, "loss", ACCURACY]
    frame = frame[columns].astype({"epoch": object})
    total = {"epoch": "total", **frame[[DATA, TRAIN, TOTAL, *energy[:1]]].sum()}
    summary = [total, {"epoch": "mean", **frame.drop(columns="epoch").mean()}]
    if len(frame) > 1:
        summary.append({"epoch": "median", **frame.drop(columns="epoch").median()})
    warmup = ex.runs.get("metrics.warmup_s", pd.Series(dtype=float)).dropna()
    first = [{"epoch": "warm-up", TOTAL: warmup.iloc[0]}] if len(warmup) else []
    rows = [pd.DataFrame(first, columns=frame.columns), frame, pd.DataFrame(summary)]
    return pd.concat([r for r in rows if not r.empty], ignore_index=True)


def c3_workers(ex: Exercise) -> pd.DataFrame:
    """C3: per DataLoader worker count the epoch times (the median over the epochs, their
    min and max), the best count marked, the runs whose timing was disturbed marked; a
    `--loader gpu` run, if the sweep has one, as a last row for comparison."""
    runs = per_run_means(ex)
    is_gpu_loader = runs.get("params.loader", pd.Series("torch", index=runs.index)) == "gpu"
    times = spread(ex, TIMES).loc[runs["run_id"]].reset_index(drop=True)
    workers = [
        GPU_LOADER if gpu else int(w)
        for gpu, w in zip(is_gpu_loader, runs["params.workers"], strict=True)
    ]
    table = pd.concat([pd.DataFrame({"workers": workers}), times], axis=1)
    table = table.assign(**disturbed_column(ex, runs["run_id"]))
    counts = table[~is_gpu_loader].sort_values("workers")
    table["best"] = ""
    if not counts.empty:
        table.loc[smallest_within_noise(counts, DATA).name, "best"] = "yes"
    return pd.concat([table.loc[counts.index], table[is_gpu_loader]]).reset_index(drop=True)


def worker_counts(c3: pd.DataFrame) -> pd.DataFrame:
    """C3's rows of DataLoader worker counts (without the `--loader gpu` row)."""
    return c3[c3["workers"] != GPU_LOADER]


def smallest_within_noise(counts: pd.DataFrame, column: str) -> pd.Series:
    """The row of the smallest worker count whose `column` (seconds) is within noise of the
    lowest: less than WORKERS_TOLERANCE of it, or EPOCH_NOISE of that run's epoch, above it;
    or within the noise of their epochs (`noise.Timing.within_noise`). For data-loading
    time: where it stops falling (C3), ties going to the smaller count."""
    counts = worker_counts(counts).sort_values("workers")
    lowest = counts.loc[counts[column].idxmin()]
    noise = max(WORKERS_TOLERANCE * lowest[column], EPOCH_NOISE * lowest[TOTAL])
    close = [
        row[column] <= lowest[column] + noise
        or Timing.of(row, column).within_noise(Timing.of(lowest, column), WORKERS_TOLERANCE)
        is not None
        for _, row in counts.iterrows()
    ]
    return counts[close].iloc[0]


def shortest_epoch(c3: pd.DataFrame) -> int:
    """The worker count of the shortest epoch: the best count unless its epoch is longer
    beyond noise (the workers then cost the epoch more than they save of its wait)."""
    counts = worker_counts(c3)
    best = best_workers(c3)
    if shortest_within_noise(c3) is not None:
        return best
    return int(smallest_within_noise(counts, TOTAL)["workers"])


def shortest_within_noise(c3: pd.DataFrame) -> str | None:
    """Why the best count's epoch is as short as the shortest epoch but for noise, or None
    when it is longer beyond noise (`noise.Timing.within_noise`, WORKERS_TOLERANCE)."""
    counts = worker_counts(c3).set_index("workers", drop=False)
    best = counts.loc[best_workers(c3)]
    shortest = counts.loc[counts[TOTAL].idxmin()]
    return Timing.of(best, TOTAL).within_noise(Timing.of(shortest, TOTAL), WORKERS_TOLERANCE)


def best_workers(c3: pd.DataFrame) -> int:
    """The worker count marked best: where data-loading time stops falling."""
    return int(c3.loc[c3["best"] == "yes", "workers"].iloc[0])


def c4_one_vs_best(c3: pd.DataFrame) -> pd.DataFrame:
    """C4: 1 worker vs the best count, and the count of the shortest epoch where it is
    another one (rows in that order): data-loading vs computing time and the fraction of the
    epoch spent waiting for data; empty without a 1-worker run."""
    if not (c3["workers"] == 1).any():
        return pd.DataFrame()
    roles = {1: [], best_workers(c3): ["best"]}
    shortest, counts = shortest_epoch(c3), worker_counts(c3)
    best_epoch = counts.loc[counts["workers"] == best_workers(c3), TOTAL].iloc[0]
    if shortest != best_workers(c3) or best_epoch <= counts[TOTAL].min():  # else: noise
        roles.setdefault(shortest, []).append("shortest epoch")
    rows = c3.set_index("workers").loc[list(roles)].reset_index()
    table = rows[["workers", DATA, TRAIN, TOTAL]].rename(columns={TRAIN: "computing s"})
    table[WAITING] = 100 * table[DATA] / table[TOTAL]
    table["workers"] = [f"{w} ({', '.join(r)})" if r else str(w) for w, r in roles.items()]
    return table


def c4_explanation(c3: pd.DataFrame, cpus: str = "?") -> str:
    """Why the best count is what it is, in the measured numbers: 1 worker against it, and
    the workers' cost to training when the shortest epoch is at another count."""
    counts = worker_counts(c3).set_index("workers")
    if 1 not in counts.index:
        return "C4 needs a 1-worker run: run sweep-workers without --workers, or include 1."
    one, best = counts.loc[1], counts.loc[best_workers(c3)]
    fastest = counts.loc[shortest_epoch(c3)]
    text = (
        f"With 1 worker the device waited {one[DATA]:.2f} s per epoch for data "
        f"({one[DATA] / one[TOTAL]:.1%} of the {one[TOTAL]:.2f} s epoch) and computed for "
        f"{one[TRAIN]:.2f} s. "
    )
    if best.name == 0:
        text += (
            f"With 0 workers, each batch loaded in the main process, the device waited "
            f"{best[DATA]:.2f} s, no longer than with any count of workers beyond noise. A "
            f"batch is cheap to prepare here against its computation, so worker processes have "
            f"little to hide and cost their start-up. "
        )
    elif best.name == 1:
        text += "More workers did not cut the wait beyond noise. " + (
            "One worker already prepares the next batch while the device computes the "
            "current one, so more workers cannot shorten the wait. "
            if one[DATA] < one[TRAIN]
            else f"Even so the device waits longer than it computes: the {cpus} CPUs are the "
            "bottleneck, and keeping the data on the GPU (--loader gpu) removes it. "
        )
    else:
        text += (
            f"With {plural(best.name, 'worker')} the wait is {best[DATA]:.2f} s "
            f"({best[DATA] / best[TOTAL]:.1%} of {best[TOTAL]:.2f} s). Workers decode and "
            "augment batches in parallel while the device computes; "
        ) + (
            f"once they deliver batches faster than the device consumes them (here "
            f"{best[DATA]:.2f} s of waiting against {best[TRAIN]:.2f} s of computing), the "
            f"loader stops being the bottleneck, so further workers only add start-up time and "
            f"compete for the {cpus} CPUs. "
            if best[DATA] < best[TRAIN]
            else f"even the best count leaves the device waiting longer than it computes, so "
            f"the {cpus} CPUs are the bottleneck: keeping the data on the GPU (--loader gpu) "
            "removes it. "
        )
    shortest = counts.loc[counts[TOTAL].idxmin()]
    why = shortest_within_noise(c3)
    if shortest.name != best.name and why is not None:
        text += (
            f"The shortest epoch, with {shortest.name} workers ({shortest[TOTAL]:.2f} s against "
            f"{best[TOTAL]:.2f} s with {best.name}), is within noise of the best count's: "
            f"{why}. "
        )
    if fastest.name != best.name:
        more, fewer = (fastest, best) if fastest.name > best.name else (best, fastest)
        text += (
            f"Yet the shortest epoch was with {plural(fastest.name, 'worker')} "
            f"({fastest[TOTAL]:.2f} s against {best[TOTAL]:.2f} s with {best.name}): "
        ) + (
            f"the workers compete with training for the {cpus} CPUs, and computing took "
            f"{more[TRAIN]:.2f} s with {plural(more.name, 'worker')} against "
            f"{fewer[TRAIN]:.2f} s with {fewer.name}. To train on these CPUs, the epoch's "
            "count is the one to use."
            if more[TRAIN] > fewer[TRAIN]
            else "the data wait is not all a loader costs an epoch."
        )
    return text.strip()


def c5_devices(ex: Exercise) -> pd.DataFrame:
    """C5: average epoch time per device, estimated where only some batches ran (see
    `queries.epochs`), and the speedup against the CPU; where the devices' counters measured
    it, the energy of an epoch and how many times less of it than the CPU's."""
    runs = per_run_means(ex)
    partial = runs.get("partial_total_s", pd.Series(float("nan"), index=runs.index))
    table = pd.DataFrame(
        {
            "device": runs["params.device"],
            "device name": runs[f"tags.{tracking.TAG}device_name"],
            DATA: runs["data_time_s"],
            TRAIN: runs["train_time_s"],
            "avg epoch s": runs["epoch_time_s"],
            "estimated": ["estimated" if pd.notna(p) else "" for p in partial],
        }
    )
    if measured(runs, "estimate_low_s"):  # the estimate's range (see engine.estimate_epoch)
        table.insert(5, ESTIMATE_LOW, runs["estimate_low_s"])
        table.insert(6, ESTIMATE_HIGH, runs["estimate_high_s"])
    cpu = table.loc[table["device"] == "cpu", "avg epoch s"]
    if len(table) > 1:  # a speedup needs two devices
        table["speedup vs cpu"] = cpu.iloc[0] / table["avg epoch s"] if not cpu.empty else None
    if measured(runs, "energy_j"):
        table[EPOCH_J] = runs["energy_j"]
        cpu_j = table.loc[table["device"] == "cpu", EPOCH_J]
        table[ENERGY_VS_CPU] = cpu_j.iloc[0] / table[EPOCH_J] if not cpu_j.empty else None
    return table


# C5 extended counts the steady epochs: from this one on, where a run has so many (epoch 1
# holds cuDNN's autotuning and the workers' start on every GPU).
SCALING_STEADY_FROM = 2


def c5_scaling(ex: Exercise) -> pd.DataFrame:
    """C5 extended: per scaling mode and GPU count, the steady epoch (SCALING_STEADY_FROM),
    the slowest GPU's parts of it, the gradient communication backward did not hide,
    images/s, and the speedup (images/s against 1 GPU) and scaling efficiency (speedup /
    GPUs)."""
    first = SCALING_STEADY_FROM if ex.epochs["epoch"].max() >= SCALING_STEADY_FROM else 1
    runs = per_run_means(ex, first_epoch=first)
    steady = ex.epochs[ex.epochs["epoch"] >= first]
    images = (steady["images_per_s"] * steady["epoch_time_s"]).groupby(steady["run_id"]).sum()
    seconds = steady.groupby("run_id")["epoch_time_s"].sum()
    world_size = runs.get("params.world_size", pd.Series(index=runs.index, dtype=object))
    gpus = pd.to_numeric(world_size, errors="coerce").fillna(1).astype(int)  # 1: no DDP
    scaling = runs["params.scaling"].where(gpus > 1, "–")
    batch = runs["params.batch_size"].astype(int)
    table = pd.DataFrame(
        {
            "scaling": scaling,
            "GPUs": gpus,
            "batch/GPU": batch.where(scaling != "strong", batch // gpus),
            DATA: runs["data_time_s"],
            TRAIN: runs["train_time_s"],
            "comm s": runs.get("comm_time_s"),
            "epoch s": runs["epoch_time_s"],
            "images/s": (images / seconds).loc[runs["run_id"]].round().astype(int).to_numpy(),
        }
    )
    base = table.loc[table["GPUs"] == 1, "images/s"]
    table["speedup"] = table["images/s"] / base.iloc[0] if not base.empty else float("nan")
    table[EFFICIENCY] = 100 * table["speedup"] / table["GPUs"]
    mode = table["scaling"].map({"–": 0, "weak": 1, "strong": 2})
    return table.loc[table.assign(mode=mode).sort_values(["mode", "GPUs"]).index].reset_index(
        drop=True
    )


def c6_optimizers(ex: Exercise) -> pd.DataFrame:
    """C6: per optimizer the training time per epoch (the median over the epochs, their
    min and max), its energy where measured, the last epoch's loss and accuracy (the
    per-epoch values: `c6_per_epoch`); the runs whose timing was disturbed marked."""
    runs = per_run_means(ex)
    final = _last_epoch(ex, runs)
    times = spread(ex, {"train_time_s": C6_TIME}).loc[runs["run_id"]].reset_index(drop=True)
    energy = {EPOCH_J: runs["energy_j"]} if measured(runs, "energy_j") else {}
    table = pd.concat([runs[["params.optimizer"]].set_axis(["optimizer"], axis=1), times], axis=1)
    table = table.assign(
        **energy,
        **{"final loss": final["train_loss"], FINAL_ACCURACY: 100 * final["train_acc"]},
        **disturbed_column(ex, runs["run_id"]),
    )
    return table


def c6_per_epoch(ex: Exercise, metric: str) -> pd.DataFrame:
    """C6: `metric` (train_loss or train_acc) per optimizer (rows) and epoch (columns)."""
    runs = per_run_means(ex)
    wide = ex.epochs.pivot(index="run_id", columns="epoch", values=metric).loc[runs["run_id"]]
    if metric == "train_acc":
        wide = wide * 100
    name = "loss {}" if metric == "train_loss" else "accuracy {} %"
    wide.columns = [name.format(epoch) for epoch in wide.columns]
    return pd.concat(
        [runs[["params.optimizer"]].set_axis(["optimizer"], axis=1), wide.reset_index(drop=True)],
        axis=1,
    )


def c7_batch_norm(ex: Exercise) -> pd.DataFrame:
    """C7: the model with and without BatchNorm, average and final loss and accuracy."""
    runs = per_run_means(ex)
    final = _last_epoch(ex, runs)
    return pd.DataFrame(
        {
            "model": ["BN" if b == "True" else "no BN" for b in runs["params.batch_norm"]],
            "avg loss": runs["train_loss"],
            "avg accuracy %": 100 * runs["train_acc"],
            "final loss": final["train_loss"],
            FINAL_ACCURACY: 100 * final["train_acc"],
        }
    )


def _last_epoch(ex: Exercise, runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's metrics in its last epoch, in the order of `runs`."""
    last = ex.epochs.sort_values("epoch").groupby("run_id").last()
    return last.loc[runs["run_id"]].reset_index(drop=True)


def q1_q4_answers(answers: dict) -> pd.DataFrame:
    """Q1-Q4 from an inspect run's answers (`cifarexp.study.inspection`'s schema): one row per
    question and quantity."""
    convs, fc = answers["q1_conv_layers"], answers["q2_last_linear"]
    rows = [
        ("Q1", "convolutional layers", convs["total"]),
        ("Q1", "  in the stem", convs["stem"]),
        ("Q1", "  on the main path of the blocks", convs["main_path"]),
        ("Q1", "  in shortcut projections", convs["shortcut"]),
        ("Q2", "input dimension of the last linear layer", fc["in_features"]),
        ("Q3", "trainable parameters", answers["trainable_parameters"]["elements"]),
    ]
    for name, optimizer in answers["q3_q4_optimizers"].items():
        rows += [
            ("Q3", f"{name}: gradients after backward",
             optimizer["gradients_after_backward"]["elements"]),
            ("Q4", f"{name}: optimizer state elements", optimizer["state_total"]["elements"]),
            ("Q4", f"{name}: optimizer state MiB", optimizer["state_total"]["bytes"] / 2**20),
        ]  # fmt: skip
        rows += [
            ("Q4", f"{name}: keeps {key}", count["elements"])
            for key, count in sorted(optimizer["state"].items())
        ]
    # object: the counts stay integers beside the MiB (numbers, formatted only when shown)
    return pd.DataFrame(rows, columns=["item", "quantity", "value"], dtype=object)


def profile_label(run: pd.Series) -> str:
    """A profiled run as the study names it, short: its command and variant (but `time`),
    then how it trained where that differs from the study's defaults."""
    p = run_settings(run)
    name = " ".join(str(run.get(f"tags.{t}") or "") for t in (tracking.COMMAND, tracking.VARIANT))
    name = name.strip().removeprefix("time").strip()
    settings = ["loader=gpu"] if p.get("loader") == "gpu" else [f"workers={p.get('workers')}"]
    settings += [p[k] for k, study in (("precision", "fp32"), ("timing", "sync"))
                 if p.get(k, study) != study]  # fmt: skip
    if p.get("compile", "none") != "none":
        settings.append(f"compile {p['compile']}")
    settings += [k.replace("_", "-") for k in ("channels_last", "cuda_graph", "persistent_workers",
                 "pin_memory") if p.get(k) == "True"]  # fmt: skip
    if int(p.get("world_size") or 1) > 1:
        settings.append(f"{p['world_size']} processes")
    return f"{name}: {', '.join(settings)}" if name else ", ".join(settings)


def profiles(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per kind of profiled run (the newest of each label), oldest first: what bounds
    its step, the step's split (the parts it has, in profiling.PARTS' order), the profile's
    cost and its verdict."""
    table = pd.DataFrame(
        {
            "run": [profile_label(run) for _, run in runs.iterrows()],
            "device": runs[f"tags.{tracking.DEVICE}"],
            "bound": runs[f"tags.{tracking.VERDICT}"].str.partition(":")[0],
        }
    )
    for part in profiling.PARTS:
        metric = f"metrics.profile_{part}_share"
        if metric in runs and runs[metric].notna().any():
            table[f"{profiling.PART_NAMES[part]} %"] = 100 * runs[metric]
    table["profile s"] = runs["metrics.profile_s"]
    table["verdict"] = runs[f"tags.{tracking.VERDICT}"]
    table["run_id"] = runs["run_id"]
    return table.drop_duplicates("run").iloc[::-1].reset_index(drop=True)
