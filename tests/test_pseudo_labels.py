"""Pseudo-labels (opt-in: ``search.refit --pseudo-labels P``): only the eval images whose
submitted class the submission is at least P sure of, added to every fold's training rows and
never to its validation rows; off unless asked; recorded on the final trial."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest

import search.run
from core.config import ConfigError
from core.labels import NUM_CLASSES
from search import pseudo_labels, refit
from search.ensemble import cli as ensemble
from search.objective import Objective
from search.worker.stage import is_final
from tests.test_objective import RecordingFit
from tests.test_run_flags import run_demo, url_in

FOLDS = 2


def sure_of(classes: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Rows with probability ``p`` on ``classes`` and the rest spread evenly."""
    out = np.repeat(((1 - p) / (NUM_CLASSES - 1))[:, None], NUM_CLASSES, axis=1)
    out[np.arange(len(classes)), classes] = p
    return out.astype(np.float32)


def eval_guess(n: int, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """What fold ``fold``'s stand-in model predicts for eval row i: class i % 18, with
    probability 0.95 when (i + fold) % 3 == 0, 0.85 when it is 1, 1/18 (no idea) when 2; so
    each fold's models are sure of other rows."""
    rows = np.arange(n)
    return rows % NUM_CLASSES, np.array([0.95, 0.85, 1 / NUM_CLASSES])[(rows + fold) % 3]


def guessing_predict() -> Callable:
    """``predict_fn`` for the objective: every trial predicts the eval images once per fold, in
    fold order, so call j is fold j % FOLDS's."""
    calls = itertools.count()

    def predict(state_dict, cfg, images) -> np.ndarray:
        return sure_of(*eval_guess(len(images), next(calls) % FOLDS))

    return predict


def test_confident_takes_the_submitted_class_where_it_reaches_the_threshold() -> None:
    probs = sure_of(np.array([3, 5, 7, 0, 2]), np.array([0.95, 0.9, 0.89, 1 / 18, 0.95]))
    submitted = np.array([3, 5, 7, 0, 4])  # the last: offsets moved it off the sure argmax
    assert pseudo_labels.confident(probs, submitted, 0.9).tolist() == [3, 5, -1, -1, -1]


def test_the_threshold_for_a_share_takes_at_least_that_share_and_no_lower_one() -> None:
    confidence = np.array([0.3, 0.9, 0.5, 0.7, 0.1, 0.6, 0.8, 0.2, 0.4, 0.55])
    assert pseudo_labels.threshold_for_share(confidence, 0.2) == 0.8  # 0.9 and 0.8
    assert pseudo_labels.threshold_for_share(confidence, 0.25) == 0.7  # 3 of 10 >= 25%
    assert pseudo_labels.threshold_for_share(confidence, 1.0) == 0.1
    assert pseudo_labels.threshold_for_share(confidence, 0.01) == 0.9


def test_a_trial_trains_on_one_set_of_pseudo_labels_per_fold_and_refuses_one_for_all() -> None:
    attrs = {"pseudo_eval_fingerprint": "e", "pseudo_classes": ["0.", ".h"]}
    np.testing.assert_array_equal(pseudo_labels.pseudo_training(attrs, 2, "e", 2),
                                  [[0, -1], [-1, 17]])
    assert pseudo_labels.pseudo_training({}, 2, "e", 2) is None  # not asked
    for classes in ("0.", ["0."]):  # one set for every fold (an older refit), or too few
        with pytest.raises(ConfigError, match="not one set per fold"):
            pseudo_labels.pseudo_training({**attrs, "pseudo_classes": classes}, 2, "e", 2)
    with pytest.raises(ConfigError, match="another eval set"):
        pseudo_labels.pseudo_training(attrs, 2, "other", 2)


def test_the_text_record_round_trips_every_class_and_the_rows_not_taken() -> None:
    taken = np.array([-1, *range(NUM_CLASSES), -1, 17, 0])
    text = pseudo_labels.encode(taken)
    assert len(text) == len(taken) and text == ".0123456789abcdefgh.h0"
    np.testing.assert_array_equal(pseudo_labels.decode(text), taken)


@pytest.fixture(autouse=True)
def _runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))


