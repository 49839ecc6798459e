"""Person-level folds: no leakage between folds, balanced strata, fixed for a seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.dataset import load_train_table
from core.errors import DataError
from core.fingerprints import folds_fingerprint
from core.splits import person_folds


def people_table(n_people: int, seed: int) -> pd.DataFrame:
    """An image table (7 rows per person) with the real set's balance: 61% female, 7% aged 60."""
    rng = np.random.default_rng(seed)
    gender = (rng.random(n_people) < 0.61).astype(np.int64)
    age = np.where(rng.random(n_people) < 0.07, 60, rng.integers(18, 60, n_people))
    person = [f"{i:06d}_person" for i in rng.permutation(n_people)]
    return pd.DataFrame({"person": np.repeat(person, 7), "gender": np.repeat(gender, 7),
                         "age": np.repeat(age, 7)})


def old_share_by_fold(table: pd.DataFrame, folds: np.ndarray) -> tuple[float, pd.Series]:
    people = table.assign(fold=folds).groupby("person").first()
    old = people["age"] >= 60
    return old.mean(), old.groupby(people["fold"]).mean()


def test_no_person_in_two_folds_on_synthetic_data(synth_data):
    table = load_train_table(synth_data)
    folds = person_folds(table, n_folds=5, seed=0)
    assert folds.shape == (len(table),) and folds.dtype == np.int64
    assert (table.assign(fold=folds).groupby("person")["fold"].nunique() == 1).all()
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n_people", [500, 2700])
def test_each_fold_has_the_whole_sets_share_of_age_60_within_2_points(n_people):
    table = people_table(n_people, seed=1)
    folds = person_folds(table, n_folds=5, seed=3)
    whole, per_fold = old_share_by_fold(table, folds)
    assert len(per_fold) == 5
    assert (per_fold - whole).abs().max() <= 0.02, per_fold
    sizes = table.assign(fold=folds).groupby("person").first().groupby("fold").size()
    assert sizes.max() - sizes.min() <= 2  # folds hold about the same number of people


def test_gender_is_stratified_too():
    table = people_table(2700, seed=2)
    folds = person_folds(table, n_folds=5, seed=0)
    people = table.assign(fold=folds).groupby("person").first()
    female = people.groupby("fold")["gender"].mean()
    assert (female - people["gender"].mean()).abs().max() <= 0.02


def test_same_seed_same_folds_other_seed_other_folds():
    table = people_table(300, seed=0)
    a, b = person_folds(table, seed=7), person_folds(table, seed=7)
    assert (a == b).all() and folds_fingerprint(a) == folds_fingerprint(b)
    c = person_folds(table, seed=8)
    assert (a != c).any() and folds_fingerprint(a) != folds_fingerprint(c)


def test_folds_follow_the_person_not_the_row_order():
    table = people_table(300, seed=0)
    folds = pd.Series(person_folds(table, seed=1), index=table.index)
    shuffled = table.sample(frac=1, random_state=0)
    again = pd.Series(person_folds(shuffled, seed=1), index=shuffled.index)
    assert (again.sort_index() == folds).all()


def test_too_few_people_is_a_data_error():
    with pytest.raises(DataError, match="3 people cannot fill 5 folds"):
        person_folds(people_table(3, seed=0), n_folds=5)


def test_person_with_two_ages_is_refused():
    table = people_table(20, seed=0)
    table.loc[0, "age"] = table.loc[0, "age"] + 1
    with pytest.raises(DataError, match=table.loc[0, "person"]):
        person_folds(table)
