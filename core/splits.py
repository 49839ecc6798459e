"""Person-level stratified k-fold: the folds every trial of a study shares.

No person may have images in two folds (the same face in train and validation inflates F1),
and folds are stratified on gender x age group so the rare ">=60" group (about 7% of people)
is present in every fold in about the same share. The split is computed over one row per
person: every person has 7 images, so this is the same problem StratifiedGroupKFold solves on
images, but it balances people directly and is 7x smaller.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from core.errors import DataError
from core.labels import NUM_AGE, age_group


def person_strata(table: pd.DataFrame) -> pd.DataFrame:
    """One row per person (sorted by folder name): person, stratum = gender * 3 + true age group.

    A table where one person has two genders or ages is a data error (a broken correction).
    """
    people = table.groupby("person", sort=True).agg(
        gender=("gender", "first"), age=("age", "first"),
        n_gender=("gender", "nunique"), n_age=("age", "nunique"),
    )
    bad = people.index[(people["n_gender"] > 1) | (people["n_age"] > 1)]
    if len(bad):
        raise DataError(f"table: person {bad[0]!r} has rows with different gender or age")
    strata = people["gender"].to_numpy() * NUM_AGE + age_group(people["age"].to_numpy())
    return pd.DataFrame({"person": people.index.to_numpy(), "stratum": strata.astype(np.int64)})


def person_folds(table: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number (0..n_folds-1) per row of ``table``; all rows of a person share one fold.

    StratifiedGroupKFold(shuffle=True, random_state=seed) on one row per person, y = gender x
    true age group (threshold 60, whatever threshold a trial trains with), then mapped back to
    rows. Deterministic for (table, n_folds, seed).
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    people = person_strata(table)
    if len(people) < n_folds:
        raise DataError(f"table: {len(people)} people cannot fill {n_folds} folds")
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of_person = np.empty(len(people), dtype=np.int64)
    x = np.zeros((len(people), 1))
    with warnings.catch_warnings():
        # Small data sets (tests, demo) have strata with fewer people than folds; sklearn warns,
        # the split is still the best possible one. The real set has >= 5 people per stratum.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(cv.split(x, people["stratum"], groups=people["person"]))
    for k, (_, val) in enumerate(splits):
        fold_of_person[val] = k
    lookup = pd.Series(fold_of_person, index=people["person"])
    return lookup.loc[table["person"]].to_numpy(dtype=np.int64)
