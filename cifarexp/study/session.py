"""What a command runs with besides its configs: its tracker, where its runs go, how their
progress shows, whether it resumes. The CLI opens one per command and passes it down."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cifarexp.config import TrainConfig
from cifarexp.tracking import Tracker, default_experiment

if TYPE_CHECKING:
    from cifarexp.training.engine import EpochResult
    from cifarexp.training.profiling import Profile

log = logging.getLogger(__name__)


class Display(Protocol):
    """What shows a run's progress: told of every batch and every finished epoch."""

    def on_batch(self, index: int, loss: float, acc: float) -> None: ...

    def on_epoch(self, result: EpochResult) -> None: ...

    def on_profile(self, profile: Profile) -> None: ...


# (label, epochs, batches per epoch) -> a context that shows the run's progress
Progress = Callable[[str, int, int], AbstractContextManager[Display]]


@dataclass(frozen=True)
class Session:
    """One command's tracker and settings for all of its runs."""

    tracker: Tracker
    experiment: str | None = None  # the user's --experiment, else each command's own
    progress: Progress | None = None  # None: no progress shown
    resume: bool = False  # a comparison reopens its unfinished run with the same settings
    # The lab's: config -> the run that finished training it; a comparison reuses such a
    # run for a variant with the same config instead of training it again. None: no reuse.
    finished: dict[TrainConfig, str] | None = None
    said: set[str] = field(default_factory=set, compare=False)  # notices given (`say_once`)

    def experiment_of(self, command: str) -> str:
        """The experiment a run of `command` goes into."""
        return self.experiment or default_experiment(command)

    def say_once(self, notice: str) -> None:
        """A notice on the terminal, once per command however many runs it concerns."""
        if notice not in self.said and self.tracker.writes:
            self.said.add(notice)
            log.info(notice)

    def show(self, label: str, epochs: int, batches: int) -> AbstractContextManager[Display]:
        """A run's progress display (a silent one without progress, or on a rank that does
        not write)."""
        if self.progress is None or not self.tracker.writes:
            return _silent()
        return self.progress(label, epochs, batches)


class _Silent:
    def on_batch(self, index: int, loss: float, acc: float) -> None:
        pass

    def on_epoch(self, result: EpochResult) -> None:
        pass

    def on_profile(self, profile: Profile) -> None:
        pass


@contextmanager
def _silent() -> Iterator[Display]:
    yield _Silent()
