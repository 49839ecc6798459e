"""A wall-clock budget for a search (``--hours`` / ``--timeout``), honoured inside trials too.

Optuna's ``timeout`` is checked only between trials (optuna issue #3009), so a six-hour budget
can end eight hours later. Here no trial starts that the study's own record says cannot finish
in the time left (the median duration of its complete trials), and at the deadline the running
trial stops at its next epoch boundary: it is marked FAIL with the reason ``time budget`` and
queued for retry, so a rerun with more time resumes it from its finished folds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from search.stage import search_trials

#: The ``error`` user attr of a trial stopped by the budget.
TIME_BUDGET = "time budget"


class TimeBudgetExceeded(Exception):
    """The deadline passed while a trial was training (raised at an epoch boundary)."""


@dataclass(frozen=True)
class Budget:
    """Seconds since the epoch (``time.time()``) by which the search must have stopped."""

    deadline: float

    @classmethod
    def of(cls, seconds: float | None) -> Budget | None:
        return None if seconds is None else cls(time.time() + seconds)

    def left(self) -> float:
        return self.deadline - time.time()

    def check(self) -> None:
        """Raise ``TimeBudgetExceeded`` once the deadline has passed (called per epoch)."""
        if self.left() <= 0:
            raise TimeBudgetExceeded(TIME_BUDGET)

    def expected_trial_s(self, study: optuna.Study) -> float:
        """Median wall time of the study's complete search trials (0 when none has finished yet;
        final-stage trials train longer and are not what a search starts next)."""
        done = [(t.datetime_complete - t.datetime_start).total_seconds()
                for t in search_trials(study, (TrialState.COMPLETE,))
                if t.datetime_start and t.datetime_complete]
        return statistics.median(done) if done else 0.0

    def can_start(self, study: optuna.Study) -> bool:
        """Whether a new trial is expected to finish before the deadline."""
        left = self.left()
        return left > 0 and left >= self.expected_trial_s(study)
