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


def confident(probs: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """Per row: ``classes[row]`` where its probability reaches ``threshold``, else -1."""
    sure = probs[np.arange(len(classes)), classes] >= threshold
    return np.where(sure, classes, -1).astype(np.int64)


def encode(taken: np.ndarray) -> str:
    """``confident``'s output as text (a user attr): a class character or ``.`` per row."""
    return "".join(ALPHABET[c] if c >= 0 else NOT_TAKEN for c in taken)


def decode(text: str) -> np.ndarray:
    """``encode``'s inverse: the class per row, -1 where none was taken."""
    return np.array([ALPHABET.index(ch) if ch != NOT_TAKEN else -1 for ch in text], np.int64)


def from_submission(found: FinishedStudy, threshold: float) -> dict[str, Any]:
    """The user attrs of a final trial trained with the submission's pseudo-labels at
    ``threshold``; one line when there is no submission or no eval image reaches it."""
    submitted = found.submission()
    members = [found.trial(m.trial) for m in submitted.members]
    prints = {t.user_attrs.get("eval_fingerprint") for t in members}
    if prints != {submitted.fingerprints.get("eval_fingerprint")}:
        raise DataError(f"{found.submission_path} was not written from these trials' eval "
                        f"predictions (another study or data?): run python -m search.ensemble "
                        f"--study {found.name} again")
    probs, classes = submitted.classes([load_array(t, found.store, EVAL) for t in members])
    taken = confident(probs, classes, threshold)
    count = int((taken >= 0).sum())
    if not count:
        best = float(probs[np.arange(len(classes)), classes].max())
        raise DataError(f"--pseudo-labels {threshold:g}: no eval image's submitted class is that "
                        f"sure (the surest is {best:.3f}); lower it")
    return {THRESHOLD_ATTR: float(threshold), COUNT_ATTR: count,
            SHARE_ATTR: round(count / len(taken), 4), EVAL_FINGERPRINT_ATTR: prints.pop(),
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
