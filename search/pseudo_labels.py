"""Pseudo-labels: the eval images a finished submission is sure of, added to the training rows
of a final-stage run. Opt-in (``python -m search.refit --pseudo-labels P``), off by default.

Why: one year's winning team credits pseudo-labels on the eval images (issue 28). They stay
honest here because eval people never share a fold with training people: every fold's
validation rows, and so the OOF score the ensemble chooses by, never see a pseudo-label; only
the training side of every fold gains the eval images whose submitted class the submission's
blend (its weights, its decision rule) gives a probability of at least ``P``.

What a final trial records (user attrs, so a retry trains on the same rows and the dashboard
shows them): ``pseudo_threshold``, ``pseudo_count``, ``pseudo_share`` (of the eval images),
``pseudo_eval_fingerprint`` (the eval rows they index; another eval set is refused) and
``pseudo_classes``, one character per eval row in info.csv order: its class (``ALPHABET``)
or ``.`` when not taken. Pseudo-labels are true classes (the submission's); a trial's age
threshold relabels only the training people, whose ages are known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from core.config import ConfigError
from core.errors import DataError
from core.labels import NUM_CLASSES
from core.loader import RowView
from search.artifacts import eval_fold_name, load_array

if TYPE_CHECKING:  # the objective imports this module; it needs no finished study
    from search.finished_study import FinishedStudy

THRESHOLD_ATTR = "pseudo_threshold"
CLASSES_ATTR = "pseudo_classes"
COUNT_ATTR, SHARE_ATTR = "pseudo_count", "pseudo_share"
EVAL_FINGERPRINT_ATTR = "pseudo_eval_fingerprint"
#: One character per class (18), ``NOT_TAKEN`` for an eval row without a pseudo-label.
ALPHABET, NOT_TAKEN = "0123456789abcdefgh", "."
assert len(ALPHABET) == NUM_CLASSES
#: The share of the eval images the refusal of a too-high threshold suggests a threshold for
#: (the gauge's own 0.9 took 15-20%, bench.options).
SUGGESTED_SHARE = 0.2


def class_confidence(probs: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per row: the probability ``probs`` gives ``classes[row]``."""
    return probs[np.arange(len(classes)), classes]


def confident(probs: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """Per row: ``classes[row]`` where its probability reaches ``threshold``, else -1."""
    sure = class_confidence(probs, classes) >= threshold
    return np.where(sure, classes, -1).astype(np.int64)


def encode(taken: np.ndarray) -> str:
    """``confident``'s output as text (a user attr): a class character or ``.`` per row."""
    return "".join(ALPHABET[c] if c >= 0 else NOT_TAKEN for c in taken)


def decode(text: str) -> np.ndarray:
    """``encode``'s inverse: the class per row, -1 where none was taken."""
    return np.array([ALPHABET.index(ch) if ch != NOT_TAKEN else -1 for ch in text], np.int64)


def fold_blends(found: FinishedStudy) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Per fold k: the submission's blend of its members' fold-k models' eval probabilities
    (its weights) and the class its decision rule submits from them; the members' eval
    fingerprint (a stale submission is refused).

    Why per fold: fold k's models never trained on fold k's validation people, so pseudo-labels
    taken from them leave fold k's OOF score honest. The whole blend's did (they are the other
    folds' training rows): on the yardstick its pseudo-labels lifted a final trial's OOF macro
    F1 from 0.27 to 0.36 while held out it gained 0.007 (``bench.final``, seed 0)."""
    sub = found.submission()
    members = [found.trial(m.trial) for m in sub.members]
    prints = {t.user_attrs.get("eval_fingerprint") for t in members}
    if prints != {sub.fingerprints.get("eval_fingerprint")}:
        raise DataError(f"{found.submission_path} was not written from these trials' eval "
                        f"predictions (another study or data?): run python -m search.ensemble "
                        f"--study {found.name} again")
    blends = [sub.classes([load_array(t, found.store, eval_fold_name(k)) for t in members])
              for k in range(found.n_folds)]
    return blends, prints.pop()


def threshold_for_share(confidence: np.ndarray, share: float) -> float:
    """The highest threshold that takes at least ``share`` of the rows: an ensemble of fold
    models is far less sure than one model (a yardstick submission's surest row was 0.61 where
    the gauge alone had 15-20% of its rows over 0.9), so a share is what a user can choose."""
    k = min(len(confidence), max(1, int(np.ceil(share * len(confidence)))))
    return float(np.sort(confidence)[::-1][k - 1])


def from_submission(found: FinishedStudy, threshold: float) -> dict[str, Any]:
    """The user attrs of a final trial trained with the submission's pseudo-labels at
    ``threshold``, one set per fold (``fold_blends``); one line when there is no submission or
    no eval image reaches it (naming a threshold that takes ``SUGGESTED_SHARE`` of them)."""
    blends, eval_print = fold_blends(found)
    taken = [confident(probs, classes, threshold) for probs, classes in blends]
    counts = [int((t >= 0).sum()) for t in taken]
    if not any(counts):
        confidence = np.concatenate([class_confidence(*blend) for blend in blends])
        # rounded down, so that typed back it takes what it says
        hint = np.floor(threshold_for_share(confidence, SUGGESTED_SHARE) * 1000) / 1000
        raise DataError(f"--pseudo-labels {threshold:g}: no eval image's submitted class is that "
                        f"sure (the surest is {confidence.max():.3f}); lower it ({hint:.3f} "
                        f"takes {(confidence >= hint).mean():.0%} of them)")
    return {THRESHOLD_ATTR: float(threshold), COUNT_ATTR: counts,
            SHARE_ATTR: round(sum(counts) / (len(counts) * len(taken[0])), 4),
            EVAL_FINGERPRINT_ATTR: eval_print, CLASSES_ATTR: [encode(t) for t in taken]}


def pseudo_training(attrs: Mapping[str, Any], n_eval: int, eval_fingerprint: str,
                    n_folds: int) -> np.ndarray | None:
    """Per fold, the pseudo-label per eval row (-1: none) of a trial with these user attrs
    (folds x eval rows), checked against the data's eval set; None for a trial without."""
    if CLASSES_ATTR not in attrs:
        return None
    if attrs.get(EVAL_FINGERPRINT_ATTR) != eval_fingerprint:
        raise ConfigError("this trial's pseudo-labels index another eval set than the data's "
                          "(info.csv changed since search.refit queued it)")
    per_fold = attrs[CLASSES_ATTR]
    if isinstance(per_fold, str) or len(per_fold) != n_folds:
        raise ConfigError(f"this trial's pseudo-labels are not one set per fold ({n_folds}): "
                          "it was queued by an older search.refit, whose labels came from "
                          "models that had trained on each fold's validation people; queue it "
                          "again with search.refit")
    taken = np.stack([decode(text) for text in per_fold])
    if taken.shape[1] != n_eval:
        raise ConfigError(f"{taken.shape[1]} pseudo-labels for {n_eval} eval images")
    return taken


def with_pseudo(images: RowView, targets: np.ndarray, eval_images: RowView,
                taken: np.ndarray) -> tuple[RowView, np.ndarray]:
    """(images, targets) to train on: the given rows, then each eval image with a pseudo-label
    (``taken`` >= 0) and that label; still one view on the cache, nothing copied."""
    rows = np.flatnonzero(taken >= 0)
    return images.join(eval_images[rows]), np.concatenate([targets, taken[rows]])
