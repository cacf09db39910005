"""How fast the CLI answers: `cifarexp --help`, `cifarexp time --help` and a usage error,
each against a bare `python -c pass` (the interpreter's own start-up). Median of 5 runs.

    python benchmarks/help_time.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 5
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "cifarexp --help": [sys.executable, "-m", "cifarexp", "--help"],
    "cifarexp time --help": [sys.executable, "-m", "cifarexp", "time", "--help"],
    "cifarexp time --epochs x (usage error)": [
        sys.executable,
        "-m",
        "cifarexp",
        "time",
        "--epochs",
        "x",
    ],
}


def seconds(command: list[str]) -> float:
    """The median wall time of `command` over RUNS runs."""
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    bare = seconds(COMMANDS["python -c pass"])
    for name, command in COMMANDS.items():
        took = seconds(command)
        print(f"{name:40s} {took:6.3f} s  {took / bare:5.1f}x python -c pass")


if __name__ == "__main__":
    main()
