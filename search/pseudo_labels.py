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
from search.artifacts import EVAL, load_array

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


def submitted(found: FinishedStudy) -> tuple[np.ndarray, np.ndarray, str]:
    """The submission's blended eval probabilities and submitted class per eval row (its
    weights, its decision rule); its members' eval fingerprint (a stale submission is
    refused)."""
    sub = found.submission()
    members = [found.trial(m.trial) for m in sub.members]
    prints = {t.user_attrs.get("eval_fingerprint") for t in members}
    if prints != {sub.fingerprints.get("eval_fingerprint")}:
        raise DataError(f"{found.submission_path} was not written from these trials' eval "
                        f"predictions (another study or data?): run python -m search.ensemble "
                        f"--study {found.name} again")
    probs, classes = sub.classes([load_array(t, found.store, EVAL) for t in members])
    return probs, classes, prints.pop()


def threshold_for_share(confidence: np.ndarray, share: float) -> float:
    """The highest threshold that takes at least ``share`` of the rows: an ensemble of fold
    models is far less sure than one model (a yardstick submission's surest row was 0.61 where
    the gauge alone had 15-20% of its rows over 0.9), so a share is what a user can choose."""
    k = min(len(confidence), max(1, int(np.ceil(share * len(confidence)))))
    return float(np.sort(confidence)[::-1][k - 1])


def from_submission(found: FinishedStudy, threshold: float) -> dict[str, Any]:
    """The user attrs of a final trial trained with the submission's pseudo-labels at
    ``threshold``; one line when there is no submission or no eval image reaches it (naming a
    threshold that takes ``SUGGESTED_SHARE`` of them)."""
    probs, classes, eval_print = submitted(found)
    taken = confident(probs, classes, threshold)
    count = int((taken >= 0).sum())
    if not count:
        confidence = class_confidence(probs, classes)
        # rounded down, so that typed back it takes what it says
        hint = np.floor(threshold_for_share(confidence, SUGGESTED_SHARE) * 1000) / 1000
        raise DataError(f"--pseudo-labels {threshold:g}: no eval image's submitted class is that "
                        f"sure (the surest is {confidence.max():.3f}); lower it ({hint:.3f} "
                        f"takes {(confidence >= hint).mean():.0%} of them)")
    return {THRESHOLD_ATTR: float(threshold), COUNT_ATTR: count,
            SHARE_ATTR: round(count / len(taken), 4), EVAL_FINGERPRINT_ATTR: eval_print,
            CLASSES_ATTR: encode(taken)}


def pseudo_training(attrs: Mapping[str, Any], n_eval: int,
                    eval_fingerprint: str) -> np.ndarray | None:
    """The pseudo-label per eval row (-1: none) of a trial with these user attrs, checked
    against the data's eval set; None for a trial without pseudo-labels."""
    if CLASSES_ATTR not in attrs:
        return None
    if attrs.get(EVAL_FINGERPRINT_ATTR) != eval_fingerprint:
        raise ConfigError("this trial's pseudo-labels index another eval set than the data's "
                          "(info.csv changed since search.refit queued it)")
    taken = decode(attrs[CLASSES_ATTR])
    if len(taken) != n_eval:
        raise ConfigError(f"{len(taken)} pseudo-labels for {n_eval} eval images")
    return taken


def with_pseudo(images: RowView, targets: np.ndarray, eval_images: RowView,
                taken: np.ndarray) -> tuple[RowView, np.ndarray]:
    """(images, targets) to train on: the given rows, then each eval image with a pseudo-label
    (``taken`` >= 0) and that label; still one view on the cache, nothing copied."""
    rows = np.flatnonzero(taken >= 0)
    return images.join(eval_images[rows]), np.concatenate([targets, taken[rows]])
