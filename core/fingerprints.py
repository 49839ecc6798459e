"""Fingerprints: short hashes that say which rows a trial's probabilities belong to.

A trial stores its out-of-fold and eval probabilities as bare arrays, row i for image i of the
tables and folds it ran on, with their fingerprints as user attrs (``data_fingerprint``,
``folds_fingerprint``, ``eval_fingerprint``). They guard against reading those rows against
other ones: the ensemble and the label-error finder refuse a study's trials when the data or
labels, the folds or the eval list now give other fingerprints, and a retry reuses a dead
trial's folds only when they match. A module of its own, apart from ``core.dataset`` (which
reads the tables), so what a fingerprint covers is said in one short file.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def data_fingerprint(table: pd.DataFrame) -> str:
    """Short hash of the (person, file, label) rows: equal only for the same data and labels."""
    h = hashlib.sha256()
    for p, f, lab in zip(table["person"], table["file"], table["label"], strict=True):
        h.update(f"{p}\t{f}\t{int(lab)}\n".encode())
    return h.hexdigest()[:16]


def folds_fingerprint(folds: np.ndarray) -> str:
    """Short hash of a fold assignment: trials ensemble only predictions made on equal folds."""
    return hashlib.sha256(np.ascontiguousarray(folds, dtype=np.int64).tobytes()).hexdigest()[:16]


def eval_fingerprint(eval_table: pd.DataFrame) -> str:
    """Short hash of the eval table's files in order (``eval/info.csv``).

    A trial's eval probabilities are rows in this order; the ensemble checks it so that an
    edited or reordered info.csv (same row count) cannot put them on the wrong ImageIDs.
    """
    h = hashlib.sha256()
    for f in eval_table["file"]:
        h.update(f"{f}\n".encode())
    return h.hexdigest()[:16]


def fingerprints(table: pd.DataFrame, folds: np.ndarray, eval_table: pd.DataFrame
                 ) -> dict[str, str]:
    """The user attrs that say which rows a trial's OOF and eval probabilities belong to: a
    retry resumes, and the ensemble combines, only trials whose three match."""
    return {"data_fingerprint": data_fingerprint(table),
            "folds_fingerprint": folds_fingerprint(folds),
            "eval_fingerprint": eval_fingerprint(eval_table)}
