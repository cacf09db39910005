"""Runs for tests/test_distributed.py to start under torchrun, with what the CLI does not
offer: a BN-free model (for exact comparisons), a rank that crashes, and each rank's shard.

python -m torch.distributed.run --nproc-per-node 2 -m tests.ddp_entry strong|crash|shards
"""

from __future__ import annotations

import sys
from pathlib import Path

from cifarexp import processes
from cifarexp.study import runs
from cifarexp.study.catalogue import Labels
from cifarexp.study.session import Session
from cifarexp.tracking import Tracker
from cifarexp.training import engine
from cifarexp.training.build import build_training
from cifarexp.training.distributed import world_from_environment
from tests.conftest import TINY

# One step of 8 images per epoch; the GPU loader's augmentation (on CPU tensors here) draws
# the same crops and flips for every position whatever the shard, so one process with batch
# 8 and two with 4 each train on exactly the same augmented images.
STRONG = TINY.replace(
    train_size=8,
    batch_size=8,
    loader="gpu",
    batch_norm=False,  # BN statistics are per rank under DDP: only BN-free maths is the same
    lr=0.01,
    scaling="strong",
)
CRASH = TINY.replace(train_size=16, batch_size=4)
SHARDS = TINY.replace(train_size=16, batch_size=4)


def crash_in_epoch_2(train_one_epoch):
    def train(*args, epoch, **kwargs):
        if epoch == 2:
            raise RuntimeError("rank 1 crashed")
        return train_one_epoch(*args, epoch=epoch, **kwargs)

    return train


def record_shards(folder: Path) -> None:
    """Each rank writes the sample indices of its loader's shard, a line per epoch."""
    world = world_from_environment("cpu")
    loader = build_training(SHARDS, world).loader
    with (folder / f"rank{world.rank}.txt").open("w") as record:
        for _ in range(2):
            iter(loader)  # one epoch: reshuffles the shard
            record.write(" ".join(map(str, loader.sampler)) + "\n")


def main(mode: str) -> None:
    processes.handle_stops(under_torchrun=True)  # as cifarexp.cli.main does
    world = world_from_environment("cpu")
    if mode == "shards":
        record_shards(Path.cwd())
        return
    if mode == "crash" and world.rank == 1:
        engine.train_one_epoch = crash_in_epoch_2(engine.train_one_epoch)
    session = Session(Tracker.open(None, world), experiment="ddp")
    cfg = STRONG if mode == "strong" else CRASH
    runs.run_training(cfg, Labels("time", "C2"), session)


if __name__ == "__main__":
    main(sys.argv[1])
