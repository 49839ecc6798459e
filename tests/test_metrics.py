"""The one macro F1 agrees with scikit-learn's, which the competition scores with."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from core.metrics import macro_f1


@pytest.mark.parametrize("seed", range(20))
def test_macro_f1_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    classes = int(rng.integers(1, 19))  # small draws leave classes out of truth or predictions
    y = rng.integers(0, classes, n)
    pred = np.where(rng.random(n) < rng.random(), y, rng.integers(0, 18, n))
    want = f1_score(y, pred, average="macro", zero_division=0)
    assert macro_f1(y, pred) == pytest.approx(want, abs=1e-12)
    probs = np.eye(18)[pred] * 0.9 + 0.005  # probabilities whose argmax is pred
    assert macro_f1(y, probs) == pytest.approx(want, abs=1e-12)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        macro_f1(np.array([0, 1, 2]), np.array([0, 1]))
