"""What a store holds, by name: per run, its param, tag and metric names (values left out).

Two stores written by the same commands, before and after a change of code, should hold
the same names (a refactoring changes no name):

    python benchmarks/store_names.py dump sqlite:///before.db > before.json
    python benchmarks/store_names.py dump sqlite:///after.db > after.json
    python benchmarks/store_names.py compare before.json after.json

A run is keyed by its experiment, command, exercise and variant (ids and times differ
between any two stores); `compare` prints what one store has and the other lacks, and
exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

# Tags whose presence depends on the machine or the moment, not on the code.
MACHINE_TAGS = (
    "mlflow.source.git.commit",
    "mlflow.source.git.branch",  # set in a checkout on a branch, not on a detached HEAD
    "mlflow.gitRepoURL",
    "mlflow.source.git.repoURL",
)


def names(uri: str) -> dict[str, dict[str, list[str]]]:
    """Run key -> {"params": [...], "tags": [...], "metrics": [...]}, every list sorted."""
    client = MlflowClient(uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    found: dict[str, dict[str, list[str]]] = {}
    for run in client.search_runs(list(experiments), max_results=50_000):
        tags = run.data.tags
        key = " / ".join(
            [
                experiments[run.info.experiment_id],
                tags.get("cifarexp.command", "?"),
                tags.get("cifarexp.exercise", "?"),
                tags.get("cifarexp.variant", ""),
            ]
        )
        found[key] = {
            "params": sorted(run.data.params),
            "tags": sorted(t for t in tags if t not in MACHINE_TAGS),
            "metrics": sorted(run.data.metrics),
        }
    return dict(sorted(found.items()))


def compare(before: dict, after: dict) -> list[str]:
    """One line per difference: a run, or a name of a run, in one store and not the other."""
    lines = []
    for key in sorted(before.keys() - after.keys()):
        lines.append(f"only before: run {key}")
    for key in sorted(after.keys() - before.keys()):
        lines.append(f"only after:  run {key}")
    for key in sorted(before.keys() & after.keys()):
        for kind in ("params", "tags", "metrics"):
            old, new = set(before[key][kind]), set(after[key][kind])
            lines += [f"only before: {key}: {kind[:-1]} {n}" for n in sorted(old - new)]
            lines += [f"only after:  {key}: {kind[:-1]} {n}" for n in sorted(new - old)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("dump").add_argument("uri", help="tracking URI, e.g. sqlite:///mlflow.db")
    compared = sub.add_parser("compare")
    compared.add_argument("before", type=Path)
    compared.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.action == "dump":
        json.dump(names(args.uri), sys.stdout, indent=1)
        return
    differences = compare(*(json.loads(p.read_text()) for p in (args.before, args.after)))
    print("\n".join(differences) or "the same names in both stores")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
