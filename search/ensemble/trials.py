"""The study side of the ensemble: which trials may be ensembled, and their probabilities.

Mixed data, folds or eval sets are refused, not filtered: a trial's OOF rows only line up with
another's when both ran on the same table (data fingerprint) and the same folds (folds
fingerprint), and its eval rows when both read the same eval/info.csv (eval fingerprint); those
must also equal what the data folder gives now, or the labels would not match the rows and the
submission would put probabilities on the wrong ImageIDs.

Every complete trial with all folds is a candidate, not only the ``--top`` best: the nested
estimate chooses the pool on half of the folds, so it must be able to rank all of them there.
Eval probabilities are read only for the members finally chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna

from core.errors import DataError
from core.labels import NUM_CLASSES
from search.artifacts import EVAL, OOF, attr_name, load_array
from search.worker.stage import best_first
from search.worker.storage import open_existing_storage, study_names

FINGERPRINTS = {"data_fingerprint": "data", "folds_fingerprint": "folds",
                "eval_fingerprint": "eval images"}


@dataclass
class Candidate:
    """One complete trial, best-ranked first by the study's value."""

    rank: int
    number: int
    value: float
    oof: np.ndarray = field(repr=False)
    trial: object = field(repr=False)  # the FrozenTrial, to read its eval probabilities later


def open_study(name: str, url: str):
    """Load study ``name`` without creating anything: a missing SQLite file is an error."""
    storage = open_existing_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = ", ".join(study_names(storage)) or "none"
        raise DataError(f"storage {url}: no study named {name!r} (studies: {known})") from None


def _check_same(study_name: str, pool: list) -> None:
    """Refuse a pool whose trials ran on different data, folds or eval images."""
    for attr, what in FINGERPRINTS.items():
        groups: dict[str, list[int]] = {}
        for t in pool:
            groups.setdefault(str(t.user_attrs.get(attr)), []).append(t.number)
        if len(groups) > 1:
            sides = "; ".join(f"{fp}: trials {', '.join(map(str, nums))}"
                              for fp, nums in groups.items())
            raise DataError(f"study {study_name!r}: its complete trials ran on different {what} "
                            f"({attr} {sides}); their predictions do not line up - ensemble "
                            "one study per data set")


def rank_trials(study) -> tuple[list, list[str]]:
    """Complete trials with every fold, best first (ties: lower trial number).

    Returns (trials, notes). Refuses (``DataError``) when none qualifies or when they mix data,
    fold or eval fingerprints, naming the trials on each side.
    """
    complete = best_first(study.get_trials(deepcopy=False),
                          maximize=study.direction == optuna.study.StudyDirection.MAXIMIZE)
    if not complete:
        raise DataError(f"study {study.study_name!r} has no complete trial to ensemble")
    n_folds = study.user_attrs.get("n_folds")
    notes = []
    if n_folds is not None:
        full = [t for t in complete if len(t.user_attrs.get("fold_f1", [])) == int(n_folds)]
        if len(full) < len(complete):
            notes.append(f"skipped {len(complete) - len(full)} complete trial(s) without all "
                         f"{n_folds} folds")
        if not full:
            raise DataError(f"study {study.study_name!r}: no complete trial finished all "
                            f"{n_folds} folds")
        complete = full
    _check_same(study.study_name, complete)
    return complete, notes


def check_against_now(trials: list, now: dict[str, str], data_dir: Path) -> None:
    """Refuse when the data folder no longer gives the fingerprints the trials ran with."""
    numbers = ", ".join(str(t.number) for t in trials)
    for key, fp in now.items():
        ran_on = trials[0].user_attrs.get(key)
        if ran_on == fp:
            continue
        if key == "eval_fingerprint":
            raise DataError(f"trials {numbers} ran with eval_fingerprint {ran_on}, but "
                            f"{data_dir / 'eval' / 'info.csv'} now gives {fp} (eval images "
                            "edited, added or reordered since the trials); their eval "
                            "probabilities would land on the wrong ImageIDs - rerun the trials")
        raise DataError(f"trials {numbers} ran with {key} {ran_on}, but {data_dir} now gives "
                        f"{fp} (data, corrections or fold settings changed); their rows would "
                        "not match the labels")


def _require(trial, name: str, what: str) -> None:
    if not trial.user_attrs.get(attr_name(name)):
        raise DataError(f"trial {trial.number} has no {what} probabilities (user attr "
                        f"{attr_name(name)!r}); it cannot be ensembled")


def _load(trial, store, name: str, rows: int, what: str) -> np.ndarray:
    a = load_array(trial, store, name)
    if a.shape != (rows, NUM_CLASSES):
        raise DataError(f"trial {trial.number}: {what} probabilities have shape {a.shape}, "
                        f"the data gives ({rows}, {NUM_CLASSES})")
    return a


def load_oof(trial, store, n_train: int) -> np.ndarray:
    """A trial's OOF probabilities, shape (n_train, 18); one line when missing or misshapen."""
    _require(trial, OOF, "out-of-fold")
    return _load(trial, store, OOF, n_train, "out-of-fold")


def load_candidates(trials: list, store, n_train: int) -> list[Candidate]:
    """OOF probabilities of each trial; refuses a trial without OOF or eval probabilities."""
    out = []
    for rank, t in enumerate(trials, start=1):
        oof = load_oof(t, store, n_train)
        _require(t, EVAL, "eval")
        out.append(Candidate(rank, t.number, float(t.value), oof, t))
    return out


def load_eval(cands: Sequence[Candidate], weights: np.ndarray, store,
              n_eval: int) -> list[np.ndarray | None]:
    """Eval probabilities of the members (weight > 0); ``None`` for the others (never read)."""
    return [_load(c.trial, store, EVAL, n_eval, "eval") if w > 0 else None
            for c, w in zip(cands, weights, strict=True)]
