"""Does the quick study learn on every seed? `cifarexp lab --preset quick` for seeds 0, 1, 2
(each into its own store), then per seed every SGD/Nesterov run with BatchNorm that trains
whole epochs: its final training accuracy and whether its loss fell after epoch 1 without
jumping above twice its first value; and the study's shapes (BN ahead of no-BN, Adam behind
SGD, Adadelta ahead of SGD).

    python benchmarks/quick_seeds.py [--seeds 0,1,2] [--keep DIR]

Target: every such run at >= 40% with its loss falling, every shape held, for every seed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

TARGET_ACC = 0.40


def learning_runs(client: MlflowClient) -> list[tuple[str, list[float], list[float]]]:
    """(name, losses, accuracies) of each BN run with SGD or Nesterov over whole epochs."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = []
    for run in client.search_runs(experiments, "attributes.status = 'FINISHED'"):
        p = run.data.params
        whole = p.get("max_batches") == "all" and p.get("batch_norm") == "True"
        if not whole or p.get("optimizer") not in ("sgd", "nesterov") or "epochs" not in p:
            continue
        if run.data.tags.get("cifarexp.exercise") == "C3":  # one epoch per worker count
            continue
        history = {
            key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                          key=lambda m: m.step)]
            for key in ("train_loss", "train_acc")
        }  # fmt: skip
        tags = run.data.tags
        name = f"{tags['cifarexp.exercise']} {tags.get('cifarexp.variant') or run.info.run_name}"
        found.append((name, history["train_loss"], history["train_acc"]))
    return sorted(found)


def shapes(client: MlflowClient) -> dict[str, bool]:
    """The study's shapes, from the final_acc of the C6 and C7 children (by variant value:
    sgd, adam, ..., bn, no-bn)."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    final: dict[str, float] = {}
    for run in client.search_runs(experiments, "attributes.status = 'FINISHED'"):
        tags = run.data.tags
        if tags.get("cifarexp.exercise") in ("C6", "C7") and tags.get("cifarexp.variant"):
            final[tags["cifarexp.variant"].partition("=")[2]] = run.data.metrics["final_acc"]
    return {
        "BN ahead of no-BN": final["bn"] > final["no-bn"],
        "Adam behind SGD": final["adam"] < final["sgd"],
        "Adadelta ahead of SGD": final["adadelta"] > final["sgd"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--keep", type=Path, help="keep the stores here (default: a temp dir)")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    failed = False
    for seed in map(int, args.seeds.split(",")):
        uri = f"sqlite:///{folder / f'seed{seed}.db'}"
        command = [sys.executable, "-m", "cifarexp", "lab", "--preset", "quick", "--dataset",
                   "synthetic", "--seed", str(seed), "--tracking-uri", uri, "--out",
                   str(folder / f"report{seed}"), "--quiet"]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(f"seed {seed}: lab failed ({done.returncode})\n{done.stderr[-2000:]}")
            return 1
        client = MlflowClient(uri)
        print(f"seed {seed} (lab {seconds:.0f} s):")
        for name, losses, accs in learning_runs(client):
            falls = losses[-1] < losses[0] and max(losses) <= 2 * losses[0]
            ok = accs[-1] >= TARGET_ACC and falls
            failed |= not ok
            trace = " ".join(f"{loss:.2f}" for loss in losses)
            print(
                f"  {name:<24} final acc {accs[-1]:6.1%}  loss {trace}  {'ok' if ok else 'NOT ok'}"
            )
        for shape, held in shapes(client).items():
            failed |= not held
            print(f"  {shape}: {'held' if held else 'NOT held'}")
    print(f"stores in {folder}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
