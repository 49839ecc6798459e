"""Which configurations the final stage retrains, and how each one ended.

Shared by ``search.refit`` (the final stage on its own) and ``search.run --hours`` (the final
stage inside the budget, ``search.worker.budget`` keeping its time). A final trial is a trial of
the study marked by ``search.worker.stage``; this module only chooses, queues and reports them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.pseudo_labels import THRESHOLD_ATTR
from search.worker.claims import retry_callback
from search.worker.stage import (
    EPOCHS_ATTR,
    REFIT_OF_ATTR,
    best_first,
    final_attrs,
    final_trials,
    search_trials,
)
from search.worker.trial_loop import ERROR_ATTR

#: Default epochs of a final trial: this many times the study's (its trials' length).
EPOCHS_FACTOR = 2
#: Configurations ``search.run --hours`` keeps time to retrain (``--final``).
DEFAULT_FINAL = 1


def config_key(params: dict, epochs: int, pseudo: float | None = None) -> str:
    """What makes two final trials the same refit: params, epochs and the pseudo-label
    threshold (None: none)."""
    return json.dumps([params, int(epochs), pseudo], sort_keys=True, default=str)


def _final_key(trials: Sequence[FrozenTrial], final: FrozenTrial) -> str:
    origin = trials[int(final.user_attrs[REFIT_OF_ATTR])]
    return config_key(origin.params, final.user_attrs[EPOCHS_ATTR],
                       final.user_attrs.get(THRESHOLD_ATTR))


def best_configurations(study: optuna.Study, top: int | None) -> list[FrozenTrial]:
    """The ``top`` (None: all) best complete search trials with every fold, one per
    configuration (params), best first (ties: lower number)."""
    n_folds = int(study.user_attrs.get("n_folds", 0))
    done = [t for t in search_trials(study, (TrialState.COMPLETE,))
            if len(t.user_attrs.get("fold_f1", [])) == n_folds]
    chosen: dict[str, FrozenTrial] = {}
    for t in best_first(done):
        chosen.setdefault(config_key(t.params, 0), t)
        if len(chosen) == top:
            break
    return list(chosen.values())


def queue_final(study: optuna.Study, chosen: Sequence[FrozenTrial], epochs: int,
                pseudo: dict | None = None) -> list[str]:
    """Queue a final trial for each configuration of ``chosen`` (search trials,
    ``search.worker.final_choice``) that has none at ``epochs`` (and ``pseudo``'s threshold)
    yet; one line each saying what was done. ``pseudo``: the pseudo-label user attrs
    (``search.pseudo_labels.from_submission``) every queued trial gets. Call it under the claim
    lock, after ``reap``, so a dead worker's final trial already has its retry queued."""
    pseudo = pseudo or {}
    trials = study.get_trials(deepcopy=False)
    by_key: dict[str, list[FrozenTrial]] = {}
    for f in final_trials(study):
        by_key.setdefault(_final_key(trials, f), []).append(f)
    lines = []
    for t in chosen:
        mine = by_key.get(config_key(t.params, epochs, pseudo.get(THRESHOLD_ATTR)), [])
        head = f"  trial {t.number} (macro F1 {t.value:.4f}): "
        done = [f for f in mine if f.state == TrialState.COMPLETE]
        live = [f for f in mine if f.state in (TrialState.WAITING, TrialState.RUNNING)]
        failed = [f for f in mine if f.state == TrialState.FAIL]
        if done:
            lines.append(f"{head}already refitted by trial {done[0].number} "
                         f"(macro F1 {done[0].value:.4f}); skipped")
        elif live:
            lines.append(f"{head}already queued (trial {live[0].number}, "
                         f"{live[0].state.name.lower()})")
        elif failed:
            last = max(failed, key=lambda f: f.number)
            retry_callback(None)(study, last)
            lines.append(f"{head}its final trial {last.number} failed "
                         f"({last.user_attrs.get(ERROR_ATTR, 'interrupted')}); queued again as "
                         "its retry, which reuses its finished folds")
        else:
            study.enqueue_trial(t.params, user_attrs={**final_attrs(t.number, epochs), **pseudo})
            lines.append(f"{head}queued")
    return lines


def outcome(study: optuna.Study, chosen: Sequence[FrozenTrial], epochs: int,
            pseudo: float | None = None) -> list[tuple[str, bool]]:
    """Per refitted configuration: a line on its latest final trial, and whether one is done."""
    trials = study.get_trials(deepcopy=False)
    out = []
    for t in chosen:
        mine = [f for f in final_trials(study)
                if _final_key(trials, f) == config_key(t.params, epochs, pseudo)]
        done = [f for f in mine if f.state == TrialState.COMPLETE]
        if not mine:  # queued by this run, so only a hand-edited study gets here
            out.append((f"  trial {t.number}: no final trial", False))
            continue
        f = done[0] if done else max(mine, key=lambda f: f.number)
        what = (f"macro F1 {f.value:.4f} (at the study's epochs: {t.value:.4f})" if done else
                f.state.name + (f" ({f.user_attrs[ERROR_ATTR]})" if ERROR_ATTR in f.user_attrs
                                else ""))
        out.append((f"  trial {f.number} refits trial {t.number} at {epochs} epochs: {what}",
                    bool(done)))
    return out
