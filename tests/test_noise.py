"""Timings that say when they cannot be trusted: the CPU other processes used per epoch, the
disturbed-timing flag, each timing's range over its epochs, and differences within noise."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from analysis import queries, report, tables
from analysis.folder import markdown_table
from benchmarks.fake_runs import epoch, log_run
from cifarexp import tracking
from cifarexp.config import EPOCH_SPREAD_TOLERANCE, OTHER_CPU_SHARE
from cifarexp.study import runs
from cifarexp.training import noise
from cifarexp.training.engine import EpochResult
from tests.conftest import TINY_ARGS, all_runs


@pytest.fixture
def cpu_burner():
    """A process that keeps one CPU busy, outside this process tree (the process that
    started it has exited), killed after the test."""
    burn = "while True: pass"
    start = (  # the burner's output goes nowhere: the pipe read here ends with its starter
        "import subprocess as s, sys; print(s.Popen([sys.executable, '-c', "
        f"{burn!r}], stdin=s.DEVNULL, stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"
    )
    started = subprocess.run(
        [sys.executable, "-c", start], capture_output=True, text=True, timeout=60, check=True
    )
    pid = int(started.stdout)
    try:
        assert pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        burner, deadline = psutil.Process(pid), time.monotonic() + 30
        while burner.cpu_times().user < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)  # started: Python's start-up is behind it, the loop burns
        yield pid
    finally:
        os.kill(pid, signal.SIGKILL)


def limits(monkeypatch, *, other_cpus: float, spread: float) -> None:
    """The thresholds of the flag, as the test sets them (never the machine's luck)."""
    monkeypatch.setattr(noise, "OTHER_CPU_SHARE", other_cpus)
    monkeypatch.setattr(noise, "EPOCH_SPREAD_TOLERANCE", spread)


def test_a_cpu_burner_beside_a_tiny_run_is_measured_and_flags_its_timing(
    cli, client, monkeypatch, cpu_burner
):
    # Given a process burning a CPU beside the run, and a flag raised where other processes
    # keep a fifth of the CPUs busy (0.4 of this machine's 2)
    limits(monkeypatch, other_cpus=0.2, spread=1e9)
    # When a tiny run trains two epochs
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    # Then each epoch logged the CPUs other processes used: the burner's one at least half
    # (it shares the 2 cores with the run and, under xdist, the other worker's tests)
    [run] = all_runs(client)
    history = client.get_metric_history(run.info.run_id, "other_cpu_load_cpus")
    assert [m.step for m in history] == [1, 2]
    assert all(m.value >= 0.5 for m in history), [m.value for m in history]
    # and the run says its timing was disturbed: tag, terminal, description
    reason = run.data.tags[tracking.TIMING_DISTURBED]
    assert reason.startswith("other processes used ") and reason.endswith(" CPUs")
    assert f"Timings disturbed: {reason}." in " ".join(result.output.split())
    assert f"Timings disturbed: {reason}." in run.data.tags[tracking.NOTE]


def test_a_quiet_run_is_not_flagged(cli, client, monkeypatch):
    # Given thresholds no load reaches
    limits(monkeypatch, other_cpus=1e9, spread=1e9)
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    # Then the load is still logged per epoch, and nothing says the timing was disturbed
    [run] = all_runs(client)
    history = client.get_metric_history(run.info.run_id, "other_cpu_load_cpus")
    assert [m.step for m in history] == [1, 2] and all(m.value >= 0 for m in history)
    assert tracking.TIMING_DISTURBED not in run.data.tags
    assert "disturbed" not in result.output and "disturbed" not in run.data.tags[tracking.NOTE]


def fake_reader(other_cpus: float, own_cpus: float = 0.4):
    """CPU times that advance by one second of wall clock per reading, in which other
    processes use `other_cpus` CPUs and this process tree `own_cpus`."""
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}

    def read() -> noise.CpuTimes:
        clock["wall"] += 1.0
        clock["busy"] += other_cpus + own_cpus
        clock["own"] += own_cpus
        return noise.CpuTimes(clock["wall"], clock["busy"], clock["own"])

    return lambda *, whole_job=False: read


