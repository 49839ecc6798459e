"""The objective's contract with the engine, through a stand-in ``fit`` that records its inputs.

- Age relabeling (DESIGN, rule 2): a threshold below 60 changes the training targets only;
  validation labels, the out-of-fold scores, the objective value and the ensemble's figures
  all use the true labels (threshold 60).
- Pruning steps (DESIGN, "Pruning with k-fold"): one report per epoch of each fold, at step
  ``fold * epochs + epoch``, in that order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from core.engine import FoldResult
from core.labels import NUM_CLASSES
from search import artifacts
from search.artifacts import OOF
from search.ensemble.cli import main as ensemble_main
from tests.conftest import FAST, STUDY_DATA_FOLDS

DEMO = __import__("studies.demo", fromlist=["space"])


pytestmark = pytest.mark.usefixtures("quiet_optuna")


def soft_one_hot(classes: np.ndarray) -> np.ndarray:
    """Probabilities that put 0.9 on ``classes`` (argmax = ``classes``), rows summing to 1."""
    probs = np.full((len(classes), NUM_CLASSES), 0.1 / (NUM_CLASSES - 1), np.float32)
    probs[np.arange(len(classes)), classes] = 0.9
    return probs


class RecordingFit:
    """A stand-in for ``core.engine.fit_fold``: records the config, targets and labels of each
    call and predicts each validation image as the label it was handed (a perfect model of
    whatever the objective calls the truth). ``curve(fold, epoch)`` is each epoch's value."""

    def __init__(self, curve=lambda fold, epoch: 0.5) -> None:
        self.train_targets: list[np.ndarray] = []
        self.val_labels: list[np.ndarray] = []
        self.configs: list = []  # the TrainConfig of each call
        self.curve = curve

    def __call__(self, cfg, tr_x, tr_y, va_x, va_y, on_epoch=None, progress=False) -> FoldResult:
        fold = len(self.train_targets)
        self.configs.append(cfg)
        self.train_targets.append(np.asarray(tr_y).copy())
        self.val_labels.append(np.asarray(va_y).copy())
        history = []
        for e in range(cfg.epochs):
            value = self.curve(fold, e)
            history.append({"epoch": e, "val_f1": value})
            if on_epoch is not None and on_epoch(e, value):
                break
        return FoldResult(best_f1=history[-1]["val_f1"], best_epoch=len(history) - 1,
                          history=history, val_probs=soft_one_hot(np.asarray(va_y)),
                          state_dict={"w": torch.zeros(1)}, selected_epoch=len(history) - 1,
                          selected_f1=history[-1]["val_f1"])


def uniform_predict(state_dict, cfg, images) -> np.ndarray:
    return np.full((len(images), NUM_CLASSES), 1 / NUM_CLASSES, np.float32)


def true_and_relabelled(table, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """(true class, training class at ``threshold``) from the table's mask, gender and age, by
    the competition's rule written out here: age group 0 below 30, 2 from 60 (or from the
    threshold for training), else 1; class = mask * 6 + gender * 3 + age group."""
    mask, gender, age = (table[c].to_numpy() for c in ("mask", "gender", "age"))
    base = mask * 6 + gender * 3
    true = base + np.where(age < 30, 0, np.where(age >= 60, 2, 1))
    train = base + np.where(age < 30, 0, np.where(age >= threshold, 2, 1))
    return true, train


def test_relabelling_changes_training_targets_only(study_data, tiny_data: Path,
                                                   tmp_path: Path, capsys) -> None:
    threshold = 57
    table, folds = study_data.table, study_data.folds
    true, train = true_and_relabelled(table, threshold)
    moved = (table["age"] >= threshold) & (table["age"] < 60)
    assert moved.sum() >= 7 and (true != train).sum() == moved.sum()  # the test has teeth
    assert (true == study_data.labels).all()

    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="relabel", storage=storage, direction="maximize")
    for key, value in (("data_dir", str(tiny_data)), ("n_folds", STUDY_DATA_FOLDS),
                       ("fold_seed", 0), ("corrections", str(tiny_data / "corrections.csv"))):
        study.set_user_attr(key, value)
    study.enqueue_trial({**FAST, "age_threshold": threshold})
    store = artifacts.open_store(tmp_path / "art")
    fit = RecordingFit()
    study.optimize(demo_objective(study_data, store, fit), n_trials=1)
    trial = study.trials[0]
    assert trial.params["age_threshold"] == threshold

    # fit trains on the relabelled targets and validates on the true labels, fold by fold
    assert len(fit.train_targets) == STUDY_DATA_FOLDS
    for k in range(STUDY_DATA_FOLDS):
        np.testing.assert_array_equal(fit.train_targets[k], train[folds != k])
        np.testing.assert_array_equal(fit.val_labels[k], true[folds == k])

    # the model predicts the truth it was shown: every score against the true labels is 1
    oof = artifacts.load_array(trial, store, OOF)
    np.testing.assert_array_equal(oof.argmax(axis=1), true)
    assert trial.value == 1.0
    assert trial.user_attrs["fold_f1"] == [0.5] * STUDY_DATA_FOLDS  # fit's own figure, kept

    out = tmp_path / "out" / "submission.csv"
    assert ensemble_main(["--study", "relabel", "--storage", storage, "--artifacts",
                          str(tmp_path / "art"), "--out", str(out), "--top", "1", "--size", "1",
                          "--offsets", "none", "--no-gradcam"]) == 0
    capsys.readouterr()
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["figures"]["best_single_oof_f1"] == 1.0
    assert [m["oof_f1"] for m in payload["members"]] == [1.0]


def demo_objective(data, store, fit, epochs: int = DEMO.EPOCHS):
    """The demo study's objective with ``fit`` standing in for the engine."""
    from search.objective import Objective
    from search.study_settings import StudySettings

    return Objective(DEMO, data, store, StudySettings.of(data, epochs), fit=fit,
                     predict_fn=uniform_predict)


class RecordingPruner(optuna.pruners.BasePruner):
    """Never prunes; records the steps of each report in the order the objective made them
    (the objective asks after every report; ``last_step`` is the highest step, not the last)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.steps += sorted(set(trial.intermediate_values) - set(self.steps))
        return False


def test_each_epoch_is_reported_at_fold_times_epochs_plus_epoch_in_order(study_data,
                                                                        tmp_path: Path) -> None:
    pruner = RecordingPruner()
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.enqueue_trial(FAST)
    fit = RecordingFit(curve=lambda fold, epoch: (10 * fold + epoch + 1) / 100)
    study.optimize(demo_objective(study_data, artifacts.open_store(tmp_path / "a"), fit,
                                  epochs=3), n_trials=1)
    # 2 folds x 3 epochs: fold 0's epochs 0, 1, 2 are steps 0, 1, 2; fold 1's are 3, 4, 5
    assert pruner.steps == [0, 1, 2, 3, 4, 5]
    assert study.trials[0].intermediate_values == pytest.approx(
        {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.11, 4: 0.12, 5: 0.13})
