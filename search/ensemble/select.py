"""Choosing ensemble members and weights from out-of-fold (OOF) probabilities.

Caruana et al. (2004) forward selection with replacement, with the safeguards that keep it from
fitting noise when each class has only a few hundred OOF rows: pool filtering (a trial far below
the pool's median never enters), sorted initialisation (start from the best few trials), a
tie-breaking margin (an addition must beat the current score by more than ``margin``; near-ties
go to the better-ranked trial) and bagging (repeat with the best few and a random half of the
rest, average the weights). The objective is log loss of the averaged probabilities (smooth,
proper) or macro F1.
Which combination to use was measured, not guessed: see the README's "The ensemble".

Every function takes members best-ranked first; that order is how ties are broken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import DataError
from core.labels import NUM_CLASSES
from core.metrics import macro_f1

OBJECTIVES = ("logloss", "f1")
_EPS = 1e-7  # probabilities are clipped here before a log: a hard 0 would cost infinity


@dataclass(frozen=True)
class Selection:
    """How members are chosen from a ranked pool (defaults: the measured best)."""

    objective: str = "f1"
    size: int = 20  # greedy rounds after the initial members; the best prefix is kept
    init: int = 1  # sorted initialisation: the N best-ranked members, once each (0: none)
    bags: int = 10  # 1 = no bagging; else repeat on random subsets and average the weights
    bag_fraction: float = 0.5
    margin: float = 0.005  # an addition must improve the objective by more than this
    pool_margin: float | None = 0.05  # drop members below median(single F1) - this
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.size < 0 or self.init < 0 or self.bags < 1 or self.size + self.init < 1:
            raise ValueError("size >= 0, init >= 0, size + init >= 1 and bags >= 1 are required")


def check_probs(probs: Sequence[np.ndarray], n_rows: int, what: str) -> list[np.ndarray]:
    """Members as float64 (n_rows, 18) arrays; ``DataError`` naming the first bad one."""
    out = []
    for i, p in enumerate(probs):
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape != (n_rows, NUM_CLASSES):
            raise DataError(f"{what} #{i}: shape {p.shape}, expected ({n_rows}, {NUM_CLASSES})")
        out.append(p)
    if not out:
        raise DataError(f"{what}: no members given")
    return out


def blend(probs_list: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted average of probability arrays (members with weight 0 are not read)."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(probs_list):
        raise ValueError(f"{len(weights)} weights for {len(probs_list)} members")
    out = None
    for w, p in zip(weights, probs_list, strict=True):
        if w > 0:
            term = w * np.asarray(p, dtype=np.float64)
            out = term if out is None else out + term
    if out is None:
        raise ValueError("all weights are zero")
    return out / weights.sum()


def score(objective: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """Higher is better: macro F1 of the argmax, or minus the mean log loss."""
    if objective == "f1":
        return macro_f1(labels, probs.argmax(axis=1))
    p = probs[np.arange(len(labels)), labels] / probs.sum(axis=1)
    return float(np.log(np.clip(p, _EPS, 1.0)).mean())


def filter_pool(single_f1: Sequence[float], margin: float | None) -> np.ndarray:
    """Mask of members whose own F1 is at least the pool median minus ``margin``.

    The best member always stays, so the pool is never empty; ``None`` keeps everyone.
    """
    f1 = np.asarray(single_f1, dtype=np.float64)
    if margin is None or len(f1) == 0:
        return np.ones(len(f1), dtype=bool)
    keep = f1 >= np.median(f1) - margin
    keep[int(np.argmax(f1))] = True
    return keep


def forward_select(probs: Sequence[np.ndarray], labels: np.ndarray, sel: Selection) -> np.ndarray:
    """Selection counts (one per member) from sorted-initialised forward selection.

    Starts from the ``init`` best-ranked members, then each round adds (with replacement) the
    member whose addition scores best; members within ``margin`` of that best score count as
    tied and the best-ranked of them wins. The shortest prefix whose score is within ``margin``
    of the best prefix's is kept.
    """
    counts = np.zeros(len(probs), dtype=np.int64)
    counts[: min(sel.init, len(probs))] = 1
    total = np.zeros_like(probs[0])
    for i in np.flatnonzero(counts):
        total = total + probs[i]
    history = [counts.copy()]
    scores = [score(sel.objective, labels, total) if counts.any() else -np.inf]
    rounds = sel.size if len(probs) > 1 or not counts.any() else 0
    for _ in range(rounds):
        round_scores = np.array([score(sel.objective, labels, total + p) for p in probs])
        best = int(np.flatnonzero(round_scores >= round_scores.max() - sel.margin)[0])
        counts[best] += 1
        total = total + probs[best]
        history.append(counts.copy())
        scores.append(float(round_scores[best]))
    scores_arr = np.array(scores)
    keep = int(np.flatnonzero(scores_arr >= scores_arr.max() - sel.margin)[0])
    return history[keep]


def select_weights(probs: Sequence[np.ndarray], labels: np.ndarray, sel: Selection) -> np.ndarray:
    """Weights (sum 1) over ``probs``: forward selection, bagged when ``sel.bags > 1``.

    Every bag holds the ``init`` best-ranked members and a random ``bag_fraction`` of the rest.
    Bagging the whole pool (Caruana et al. 2006) left the best trial out of half the bags, and
    with a small pool where one trial stands out the averaged weights diluted it: the blend
    scored below that trial alone, in sample (demo 0.526 vs 0.545) and held out (real faces,
    three seeds, -0.039 on average; with the best kept in every bag +0.011).
    """
    labels = np.asarray(labels)
    probs = check_probs(probs, len(labels), "out-of-fold probabilities")
    if sel.bags == 1 or len(probs) == 1:
        counts = forward_select(probs, labels, sel).astype(np.float64)
        return counts / counts.sum()
    rng = np.random.default_rng(sel.seed)
    first = np.arange(min(sel.init, len(probs)))
    rest = np.arange(len(first), len(probs))
    n_bag = max(1, int(round(len(rest) * sel.bag_fraction))) if len(rest) else 0
    total = np.zeros(len(probs))
    for _ in range(sel.bags):
        members = np.concatenate([first, np.sort(rng.choice(rest, n_bag, replace=False))])
        counts = forward_select([probs[i] for i in members], labels, sel).astype(np.float64)
        total[members] += counts / counts.sum()
    return total / total.sum()
