"""A run for tests/test_distributed.py to start under torchrun, with what the CLI does not
offer: a BN-free model (for exact comparisons) and a rank that crashes.

python -m torch.distributed.run --nproc-per-node 2 -m tests.ddp_entry
"""

from __future__ import annotations

from cifarexp import processes
from cifarexp.study import runs
from cifarexp.study.catalogue import Labels
from cifarexp.study.session import Session
from cifarexp.tracking import Tracker
from cifarexp.training import engine
from cifarexp.training.distributed import world_from_environment
from tests.conftest import TINY

# Rank 1 crashes as this epoch starts: the epochs before it are finished by both ranks.
CRASH_EPOCH = 3
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
    epochs=CRASH_EPOCH,
)


def crash_in(epoch_to_crash: int, train_one_epoch):
    def train(*args, epoch, **kwargs):
        if epoch == epoch_to_crash:
            raise RuntimeError("rank 1 crashed")
        return train_one_epoch(*args, epoch=epoch, **kwargs)

    return train


def main() -> None:
    processes.handle_stops(under_torchrun=True)  # as cifarexp.cli.main does
    world = world_from_environment("cpu")
    if world.rank == 1:
        engine.train_one_epoch = crash_in(CRASH_EPOCH, engine.train_one_epoch)
    session = Session(Tracker.open(None, world), experiment="ddp")
    runs.run_training(STRONG, Labels("time", "C2"), session)


if __name__ == "__main__":
    main()
