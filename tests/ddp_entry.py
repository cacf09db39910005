"""A training run for tests/test_distributed.py to start under torchrun, with what the CLI
does not offer: a BN-free model (for exact comparisons) and a rank that crashes.

python -m torch.distributed.run --nproc-per-node 2 -m tests.ddp_entry strong|crash
"""

from __future__ import annotations

import os
import sys

from cifarexp import distributed, engine, jobs
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


def crash_in_epoch_2(train_one_epoch):
    def train(*args, epoch, **kwargs):
        if epoch == 2:
            raise RuntimeError("rank 1 crashed")
        return train_one_epoch(*args, epoch=epoch, **kwargs)

    return train


def main(mode: str) -> None:
    distributed.handle_stops()  # as cifarexp.cli.main does
    if mode == "crash" and os.environ["RANK"] == "1":
        engine.train_one_epoch = crash_in_epoch_2(engine.train_one_epoch)
    cfg = STRONG if mode == "strong" else CRASH
    jobs.run_training(cfg, jobs.Labels("time", "C2"), experiment="ddp", quiet=True)


if __name__ == "__main__":
    main(sys.argv[1])
