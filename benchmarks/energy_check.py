"""Each epoch's energy as the GPU's counter measured it (`energy_j`, NVML) against MLflow's
sampled power (`system/gpu_0_power_usage_watts`, once a second) integrated over the same
epochs: they should agree within about 10% over a run's epochs together (a second's
samples are coarse against one short epoch).

    python benchmarks/energy_check.py [--tracking-uri URI] [RUN_ID ...]

Without run ids: the 10 newest finished runs that have both. An epoch's window ends when its
metrics were logged and began `epoch_time_s` before (train without --eval, which runs
between the two); the samples are interpolated linearly over it. Prints per run and epoch
the counter's joules, the samples' and their ratio, then the epochs together.
"""

from __future__ import annotations

import argparse

import numpy as np
from mlflow.tracking import MlflowClient

POWER = "system/gpu_0_power_usage_watts"


def sampled_joules(times_s: np.ndarray, watts: np.ndarray, start: float, end: float) -> float:
    """The integral of the power samples over [start, end] s, linearly interpolated."""
    grid = np.linspace(start, end, 1000)
    return float(np.trapezoid(np.interp(grid, times_s, watts), grid))


def check(client: MlflowClient, run_id: str) -> list[tuple[int, float, float]]:
    """Per epoch: (epoch, counter J, sampled J); [] where the run lacks either."""
    history = {
        key: sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        for key in ("energy_j", "epoch_time_s", POWER)
    }
    if not history["energy_j"] or len(history[POWER]) < 2:
        return []
    samples = sorted(history[POWER], key=lambda m: m.timestamp)
    times_s = np.array([m.timestamp / 1000 for m in samples])
    watts = np.array([m.value for m in samples])
    rows = []
    for energy, seconds in zip(history["energy_j"], history["epoch_time_s"], strict=True):
        end = seconds.timestamp / 1000
        rows.append(
            (energy.step, energy.value, sampled_joules(times_s, watts, end - seconds.value, end))
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_ids", nargs="*")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    client = MlflowClient(args.tracking_uri)
    run_ids = args.run_ids
    if not run_ids:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            experiments,
            f"metrics.energy_j >= 0 and metrics.`{POWER}` >= 0 and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=10,
        )
        run_ids = [r.info.run_id for r in runs]
    for run_id in run_ids:
        run = client.get_run(run_id)
        rows = check(client, run_id)
        print(f"\n{run.info.run_name} ({run_id}), {run.data.tags.get('cifarexp.energy', '?')}")
        if not rows:
            print(f"  no energy_j or fewer than 2 samples of {POWER}")
            continue
        print(f"  {'epoch':>5}  {'counter J':>10}  {'sampled J':>10}  {'ratio':>6}")
        for epoch, counter, sampled in rows:
            print(f"  {epoch:>5}  {counter:>10.1f}  {sampled:>10.1f}  {sampled / counter:>6.3f}")
        counter, sampled = (sum(r[i] for r in rows) for i in (1, 2))
        print(f"  {'all':>5}  {counter:>10.1f}  {sampled:>10.1f}  {sampled / counter:>6.3f}")


if __name__ == "__main__":
    main()
