"""Which configurations the final stage retrains: the best, unless the warm-start recipe is as
good within out-of-fold noise.

Why: the final stage is the largest single spend of a budget, and with few trials the best search
trial often leads the study's known-good recipe by less than the out-of-fold F1 moves when other
people are drawn. On the pretrained yardstick (seed 2) a TPE trial led the recipe by 0.0009 OOF;
the final stage spent its minutes on it and the submission scored 0.07 below the recipe trained
as long. So a tie goes to the configuration with evidence from outside the study: a
configuration keeps its place ahead of the recipe only when its OOF lead, paired over training
people resampled (``core.bootstrap``), is above zero at the one-sided 95% bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from core.bootstrap import interval, people_bootstrap
from core.errors import DataError
from core.metrics import macro_f1
from search.worker.final_stage import best_configurations, config_key

#: The two-sided level whose lower end is the bound a lead must clear (one-sided 95%).
LEAD_LEVEL = 0.90
#: People resamples per comparison (a few seconds on a 3,000-image study).
REPS = 500

#: A lead over the recipe: (OOF macro F1 difference, its lower bound over people resampled).
Lead = Callable[[FrozenTrial], tuple[float, float]]


def is_recipe(trial: FrozenTrial, recipes: Sequence[dict]) -> bool:
    """Whether ``trial`` ran one of ``recipes`` (``search.space.warm_start``): every param it has
    is the recipe's."""
    return bool(trial.params) and any(
        all(k in recipe and recipe[k] == v for k, v in trial.params.items()) for recipe in recipes)


def lead_over(labels: np.ndarray, people: np.ndarray, probs: np.ndarray,
              recipe_probs: np.ndarray, reps: int = REPS) -> tuple[float, float]:
    """``probs``' OOF macro F1 minus ``recipe_probs``', and that difference's lower bound
    (``LEAD_LEVEL``) over ``reps`` resamples of the people, both scored on each resample."""
    preds = [np.asarray(probs).argmax(axis=1), np.asarray(recipe_probs).argmax(axis=1)]
    boot = people_bootstrap(labels, preds, people, reps=reps)
    lead = macro_f1(labels, preds[0]) - macro_f1(labels, preds[1])
    return lead, interval(boot[:, 0] - boot[:, 1], LEAD_LEVEL)[0]


def recipe_first(chosen: Sequence[FrozenTrial], recipe: FrozenTrial | None,
                 lead: Lead) -> tuple[list[FrozenTrial], list[str]]:
    """``chosen`` (best first) with ``recipe`` moved ahead of the first configuration whose lead
    over it is not clear, keeping the length; and a line saying why when it moved. Unchanged when
    there is no complete recipe or it is among ``chosen`` already."""
    chosen = list(chosen)
    if recipe is None or config_key(recipe.params, 0) in {config_key(t.params, 0) for t in chosen}:
        return chosen, []
    for i, t in enumerate(chosen):
        diff, low = lead(t)
        if low <= 0:
            line = (f"  trial {t.number} leads the warm-start recipe (trial {recipe.number}) by "
                    f"{diff:+.4f} OOF macro F1, within the noise (lower bound {low:+.4f} over "
                    "training people resampled): the recipe is refitted in its place")
            return [*chosen[:i], recipe, *chosen[i:]][:len(chosen)], [line]
    return chosen, []


def choose_final(study: optuna.Study, store, top: int,
                 recipes: Sequence[dict]) -> tuple[list[FrozenTrial], list[str]]:
    """The ``top`` configurations to refit, best first, the warm-start recipe (one of
    ``recipes``) put ahead of any it is tied with; and what moved it. One line (``DataError``)
    when there is nothing to refit."""
    configs = best_configurations(study, None)  # the study read once: the top and the recipe
    if not configs:
        raise DataError(f"study {study.study_name!r}: no complete trial with all "
                        f"{study.user_attrs.get('n_folds')} folds to refit")
    chosen = configs[:top]
    recipe = next((t for t in configs if is_recipe(t, recipes)), None)
    if recipe is None:
        return chosen, []
    from search.ensemble.trials import load_oof  # the study's data: read only when needed
    from search.finished_study import study_rows

    _, table, _ = study_rows(study)
    labels, people = table["label"].to_numpy(), table["person"].to_numpy()
    base = load_oof(recipe, store, len(table))
    return recipe_first(chosen, recipe,
                        lambda t: lead_over(labels, people, load_oof(t, store, len(table)), base))
