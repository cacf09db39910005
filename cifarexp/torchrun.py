"""torchrun's launcher (torch.distributed.run) as cifarexp runs it (`processes.launch`,
`processes.relaunch`): the same launcher, but a stop that reaches it, which it passes on to
every rank before it ends, ends it with 128 + the signal's number and not with a traceback
of its own above the ranks' one-line messages."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
