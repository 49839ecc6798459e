"""Which configurations the final stage retrains (``search.worker.final_choice``): the best,
unless the warm-start recipe is as good within out-of-fold noise."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.trial import FrozenTrial

from core.errors import DataError
from search.worker.final_choice import choose_final, is_recipe, lead_over, recipe_first
from tests.test_ensemble import StudyMaker, member

RECIPE = {"gamma": 2.0, "lr": 0.001}


def _people(n_rows: int, photos: int = 7) -> np.ndarray:
    return np.arange(n_rows) // photos


def test_a_lead_of_two_images_is_noise_and_a_lead_of_half_the_people_is_not() -> None:
    labels = np.random.default_rng(0).integers(0, 18, 280)
    people = _people(280)
    half = member(labels, people % 2 == 0, seed=1)  # right on every second person
    two_more = half.copy()
    two_more[[1, 8]] = np.eye(18)[labels[[1, 8]]]  # right on two more photos
    perfect = np.eye(18, dtype=np.float32)[labels]

    lead, low = lead_over(labels, people, perfect, half)
    assert lead > 0.3 and low > 0
    lead, low = lead_over(labels, people, two_more, half)
    assert 0 < lead < 0.02 and low <= 0
    assert lead_over(labels, people, half, half) == (0.0, 0.0)


def _trial(number: int, params: dict) -> FrozenTrial:
    from optuna.trial import create_trial

    t = create_trial(value=0.5)
    t.number, t.params = number, params  # only the number and the params matter here
    return t


def test_the_recipe_takes_the_place_of_the_first_configuration_not_clearly_better() -> None:
    a, b, recipe = _trial(3, {"lr": 0.1}), _trial(5, {"lr": 0.2}), _trial(0, RECIPE)
    leads = {3: (0.04, 0.01), 5: (0.001, -0.02)}
    chosen, why = recipe_first([a, b], recipe, lambda t: leads[t.number])
    assert [t.number for t in chosen] == [3, 0]
    assert "trial 5 leads the warm-start recipe (trial 0) by +0.0010" in why[0]
    chosen, why = recipe_first([b, a], recipe, lambda t: leads[t.number])
    assert [t.number for t in chosen] == [0, 5] and why
    leads[5] = (0.03, 0.002)  # both clearly better: the recipe is not refitted
    assert recipe_first([a, b], recipe, lambda t: leads[t.number]) == ([a, b], [])
    # the recipe already chosen, or no recipe in the study: nothing compared, nothing moved
    never = lambda t: pytest.fail("compared")  # noqa: E731
    assert recipe_first([recipe, a], recipe, never) == ([recipe, a], [])
    assert recipe_first([a], None, never) == ([a], [])


def test_is_recipe_needs_every_param_of_the_trial_to_be_the_recipes() -> None:
    assert is_recipe(_trial(0, dict(RECIPE)), [RECIPE])
    assert not is_recipe(_trial(1, {**RECIPE, "lr": 0.01}), [RECIPE])
    assert not is_recipe(_trial(2, {**RECIPE, "mixup": 0.2}), [RECIPE])
    assert not is_recipe(_trial(3, {}), [RECIPE])


def test_choose_final_refits_the_recipe_when_the_best_leads_it_by_noise(tmp_path,
                                                                         synth_data) -> None:
    """A study whose best trial is the recipe right on two more photos: the recipe is refitted;
    once a trial right everywhere is added, that one is."""
    maker = StudyMaker(tmp_path, synth_data)
    labels = maker.labels
    half = member(labels, np.arange(len(labels)) % 2 == 0, seed=1)
    two_more = half.copy()
    wrong = np.flatnonzero(half.argmax(axis=1) != labels)[:2]
    two_more[wrong] = np.eye(18)[labels[wrong]]
    maker.add(half, None, params=RECIPE)
    maker.add(two_more, None, params={"gamma": 0.0, "lr": 0.003})
    chosen, why = choose_final(maker.study, maker.store, 1, [RECIPE])
    assert [t.number for t in chosen] == [0]
    assert "trial 1 leads the warm-start recipe (trial 0)" in why[0]
    assert choose_final(maker.study, maker.store, 1, [])[0][0].number == 1  # no recipe: the best

    maker.add(np.eye(18, dtype=np.float32)[labels], None, params={"gamma": 0.0, "lr": 0.01})
    chosen, why = choose_final(maker.study, maker.store, 2, [RECIPE])
    assert [t.number for t in chosen] == [2, 0] and why  # trial 1 is within noise of the recipe


def test_choose_final_refuses_a_study_without_a_trial_with_all_folds(tmp_path,
                                                                      synth_data) -> None:
    maker = StudyMaker(tmp_path, synth_data)
    maker.add(member(maker.labels, maker.labels < 9, seed=0), None, params=RECIPE,
              fold_f1=[0.5])  # one fold of several: a trial stopped at the cheap fidelity
    with pytest.raises(DataError, match="no complete trial with all"):
        choose_final(maker.study, maker.store, 1, [RECIPE])
