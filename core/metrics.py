"""The one macro F1 every part scores with (engine validation, the objective, the ensemble).

Torch-free on purpose: the ensemble and the dashboards import it without loading torch.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import f1_score


def macro_f1(y_true: np.ndarray, probs_or_pred: np.ndarray) -> float:
    """Macro F1 of 18-way probabilities (N, 18) or predicted classes (N,) against ``y_true``.

    Averaged over the classes that occur in the truth or the predictions (scikit-learn's
    default, and the competition scorer's): on real data every fold holds all 18 classes, so
    this is the macro F1 over the 18 classes. Forcing ``labels=range(18)`` would instead count a
    class absent from a small fold as F1 0 (or 1 with ``zero_division=1``), moving every trial's
    score by an amount that depends only on the fold, not the model. A class predicted but
    absent from the truth counts as 0, as it should.
    """
    pred = np.asarray(probs_or_pred)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    return float(f1_score(np.asarray(y_true), pred, average="macro", zero_division=0))