@pytest.fixture
def fit(monkeypatch: pytest.MonkeyPatch) -> RecordingFit:
    """search.run's and search.refit's objective with a stand-in fit (records the targets it
    is handed) and ``guessing_predict`` for the eval images."""
    fit = RecordingFit()
    predict = guessing_predict()
    monkeypatch.setattr("search.objective.confusion_png",
                        lambda labels, pred, path, title: Path(path).write_bytes(b""))
    monkeypatch.setattr(search.run, "Objective", lambda *a, **k: Objective(
        *a, **k, fit=fit, predict_fn=predict))
    return fit


def refit_demo(folder: Path, *extra: str) -> int:
    return refit.main(["--study", "demo", "--storage", url_in(folder), "--artifacts",
                       str(folder / "art"), "--top", "1", "--device", "cpu", *extra])


@pytest.mark.usefixtures("quiet_optuna")
def test_a_refit_trains_on_the_sure_eval_images_only_when_asked(fit, tiny_data, tmp_path,
                                                                capfd) -> None:
    assert run_demo(tmp_path, tiny_data, "--trials", "2") == 0
    # asked before any ensemble: one line saying what to run
    assert refit_demo(tmp_path, "--pseudo-labels", "0.9") == 2
    assert capfd.readouterr().err == ("error: study 'demo' has no ensemble yet "
                                      f"({tmp_path / 'runs' / 'demo' / 'submission.json'} is "
                                      "missing): run python -m search.ensemble --study demo "
                                      "first\n")
    assert ensemble.main(["--study", "demo", "--storage", url_in(tmp_path), "--artifacts",
                          str(tmp_path / "art"), "--data", str(tiny_data), "--min-pool", "1",
                          "--offsets", "none", "--no-gradcam"]) == 0
    train_rows = [len(t) for t in fit.train_targets[:FOLDS]]  # a search trial's folds

    assert refit_demo(tmp_path) == 0  # not asked: the final trial trains as the search did
    plain = optuna.load_study(study_name="demo", storage=url_in(tmp_path)).trials[-1]
    assert is_final(plain) and not any(k.startswith("pseudo") for k in plain.user_attrs)
    assert [len(t) for t in fit.train_targets[-FOLDS:]] == train_rows

    assert refit_demo(tmp_path, "--pseudo-labels", "0.99") == 2  # nothing that sure
    # the eval rows are 0.95, 0.85 and 1/18 sure in turn (eval_guess): the threshold named for
    # a fifth of them is 0.95 (float32, printed rounded down), which takes 10 of fold 0's 28
    # rows and 9 of fold 1's
    assert ("no eval image's submitted class is that sure (the surest is 0.950); lower it "
            "(0.949 takes 34% of them)") in capfd.readouterr().err
    written = tmp_path / "runs" / "demo" / "submission.json"
    payload = json.loads(written.read_text())
    written.write_text(json.dumps({**payload, "eval_fingerprint": "another eval set"}))
    assert refit_demo(tmp_path, "--pseudo-labels", "0.9") == 2  # a stale submission
    assert "was not written from these trials' eval predictions" in capfd.readouterr().err
    written.write_text(json.dumps(payload))
    assert refit_demo(tmp_path, "--pseudo-labels", "0.9") == 0
    assert "pseudo-labels: 10, 9 eval images in folds 0..1 (34%)" in capfd.readouterr().out
    final = optuna.load_study(study_name="demo", storage=url_in(tmp_path)).trials[-1]
    assert is_final(final) and final.user_attrs["refit_of"] == plain.user_attrs["refit_of"]
    # each fold trains on what that fold's models (which never saw its validation people) were
    # sure of: 4 eval people x 7 images; 0.85 and 1/18 are below 0.9
    expected = [classes[p >= 0.9] for classes, p in (eval_guess(28, k) for k in range(FOLDS))]
    attrs = final.user_attrs
    assert (attrs["pseudo_threshold"], attrs["pseudo_count"], attrs["pseudo_share"]) == \
        (0.9, [10, 9], round(19 / 56, 4))
    for targets, n, mine in zip(fit.train_targets[-FOLDS:], train_rows, expected, strict=True):
        assert len(targets) == n + len(mine)
        np.testing.assert_array_equal(targets[n:], mine)  # after the fold's own rows
    for labels, val in zip(fit.val_labels[-FOLDS:], fit.val_labels[:FOLDS], strict=True):
        np.testing.assert_array_equal(labels, val)  # validation: the fold's people only
