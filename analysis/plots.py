"""The study's plots as matplotlib Figures (no display needed, nothing shown or saved here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.tables import DATA, GPU_LOADER, TOTAL, TRAIN, worker_counts


def workers_curve(c3: pd.DataFrame, subtitle: str = "") -> Figure:
    """C3: data-loading time (top) and the epoch's total (bottom) against DataLoader workers,
    each on its own axis so that a wait of a second reads beside an epoch of a minute; the
    best count marked on the data-loading curve; the legend below the axes, never over a
    point."""
    counts = worker_counts(c3)
    fig = Figure(figsize=(7, 5.6), layout="constrained")
    data_ax, total_ax = fig.subplots(2, 1, sharex=True)
    data_ax.plot(counts["workers"], counts[DATA], "o-", label="data-loading")
    total_ax.plot(counts["workers"], counts[TOTAL], "s-", color="C1", label="epoch total")
    best = counts[counts["best"] == "yes"]
    data_ax.plot(best["workers"], best[DATA], "r*", markersize=16, label="best count")
    gpu = c3[c3["workers"] == GPU_LOADER]
    if not gpu.empty:
        total_ax.axhline(
            gpu[TOTAL].iloc[0], color="green", ls="--", label="epoch total, gpu loader"
        )
    data_ax.set(ylabel="data-loading s/epoch", ylim=(0, counts[DATA].max() * 1.15 or 1))
    top = max(counts[TOTAL].max(), gpu[TOTAL].max() if not gpu.empty else 0) * 1.15 or 1
    total_ax.set(xlabel="DataLoader workers", ylabel="total s/epoch", ylim=(0, top))
    total_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    data_ax.set_title(f"C3: data-loading time vs workers {subtitle}".strip())
    handles = [h for ax in (data_ax, total_ax) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles))
    return fig


def per_epoch_curves(epochs: pd.DataFrame, labels: dict[str, str], title: str) -> Figure:
    """Training loss and accuracy per epoch, one line per run (C6 optimizers, C7 BN)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for run_id, run in epochs.groupby("run_id", sort=False):
        label = labels.get(run_id, run_id)
        loss_ax.plot(run["epoch"], run["train_loss"], "o-", label=label)
        acc_ax.plot(run["epoch"], 100 * run["train_acc"], "o-", label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 training accuracy %", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.legend()
    fig.suptitle(title)
    return fig


def device_breakdown(c5: pd.DataFrame, subtitle: str = "") -> Figure:
    """C5: each device's average epoch, on a log axis where one is more than 10 times another
    (a CPU epoch is tens of times a GPU's), else on a linear one; each bar labelled with its
    total, data-loading and training times and the speedup."""
    fig = Figure(figsize=(7, 1.6 + 0.9 * len(c5)), layout="constrained")
    ax = fig.add_subplot()
    names = [f"{d}\n{e}" for d, e in zip(c5["device"], c5["estimated"], strict=True)]
    bars = ax.barh(names, c5["avg epoch s"], color=[f"C{i}" for i in range(len(c5))])
    speedups = c5.get("speedup vs cpu", pd.Series(1.0, index=c5.index)).fillna(1.0)
    labels = [
        f" {row['avg epoch s']:.2f} s"
        + (f", {speedup:.1f}x faster" if speedup > 1 else "")
        + f"\n data-loading {row[DATA]:.2f} s, training {row[TRAIN]:.2f} s"
        for (_, row), speedup in zip(c5.iterrows(), speedups, strict=True)
    ]
    ax.bar_label(bars, labels, fontsize=9)
    seconds = c5["avg epoch s"]
    if seconds.max() > 10 * seconds.min():  # a CPU beside a GPU: a log axis shows both
        ax.set_xscale("log")
        ax.set_xlim(seconds.min() / 4, seconds.max() * 60)  # room for the labels
        ax.set(xlabel="average seconds per epoch (log scale)")
    else:  # one device, or devices alike: a linear axis just past the data and its labels
        ax.set_xlim(0, seconds.max() * 2)
        ax.set(xlabel="average seconds per epoch")
    ax.invert_yaxis()
    ax.set_title(f"C5: epoch time per device {subtitle}".strip())
    return fig


def scaling_curve(c5: pd.DataFrame, subtitle: str = "") -> Figure:
    """C5 extended: speedup in images/s against GPUs, per scaling mode, and the ideal."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    base = c5[c5["GPUs"] == 1]
    for scaling in sorted(set(c5["scaling"]) - {"–"}):
        rows = pd.concat([base, c5[c5["scaling"] == scaling]])
        ax.plot(rows["GPUs"], rows["speedup"], "o-", label=f"{scaling} scaling")
    counts = sorted(set(c5["GPUs"]))
    ax.plot(counts, counts, "k--", lw=1, label="ideal")
    ax.set(xlabel="GPUs", ylabel="speedup in images/s vs 1 GPU", xticks=counts, ylim=(0, None))
    ax.set_title(f"C5: data-parallel scaling {subtitle}".strip())
    ax.legend()
    return fig


def profile_split(profiles: pd.DataFrame) -> Figure:
    """Profiles: each run's step split into its parts, one stacked horizontal bar per run
    (the first run at the top, named with what bounds it), the parts' shares written on them."""
    parts = [c for c in profiles.columns if c.endswith(" %")]
    fig = Figure(figsize=(10, 1.6 + 0.45 * len(profiles)), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(profiles))
    names = [f"{run}\n{bound}" for run, bound in profiles[["run", "bound"]].itertuples(index=False)]
    for part in parts:
        shares = profiles[part].fillna(0).to_numpy()  # percent
        bars = ax.barh(names, shares, left=left, label=part.removesuffix(" %"))
        labels = [f"{share:.0f}%" if share >= 5 else "" for share in shares]
        ax.bar_label(bars, labels=labels, label_type="center", fontsize=8)
        left += shares
    ax.invert_yaxis()
    ax.set(xlabel="% of a training step", xlim=(0, 100))
    ax.set_title("Profiles: where each profiled run's step goes")
    fig.legend(loc="outside lower center", ncol=len(parts))
    return fig
