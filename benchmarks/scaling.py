"""Weak/strong scaling of `cifarexp time` under torchrun, read back from the store (issue 8).

Run the `time` runs first (see benchmarks/gpu_study.sh part `scaling`), then:

    python benchmarks/scaling.py

Prints, per scaling mode and process count, the median epoch time of epochs 2..N, the
job's images/s, the speedup in images/s against 1 process and the scaling efficiency.
"""

from __future__ import annotations

from cifarexp import tracking


def main() -> None:
    tracking.use_store(None)
    runs = tracking.search_runs(
        tracking.tag_filter({tracking.COMMAND: "time"}) + " and attributes.status = 'FINISHED'"
    )
    rows = []
    for run in runs.to_dict("records"):
        history = tracking.metric_history(run["run_id"], ["epoch_time_s", "images_per_s"])
        later = history[history["step"] > 1] if len(history) > 1 else history
        rows.append((
            run.get("params.scaling", "weak"), int(run.get("params.world_size") or 1),
            later["epoch_time_s"].median(), later["images_per_s"].median(),
        ))  # fmt: skip
    print(f"{'scaling':>8} {'procs':>5} {'epoch s':>8} {'images/s':>9} {'speedup':>8} {'eff.':>6}")
    # one process is the same run for both modes: the newest one is the baseline of both
    single = next(((t, ips) for _, procs, t, ips in rows if procs == 1), None)
    for scaling in ("weak", "strong"):
        chosen = {procs: (t, ips) for s, procs, t, ips in reversed(rows) if s == scaling}
        if single is not None:
            chosen[1] = single
        base = chosen.get(1)
        for procs, (epoch_s, ips) in sorted(chosen.items()):
            speedup = ips / base[1] if base else float("nan")
            print(
                f"{scaling:>8} {procs:>5} {epoch_s:>8.2f} {ips:>9.0f} {speedup:>8.2f} "
                f"{speedup / procs:>6.0%}"
            )


if __name__ == "__main__":
    main()