def test_other_processes_on_most_cpus_flag_the_run_with_their_load(cli, client, monkeypatch):
    # Given a 2-CPU machine whose other processes use 1.6 CPUs during every epoch
    monkeypatch.setattr(noise, "cpu_reader", fake_reader(1.6))
    monkeypatch.setattr(runs, "cpu_count", lambda: 2)
    limits(monkeypatch, other_cpus=OTHER_CPU_SHARE, spread=1e9)  # the tiny epochs' spread aside
    result = cli("time", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    # Then each epoch logged 1.6 CPUs (not counting this process tree's 0.4), and the run
    # says, with the study's default threshold (a quarter of the CPUs), why it is disturbed
    [run] = all_runs(client)
    history = client.get_metric_history(run.info.run_id, "other_cpu_load_cpus")
    assert [m.value for m in history] == pytest.approx([1.6, 1.6])
    assert run.data.tags[tracking.TIMING_DISTURBED] == "other processes used 1.6 of 2 CPUs"
    assert "Timings disturbed: other processes used 1.6 of 2 CPUs." in result.output


def results(times: list[float], loads: list[float | None]) -> list[EpochResult]:
    return [
        EpochResult(i + 1, 0.1, t - 0.2, t, 1.0, 0.5, 32, other_cpu_load_cpus=load)
        for i, (t, load) in enumerate(zip(times, loads, strict=True))
    ]


def test_the_flag_says_which_threshold_a_run_crossed(monkeypatch):
    limits(monkeypatch, other_cpus=OTHER_CPU_SHARE, spread=EPOCH_SPREAD_TOLERANCE)
    # other processes over a quarter of the CPUs on average (weighted by epoch time)
    assert noise.disturbance(results([10, 10], [0.2, 0.5]), 2) is None  # 0.35 of 2
    assert noise.disturbance(results([10, 30], [0.2, 0.7]), 2) == (
        "other processes used 0.6 of 2 CPUs; its epoch times varied by 100% (10.00–30.00 s)"
    )
    # epoch times varying over 25% of their median, over 2 epochs or more
    assert noise.disturbance(results([10, 12, 10], [None] * 3), 2) is None  # 20%
    assert noise.disturbance(results([10, 14, 10], [None] * 3), 2) == (
        "its epoch times varied by 40% (10.00–14.00 s)"
    )
    assert noise.disturbance(results([10], [None]), 2) is None  # one epoch: no spread


def test_the_load_is_what_other_processes_used_never_negative():
    meter = noise.OtherLoad(fake_reader(1.5)())
    assert meter.since(meter.start()) == pytest.approx(1.5)
    clock = iter([noise.CpuTimes(0, 10, 0), noise.CpuTimes(0, 10, 0), noise.CpuTimes(2, 11, 3)])
    meter = noise.OtherLoad(lambda: next(clock))  # this tree counted more than the CPUs
    assert meter.since(meter.start()) == 0.0


def sweep(
    times: dict[int, list[tuple[float, float, float]]], disturbed: tuple[int, ...] = ()
) -> queries.Exercise:
    """A hand-made sweep: workers -> its epochs' (data-loading, training, total) seconds;
    the counts in `disturbed` tagged so."""
    ids = [f"r{w}" for w in times]
    runs_ = pd.DataFrame(
        {"run_id": ids, "params.workers": [str(w) for w in times], "params.loader": "torch",
         f"tags.{tracking.VARIANT}": [f"workers={w}" for w in times],
         f"tags.{tracking.TIMING_DISTURBED}": [
             "other processes used 1.6 of 2 CPUs" if w in disturbed else None for w in times]}
    )  # fmt: skip
    epochs = pd.DataFrame(
        [
            {"run_id": f"r{w}", "variant": f"workers={w}", "epoch": i + 1, "data_time_s": d,
             "train_time_s": t, "epoch_time_s": total}
            for w, per_epoch in times.items()
            for i, (d, t, total) in enumerate(per_epoch)
        ]
    )  # fmt: skip
    return queries.Exercise("C3", pd.Series({"run_id": "parent"}), runs_, epochs)


def test_c3_shows_each_timing_as_its_median_with_its_range_in_numeric_columns():
    c3 = tables.c3_workers(sweep({0: [(3.0, 4.0, 7.0), (2.0, 4.0, 6.2), (2.6, 4.0, 6.6)],
                                  1: [(1.0, 4.0, 5.0)]}))  # fmt: skip
    row = c3.iloc[0]
    assert (row["data-loading s"], row["data-loading s min"], row["data-loading s max"]) == (
        pytest.approx(2.6), 2.0, 3.0,
    )  # fmt: skip
    spread = [f"{name} {end}" for name in ("data-loading s", "training s", "total s")
              for end in ("min", "max")]  # fmt: skip
    assert all(pd.api.types.is_numeric_dtype(c3[c]) for c in spread)
    # the markdown (as the terminal) shows the median and its range as one, one epoch alone
    shown = markdown_table(c3)
    assert "| 2.60 (2.00–3.00) |" in shown and "| 1.00 |" in shown and " min |" not in shown


def test_c3_best_count_does_not_rank_counts_whose_epochs_overlap():
    # 8 workers wait less by their medians (0.9 s against 1.1 s), but 4's epochs overlap
    epochs = {4: [(0.9, 4.0, 5.0), (1.3, 4.0, 5.4)], 8: [(0.8, 4.0, 4.9), (1.0, 4.0, 5.1)],
              1: [(5.0, 4.0, 9.0), (5.2, 4.0, 9.2)]}  # fmt: skip
    assert tables.best_workers(tables.c3_workers(sweep(epochs))) == 4


def test_c4_says_a_shorter_epoch_of_disturbed_runs_is_within_noise():
    # the sweep: one epoch each on 2 CPUs under load, 52.8 s against 55.8 s
    epochs = {1: [(5.0, 50.0, 55.8)], 0: [(8.0, 44.0, 52.8)], 4: [(0.5, 54.0, 55.8)]}
    quiet = tables.c3_workers(sweep(epochs))
    assert list(tables.c4_one_vs_best(quiet)["workers"]) == ["1", "4 (best)", "0 (shortest epoch)"]
    loaded = tables.c3_workers(sweep(epochs, disturbed=(0, 1, 4)))
    assert list(loaded["disturbed"]) == ["yes", "yes", "yes"]
    assert list(tables.c4_one_vs_best(loaded)["workers"]) == ["1", "4 (best)"]
    text = tables.c4_explanation(loaded, "2")
    assert (
        "The shortest epoch, with 0 workers (52.80 s against 55.80 s with 4), is within noise"
        in (text)
    )
    assert "a run's timing was disturbed" in text and "Yet" not in text


def test_a_comparison_names_its_disturbed_variants_and_what_is_within_noise(client):
    # Given C6 with sgd's epochs overlapping adam's, adam's timing disturbed, adadelta slower
    e = client.create_experiment("compare-optim-noisy")
    parent = log_run(client, e, command="compare-optim", exercise="C6")
    for name, times, tags in (
        ("sgd", (5.0, 5.6), {}),
        ("adam", (5.4, 9.7), {tracking.TIMING_DISTURBED: "its epoch times varied by 57%"}),
        ("adadelta", (8.0, 8.1), {}),
    ):
        log_run(
            client, e, command="compare-optim", exercise="C6", variant=f"optimizer={name}",
            params={"optimizer": name}, parent_id=parent, tags=tags,
            epochs=[epoch(0.2, t, t + 0.5, 1.0, 0.5) for t in times],
        )  # fmt: skip
    section = report.summarize("C6", parent)
    # Then its notes (printed, in the report, on the parent) say both, and the parent's tag
    assert "Timings disturbed, optimizer=adam: its epoch times varied by 57%." in section.notes
    [within] = [note for note in section.notes if note.startswith("Within noise")]
    assert "optimizer=adam 7.55 s (5.40–9.70)" in within and "optimizer=sgd 5.30 s" in within
    assert "adadelta" not in within
    assert section.tags()[tracking.TIMING_DISTURBED] == (
        "optimizer=adam: its epoch times varied by 57%"
    )
    c6 = section.tables["c6_optimizers"]
    assert list(c6["training s/epoch min"]) == [5.0, 5.4, 8.0]
    assert list(c6["disturbed"]) == ["", "yes", ""]
