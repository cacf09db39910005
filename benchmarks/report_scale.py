"""How does `cifarexp report` scale with the store?

Fills a temporary sqlite store with studies of realistic shape (params, tags, per-epoch
histories; logged directly, no training) and times building and writing the report at
100, 250 and 500 runs. Target: under 10 s at 500 runs, growing no worse than linearly.

    python benchmarks/report_scale.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fake_runs import log_study  # noqa: E402  (beside this script)

from analysis import report  # noqa: E402
from cifarexp.tracking import Tracker  # noqa: E402


def count_runs(client: MlflowClient) -> int:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, max_results=50_000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,250,500", help="run counts to time at")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    uri = Tracker.open(f"sqlite:///{folder}/mlflow.db").uri
    client = MlflowClient(uri)
    print(f"{'runs':>6} {'report s':>9} {'s per 100 runs':>15}")
    for target in map(int, args.sizes.split(",")):
        while count_runs(client) < target:
            log_study(client)
        start = time.perf_counter()
        report.write_report(report.build_report(), folder / "report", uri)
        seconds = time.perf_counter() - start
        runs = count_runs(client)
        print(f"{runs:>6} {seconds:>9.2f} {100 * seconds / runs:>15.3f}")


if __name__ == "__main__":
    main()
