"""The whole ensemble recipe, fitted on some rows, and its nested cross-fitted estimate.

Why nested: every choice made on the OOF rows (which trials form the pool, the members and
weights, the decision offsets) makes the in-sample figure of those rows optimistic. Here the
study's folds are split in two halves; the recipe makes all its choices on one half and predicts
the other, then the halves swap, and the two predicted halves are scored together. The best
single trial goes through the same procedure (chosen on one half, scored on the other), so the
two are compared like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from core.errors import DataError
from core.metrics import macro_f1
from search.ensemble.decision import fit_offsets
from search.ensemble.select import Selection, blend, check_probs, filter_pool, select_weights
from search.ensemble.submission import decide


@dataclass(frozen=True)
class Recipe:
    """Everything chosen from OOF rows: pool size, selection, decision-rule kind."""

    top: int = 10  # the pool: the K best trials by macro F1 on the rows the recipe sees
    selection: Selection = field(default_factory=Selection)
    offsets: str = "age"  # offset kind fitted on top of the blend (see search.ensemble.decision)


@dataclass
class Fitted:
    """A recipe's choices: weights over all trials given (0 = not a member) and offsets."""

    weights: np.ndarray
    offsets: np.ndarray

    def predict(self, probs: Sequence[np.ndarray], use_offsets: bool = True) -> np.ndarray:
        """Predicted classes of the weighted blend, with or without the offsets."""
        return decide(probs, self.weights, self.offsets if use_offsets else None)[1]


def rank_by_f1(probs: Sequence[np.ndarray], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order best first, each member's macro F1) on these rows; ties go to the lower index."""
    f1 = np.array([macro_f1(labels, p.argmax(axis=1)) for p in probs])
    return np.lexsort((np.arange(len(f1)), -f1)), f1


def fit_recipe(probs: Sequence[np.ndarray], labels: np.ndarray, recipe: Recipe) -> Fitted:
    """Rank, pool (top K, then filtered), select weights and fit offsets on these rows only."""
    labels = np.asarray(labels)
    probs = check_probs(probs, len(labels), "out-of-fold probabilities")
    order, f1 = rank_by_f1(probs, labels)
    pool = order[: recipe.top]
    pool = pool[filter_pool(f1[pool], recipe.selection.pool_margin)]
    weights = np.zeros(len(probs))
    weights[pool] = select_weights([probs[i] for i in pool], labels, recipe.selection)
    offsets = fit_offsets(blend(probs, weights), labels, recipe.offsets)
    return Fitted(weights, offsets)


def fold_halves(folds: np.ndarray) -> np.ndarray:
    """Boolean mask of half A: the even-positioned fold numbers (0, 2, 4 of 0..4)."""
    folds = np.asarray(folds)
    ids = np.unique(folds)
    if len(ids) < 2:
        raise DataError(f"cross-fitting needs at least 2 folds, the rows have {len(ids)}")
    return np.isin(folds, ids[::2])


def nested_predictions(probs: Sequence[np.ndarray], labels: np.ndarray, folds: np.ndarray,
                       recipe: Recipe) -> dict[bool, np.ndarray]:
    """Predicted class per row, each half by the recipe fitted on the other half.

    Keyed by ``use_offsets``: both decision rules come from the same fitted halves, so the
    nested figures with and without offsets differ only in the rule.
    """
    labels, folds = np.asarray(labels), np.asarray(folds)
    probs = check_probs(probs, len(labels), "out-of-fold probabilities")
    if len(folds) != len(labels):
        raise DataError(f"folds: {len(folds)} rows, labels: {len(labels)} rows")
    half_a = fold_halves(folds)
    preds = {flag: np.empty(len(labels), dtype=np.int64) for flag in (False, True)}
    for fit_on in (half_a, ~half_a):
        fitted = fit_recipe([p[fit_on] for p in probs], labels[fit_on], recipe)
        for flag, pred in preds.items():
            pred[~fit_on] = fitted.predict([p[~fit_on] for p in probs], flag)
    return preds


def nested_f1(probs: Sequence[np.ndarray], labels: np.ndarray, folds: np.ndarray,
              recipe: Recipe) -> dict[bool, float]:
    """Macro F1 of ``nested_predictions`` over all rows, keyed by ``use_offsets``."""
    preds = nested_predictions(probs, labels, folds, recipe)
    return {flag: macro_f1(np.asarray(labels), pred) for flag, pred in preds.items()}
