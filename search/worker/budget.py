"""A wall-clock budget for a search (``--hours`` / ``--timeout``), honoured inside trials too.

Optuna's ``timeout`` is checked only between trials (optuna issue #3009), so a six-hour budget
can end eight hours later. Here no trial starts that the study's own record says cannot finish
in the time left (the median duration of its complete trials), and at the deadline the running
trial stops at its next epoch boundary: it is marked FAIL with the reason ``time budget`` and
queued for retry, so a rerun with more time resumes it from its finished folds.

The final stage's time is kept (``final_configs`` final trials, each ``final_factor`` search
trials long, less those already complete): a search trial starts only when it fits in the time
left after that reserve, so the best configurations get trained well before the deadline, not
never (``search.run --hours``: search, then the final stage, then more search in what is left).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from search.worker.stage import FINAL, SEARCH, final_trials, search_trials

#: The ``error`` user attr of a trial stopped by the budget.
TIME_BUDGET = "time budget"


class TimeBudgetExceeded(Exception):
    """The deadline passed while a trial was training (raised at an epoch boundary)."""


@dataclass(frozen=True)
class Budget:
    """Seconds since the epoch (``time.time()``) by which the search must have stopped."""

    deadline: float
    final_configs: int = 0  # final trials the search keeps time for (0: none)
    final_factor: float = 1.0  # a final trial's length in search trials (its epochs / theirs)

    @classmethod
    def of(cls, seconds: float | None, final_configs: int = 0,
           final_factor: float = 1.0) -> Budget | None:
        return None if seconds is None else cls(time.time() + seconds, final_configs,
                                                final_factor)

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

    def final_trial_s(self, study: optuna.Study) -> float:
        """Expected wall time of one final trial: ``final_factor`` median search trials."""
        return self.final_factor * self.expected_trial_s(study)

    def reserve_s(self, study: optuna.Study) -> float:
        """Time kept for the final trials not yet complete."""
        done = len(final_trials(study, (TrialState.COMPLETE,)))
        return max(self.final_configs - done, 0) * self.final_trial_s(study)

    def can_start(self, study: optuna.Study, stage: str = SEARCH) -> bool:
        """Whether a new trial of ``stage`` is expected to finish before the deadline (a search
        trial: before the final stage's reserve)."""
        left = self.left()
        if stage == FINAL:
            return left > 0 and left >= self.final_trial_s(study)
        return left > 0 and left - self.reserve_s(study) >= self.expected_trial_s(study)
