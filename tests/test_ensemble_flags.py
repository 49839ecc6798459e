"""``search.ensemble``'s selection flags through the CLI: ``--pool-margin``, ``--init``,
``--margin``, ``--bags``. Each changes which trials the submission is made of.

The trials are made so the right answer is plain: "strong" trials are right on the images with
a mask worn or worn incorrectly (classes 0..11) and wrong on the others; "rescue" trials are right
on the unmasked images (classes 12..17) only, so alone they score far below the strong ones, but
a strong trial and a rescue trial blended are right everywhere. Trials of one kind make the same
predictions (only their probabilities' noise differs): one adds nothing to the other.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.labels import NUM_CLASSES
from tests.test_ensemble import StudyMaker

UNMASKED_FROM = 12  # class = mask * 6 + gender * 3 + age group; mask "not worn" = 2


def probs(classes: np.ndarray, right: np.ndarray, seed: int) -> np.ndarray:
    """0.8 on the true class where ``right``, else 0.3 on the next class; the rest spread
    evenly (below 0.05 each), with a little noise: the argmax is the same whatever the seed."""
    rng = np.random.default_rng(seed)
    n = len(classes)
    guess = np.where(right, classes, (classes + 1) % NUM_CLASSES)
    top = np.where(right, 0.8, 0.3)
    p = np.repeat(((1 - top) / (NUM_CLASSES - 1))[:, None], NUM_CLASSES, axis=1)
    p[np.arange(n), guess] = top
    p = p + rng.uniform(0, 0.001, p.shape)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def maker(tmp_path, synth_data, monkeypatch) -> StudyMaker:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    return StudyMaker(tmp_path, synth_data)


def add(maker: StudyMaker, kind: str, seed: int) -> int:
    """A trial right on classes 0..11 ("strong") or on 12..17 ("rescue"), OOF and eval alike."""
    def right(classes: np.ndarray) -> np.ndarray:
        unmasked = classes >= UNMASKED_FROM
        return unmasked if kind == "rescue" else ~unmasked

    return maker.add(probs(maker.labels, right(maker.labels), seed),
                     probs(maker.answers, right(maker.answers), seed + 100))


def members(maker: StudyMaker, capsys, *flags: str) -> set[int]:
    """The trial numbers the submission is made of (weight > 0) after the CLI with ``flags``.
    These studies plant 2-3 trials, fewer than ``MIN_POOL``: ``--min-pool 1`` lets the ensemble
    be submitted, since the selection flags are what is tested here."""
    assert maker.cli("--no-gradcam", "--min-pool", "1", *flags) == 0
    capsys.readouterr()
    payload = json.loads(maker.out.with_suffix(".json").read_text())
    return {m["trial"] for m in payload["members"]}


def test_pool_margin_lets_a_weak_but_complementary_trial_in(maker, capsys):
    strong, second = add(maker, "strong", 0), add(maker, "strong", 2)
    rescue = add(maker, "rescue", 1)
    values = {t.number: t.value for t in maker.study.trials}
    assert values[strong] == values[second] > values[rescue] + 0.3  # far below, as said
    # default margin 0.05: the rescue trial is far below the pool's median and never enters
    assert rescue not in members(maker, capsys)
    assert rescue not in members(maker, capsys, "--pool-margin", "0.1")
    # a margin wide enough, or a negative one (keep all): it enters and makes the submission
    assert {strong, rescue} <= members(maker, capsys, "--pool-margin", "0.9")
    assert {strong, rescue} <= members(maker, capsys, "--pool-margin", "-1")
    assert second not in members(maker, capsys, "--pool-margin", "-1", "--bags", "1")


def test_init_starts_from_the_n_best_trials(maker, capsys):
    strong, second = add(maker, "strong", 0), add(maker, "strong", 2)
    rescue = add(maker, "rescue", 1)
    keep_all = ("--pool-margin", "-1", "--bags", "1")
    # from the best alone, the second strong trial adds nothing and is left out
    assert members(maker, capsys, *keep_all, "--init", "1") == {strong, rescue}
    # from the two best, it is in the submission whatever it adds
    assert members(maker, capsys, *keep_all, "--init", "2") == {strong, second, rescue}


def test_margin_is_what_an_addition_must_gain(maker, capsys):
    strong, rescue = add(maker, "strong", 0), add(maker, "rescue", 1)
    keep_all = ("--pool-margin", "-1", "--bags", "1")
    assert members(maker, capsys, *keep_all, "--margin", "0") == {strong, rescue}
    # the rescue trial lifts macro F1 by well under 0.9: with that margin it is not worth it
    assert members(maker, capsys, *keep_all, "--margin", "0.9") == {strong}


def test_bags_spread_the_weight_over_equally_good_trials(maker, capsys):
    strong, rescue_a, rescue_b = (add(maker, "strong", 0), add(maker, "rescue", 1),
                                  add(maker, "rescue", 3))
    keep_all = ("--pool-margin", "-1")
    one = members(maker, capsys, *keep_all, "--bags", "1")
    assert strong in one and len(one & {rescue_a, rescue_b}) == 1  # one selection: one of them
    # ten bags, each with the best trial and one of the other two: both rescues get weight
    assert members(maker, capsys, *keep_all, "--bags", "10") == {strong, rescue_a, rescue_b}


def sure(classes: np.ndarray, top: float, seed: int) -> np.ndarray:
    """Right on every row, with probability ``top`` on the true class (the rest spread)."""
    rng = np.random.default_rng(seed)
    p = np.full((len(classes), NUM_CLASSES), (1 - top) / (NUM_CLASSES - 1))
    p[np.arange(len(classes)), classes] = top
    p = p + rng.uniform(0, 0.001, p.shape)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def test_objective_logloss_takes_a_trial_that_only_sharpens_the_probabilities(maker, capsys):
    """Two trials right on every row, one unsure (0.3 on the true class), one sure (0.8): macro
    F1 is 1.0 either way, so F1 selection keeps the first alone; the blend's log loss is lower
    than the unsure trial's, so ``--objective logloss`` adds the sure one."""
    unsure = maker.add(sure(maker.labels, 0.3, 0), sure(maker.answers, 0.3, 100))
    confident = maker.add(sure(maker.labels, 0.8, 1), sure(maker.answers, 0.8, 101))
    keep_all = ("--pool-margin", "-1", "--bags", "1", "--offsets", "none")
    assert members(maker, capsys, *keep_all) == {unsure}
    assert members(maker, capsys, *keep_all, "--objective", "logloss") == {unsure, confident}
