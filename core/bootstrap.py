"""Bootstrap over people: how much a macro F1, or the difference of two, moves with the sample.

Why over people: a person's seven photos share gender and age, so rows are not independent and
resampling rows would understate the spread. Used by the benches (held-out intervals) and by the
final stage (whether a configuration's out-of-fold lead over the recipe is more than noise).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.metrics import macro_f1


def people_bootstrap(y_true: np.ndarray, preds: Sequence[np.ndarray], people: np.ndarray,
                     reps: int = 1000, seed: int = 0) -> np.ndarray:
    """Macro F1 of each of ``preds`` on ``reps`` resamples of the eval *people*: (reps, len).

    A person's seven photos share gender and age, so rows are not independent: resampling rows
    would understate the spread. Every prediction is scored on the same resamples, so the
    difference of two columns is a paired interval (much tighter than the two intervals)."""
    y = np.asarray(y_true, np.int64)
    _, person = np.unique(np.asarray(people), return_inverse=True)
    rows_of = [np.flatnonzero(person == p) for p in range(person.max() + 1)]
    rng = np.random.default_rng(seed)
    out = np.empty((reps, len(preds)))
    for r in range(reps):
        idx = np.concatenate([rows_of[p] for p in rng.integers(0, len(rows_of), len(rows_of))])
        out[r] = [macro_f1(y[idx], np.asarray(p)[idx]) for p in preds]
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN-free)."""
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
