"""Search-stage and final-stage trials: which trials a search counts, claims and prunes against.

The final stage (``search.refit``) retrains the best configurations for more epochs as trials of
the same study, on the same folds, so their out-of-fold rows line up with every other trial's and
``search.ensemble`` can take them. Such a trial is not one of the search's:

- it never counts toward ``--trials`` (``search.worker.claims``, ``search.run``'s summary) and a
  search worker never claims it (only ``search.refit`` does);
- it is never pruned, and no pruner compares a search trial with it: its step
  ``fold * epochs + epoch`` counts other epochs, and a longer-trained trial is not the yardstick
  of a short one (``SearchOnlyPruner``);
- its epochs are its own (``EPOCHS_ATTR``), not the study's.

The mark is a set of user attrs written when the trial is enqueued, because a retry
(``RetryHeartbeatStaleTrialCallback``, the journal reaper) copies the dead trial's user attrs: a
retried final trial is still final, with the same epochs, and resumes its finished folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

STAGE_ATTR = "stage"  # user attr: "final" on a final-stage trial, absent on search trials
FINAL = "final"
SEARCH = "search"  # the stage of every trial without the mark
REFIT_OF_ATTR = "refit_of"  # user attr: the number of the search trial whose params it retrains
EPOCHS_ATTR = "refit_epochs"  # user attr: epochs per fold of this trial (the study has its own)


def is_final(trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether ``trial`` is a final-stage trial (made by ``search.refit``)."""
    return trial.user_attrs.get(STAGE_ATTR) == FINAL


def final_epochs(trial: FrozenTrial | optuna.Trial) -> int | None:
    """A final-stage trial's epochs per fold; None for a search trial (it has the study's)."""
    attrs = trial.user_attrs
    return int(attrs[EPOCHS_ATTR]) if attrs.get(STAGE_ATTR) == FINAL else None


def final_attrs(refit_of: int, epochs: int) -> dict[str, Any]:
    """The user attrs a final-stage trial is enqueued with."""
    return {STAGE_ATTR: FINAL, REFIT_OF_ATTR: int(refit_of), EPOCHS_ATTR: int(epochs)}


def best_first(trials: Sequence[FrozenTrial], maximize: bool = True) -> list[FrozenTrial]:
    """The complete trials among ``trials`` that have a value, best first (ties: the lower
    number): the one ranking of the ensemble, the final stage, retention and the tools after a
    search."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    sign = -1.0 if maximize else 1.0
    return sorted(done, key=lambda t: (sign * float(t.value), t.number))


def search_trials(study: optuna.Study,
                  states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
    """The study's search-stage trials in ``states`` (all states when None)."""
    return [t for t in study.get_trials(deepcopy=False, states=None if states is None
                                        else tuple(states)) if not is_final(t)]


def final_trials(study: optuna.Study,
                 states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
    """The study's final-stage trials in ``states`` (all states when None)."""
    return [t for t in study.get_trials(deepcopy=False, states=None if states is None
                                        else tuple(states)) if is_final(t)]


class _SearchView:
    """The study as a search trial's pruner should see it: every final-stage trial left out.

    Only what Optuna's pruners read is filtered (``get_trials``, ``trials``, ``best_trial``);
    everything else is the study's own.
    """

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True,
                   states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if not is_final(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    @property
    def best_trial(self) -> FrozenTrial:
        done = [t for t in self.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None]
        if not done:
            raise ValueError("no complete search-stage trial yet")
        sign = -1.0 if self._study.direction == StudyDirection.MAXIMIZE else 1.0
        return min(done, key=lambda t: (sign * float(cast(float, t.value)), t.number))


class SearchOnlyPruner(BasePruner):
    """``base`` judging search trials against search trials only; a final-stage trial is never
    pruned. For pruners that read other trials' intermediate values (median: the complete
    trials' values at the same step; wilcoxon: the best trial's): a final trial's steps count
    other epochs, and it would win "best trial" by having trained longer."""

    def __init__(self, base: BasePruner) -> None:
        self.base = base

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if is_final(trial):
            return False
        return self.base.prune(cast(optuna.Study, _SearchView(study)), trial)
