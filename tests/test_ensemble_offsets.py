"""``search.ensemble --offsets`` through the CLI, and the rule that keeps offsets only when the
nested estimate says they help, both ways.

One trial (``--top 1 --size 1``: the best single trial through the decision-rule step) whose
probabilities are made by hand: every image's true class gets 0.8, except, in the "shifted"
trial, people aged 60, who get 0.45 on their class and 0.55 on the same mask and gender aged
30-59: the argmax calls every 60-year-old 30-59, and a small offset on the ">=60" group (log
0.55 - log 0.45 = 0.2) fixes all of them while moving nobody else (30-59-year-olds put 0.1 on
">=60", 2.1 below their class).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.labels import NUM_CLASSES, decode, encode
from tests.test_ensemble import StudyMaker


@pytest.fixture
def maker(tmp_path, synth_data, monkeypatch) -> StudyMaker:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    return StudyMaker(tmp_path, synth_data)


def probs(classes: np.ndarray, shifted: bool) -> np.ndarray:
    mask, gender, age = decode(classes)
    n = len(classes)
    p = np.full((n, NUM_CLASSES), 0.001)
    rows = np.arange(n)
    old = age == 2
    p[rows, classes] = np.where(old & shifted, 0.45, 0.8)
    p[rows[old], encode(mask, gender, 1)[old]] = 0.55 if shifted else 0.1
    middle = age == 1
    p[rows[middle], encode(mask, gender, 2)[middle]] = 0.1
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def submit(maker: StudyMaker, capsys, shifted: bool, *flags: str) -> dict:
    """The submission JSON of the one trial through the CLI with ``flags``."""
    maker.add(probs(maker.labels, shifted), probs(maker.answers, shifted))
    assert maker.cli("--top", "1", "--size", "1", "--no-gradcam", *flags) == 0
    capsys.readouterr()
    return json.loads(maker.out.with_suffix(".json").read_text())


def old_offset(payload: dict) -> set[float]:
    """The offsets of the 6 ">=60" classes minus those of their 30-59 twins."""
    off = np.asarray(payload["offsets"])
    return {round(float(off[c] - off[c - 1]), 6) for c in range(NUM_CLASSES) if c % 3 == 2}


@pytest.mark.parametrize("flags", [(), ("--offsets", "age")])
def test_offsets_that_fix_an_under_predicted_group_are_kept(flags, maker, capsys):
    assert (decode(maker.answers)[2] == 2).sum() >= 7  # eval has 60-year-olds to find
    payload = submit(maker, capsys, True, *flags)
    assert payload["rule"] == "offsets"
    assert min(old_offset(payload)) > 0.2  # every ">=60" class moved past its 30-59 twin
    fig = payload["figures"]
    assert fig["submission_eval_f1"] == 1.0  # every 60-year-old in eval found
    assert fig["best_single_argmax_eval_f1"] < 0.9  # none of them found by the argmax


def test_offsets_none_keeps_the_plain_argmax(maker, capsys):
    payload = submit(maker, capsys, True, "--offsets", "none")
    assert payload["rule"] == "argmax" and payload["offsets"] is None
    fig = payload["figures"]
    assert fig["submission_eval_f1"] == fig["best_single_argmax_eval_f1"] < 0.9


def test_offsets_that_do_not_help_are_not_kept(maker, capsys):
    payload = submit(maker, capsys, False)  # --offsets age, the default, tried
    assert payload["rule"] == "argmax" and payload["offsets"] is None
    assert payload["figures"]["submission_eval_f1"] == 1.0
