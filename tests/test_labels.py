"""The class encoding every module relies on: class = mask * 6 + gender * 3 + age group."""

from __future__ import annotations

import numpy as np
import pytest

from core import labels


def test_encode_decode_round_trip_covers_all_18_classes():
    m, g, a = np.meshgrid(range(3), range(2), range(3), indexing="ij")
    cls = labels.encode(m.ravel(), g.ravel(), a.ravel())
    assert sorted(cls.tolist()) == list(range(labels.NUM_CLASSES))
    dm, dg, da = labels.decode(cls)
    assert (dm == m.ravel()).all() and (dg == g.ravel()).all() and (da == a.ravel()).all()


def test_encode_matches_competition_formula():
    # not worn (2), female (1), >=60 (2) is the last class; wear/male/<30 the first
    assert labels.encode(2, 1, 2) == 17 and labels.encode(0, 0, 0) == 0
    assert labels.encode(1, 0, 1) == 7
    assert labels.CLASS_NAMES[17] == "not_worn/female/>=60"


@pytest.mark.parametrize(("age", "group"), [(18, 0), (29, 0), (30, 1), (59, 1), (60, 2), (61, 2)])
def test_age_group_boundaries(age, group):
    assert labels.age_group(age) == group


def test_lower_threshold_moves_only_ages_at_or_above_it():
    ages = np.array([29, 30, 57, 58, 59, 60])
    assert labels.age_group(ages, threshold=58).tolist() == [0, 1, 1, 2, 2, 2]
    assert labels.age_group(ages).tolist() == [0, 1, 1, 1, 1, 2]


@pytest.mark.parametrize("threshold", [30, 71])
def test_nonsense_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match="age threshold"):
        labels.age_group(40, threshold=threshold)


def test_stems_map_to_mask_kinds_five_one_one():
    kinds = [labels.MASK_BY_STEM[s] for s in labels.IMAGE_STEMS]
    assert sorted(kinds) == [0, 0, 0, 0, 0, 1, 2]
    assert labels.MASK_BY_STEM["incorrect_mask"] == 1 and labels.MASK_BY_STEM["normal"] == 2


def test_factor_probs_marginals_sum_to_one():
    p = np.random.default_rng(0).dirichlet(np.ones(18), size=4)
    mask, gender, age = labels.factor_probs(p)
    assert mask.shape == (4, 3) and gender.shape == (4, 2) and age.shape == (4, 3)
    for marg in (mask, gender, age):
        np.testing.assert_allclose(marg.sum(axis=1), 1.0)
    # marginal of class 17's factors includes its own mass
    assert (mask[:, 2] >= p[:, 17]).all()
