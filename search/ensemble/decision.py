"""A decision rule made for macro F1: additive offsets on the log-probabilities.

Why: the argmax of probabilities maximises accuracy, not macro F1. On an imbalanced 18-class
task the rare classes (every ">=60" class) are under-predicted, and each of them weighs as much
in macro F1 as a common one. Adding an offset to the log-probability of a group of classes and
taking the argmax moves the decision boundary toward the rare groups. The offsets are fitted on
OOF predictions by coordinate ascent on macro F1 over a fixed grid; whether they are kept is
decided by the nested estimate (``search.ensemble.nested``), not here.

Kinds: ``age`` (one offset per age group, 2 free numbers: the smallest version that can fix
the ">=60" under-prediction), ``class`` (one per class, 18), ``none``.
"""

from __future__ import annotations

import numpy as np

from core.labels import NUM_CLASSES, decode
from core.metrics import macro_f1

OFFSET_KINDS = ("age", "class", "none")
GRID = np.round(np.arange(-2.0, 2.01, 0.25), 2)  # log-odds steps; 0 is on it
PASSES = 2
_EPS = 1e-7


def class_groups(kind: str) -> np.ndarray:
    """Group index of each of the 18 classes: the classes that share one offset."""
    if kind == "age":
        return np.asarray(decode(np.arange(NUM_CLASSES))[2], dtype=np.int64)
    if kind == "class":
        return np.arange(NUM_CLASSES)
    if kind == "none":
        return np.zeros(NUM_CLASSES, dtype=np.int64)
    raise ValueError(f"offset kind must be one of {OFFSET_KINDS}, got {kind!r}")


def apply_offsets(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Predicted classes: argmax of log(probs) + offsets (offsets of 0 give the plain argmax)."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None))
    return (logp + np.asarray(offsets, dtype=np.float64)).argmax(axis=1)


def fit_offsets(probs: np.ndarray, labels: np.ndarray, kind: str = "age",
                grid: np.ndarray = GRID, passes: int = PASSES) -> np.ndarray:
    """Per-class offsets (18,) maximising macro F1 of ``apply_offsets`` on these rows.

    Coordinate ascent: each group in turn takes the grid value that scores best with the
    others held fixed; a change is made only when it strictly improves the score, and among
    equal scores the value nearest 0 wins, so offsets stay 0 unless the data ask otherwise.
    With ``age``, group 0 (<30) stays at 0: adding one constant to every class changes nothing.
    """
    groups = class_groups(kind)
    values = np.zeros(int(groups.max()) + 1)
    labels = np.asarray(labels)
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None))
    by_nearness = np.asarray(grid)[np.argsort(np.abs(grid), kind="stable")]

    def f1_with(vals: np.ndarray) -> float:
        return macro_f1(labels, (logp + vals[groups]).argmax(axis=1))

    best = f1_with(values)
    free = range(1, len(values)) if kind == "age" else range(len(values))
    for _ in range(passes if kind != "none" else 0):
        changed = False
        for g in free:
            trial = values.copy()
            for v in by_nearness:
                if v == values[g]:
                    continue
                trial[g] = v
                f1 = f1_with(trial)
                if f1 > best:
                    best, values[g], changed = f1, v, True
        if not changed:
            break
    return values[groups]
