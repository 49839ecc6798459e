"""Checkpoint retention: fold checkpoints fill a disk, so only the best trials keep theirs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import artifacts
from search.artifacts import checkpoint_names
from search.worker.claims import retried_from
from search.worker.stage import best_first

DEFAULT_KEEP_CHECKPOINTS = 10


class CheckpointRetention:
    """Study callback: keep fold checkpoints only for the best ``keep`` COMPLETE trials.

    Probabilities stay for every complete trial (they are small and the ensemble ranks on them);
    checkpoints are what fills a disk. Checkpoints of complete trials beyond the best ``keep``
    and of FAIL/PRUNED trials go, except while a WAITING/RUNNING trial still refers to them: a
    retry inherits its dead origin's attrs (same artifact ids) and resumes from those folds, so
    an origin with a live retry is left alone, and no id a live or kept trial holds is removed.
    Removing an already-removed checkpoint is a no-op, so every worker may run this after each
    of its trials.

    ``lock`` is the study's claim lock (``search.worker.claims.claim_lock``). The reaper marks a
    dead trial FAIL and queues its retry in two writes, under that lock; read between them, the
    origin looks spent (FAIL, no retry yet) and its saved folds would go just before the retry
    resumes from them. Under the lock retention never sees that moment.
    """

    def __init__(self, store: Any, keep: int = DEFAULT_KEEP_CHECKPOINTS,
                 lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 ) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.store, self.keep, self.lock = store, keep, lock

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self.lock():
            self._remove_unneeded(study)

    def _remove_unneeded(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        ranked = best_first(trials)
        live = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
        origins = {retried_from(t) for t in live} - {None}

        def ids(t: FrozenTrial) -> set[str]:
            return {str(t.user_attrs[artifacts.attr_name(n)]) for n in checkpoint_names(t)
                    if t.user_attrs[artifacts.attr_name(n)]}

        protected = set().union(*(ids(t) for t in live + ranked[:self.keep]))
        spent = [t for t in trials if t.state in (TrialState.FAIL, TrialState.PRUNED)
                 and t.number not in origins]
        for t in ranked[self.keep:] + spent:
            for name in checkpoint_names(t):
                if str(t.user_attrs[artifacts.attr_name(name)]) not in protected:
                    artifacts.remove_artifact(t, self.store, name)
