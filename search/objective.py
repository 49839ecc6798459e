"""The Optuna objective: trial -> config (from the study) -> k-fold training -> macro F1.

Why it looks like this:
- Folds are fixed per study (``person_folds`` with the study's seed), so every trial's
  out-of-fold (OOF) predictions line up row for row and can be ensembled later.
- Pruning: the step scheme is ``search.study_settings.REPORT_MODE`` (per epoch of each fold,
  or per fold with ``per_fold=True``), so a step means the same thing in every trial. A step is
  never reported twice (that is checked, not hoped).
- The objective value is macro F1 over all OOF predictions together against the TRUE labels.
  Each fold contributes its SELECTED epoch (``TrainConfig.select_epoch``): by default the last
  one, so no epoch is picked on the labels the trial is scored on; "best" is optimistic.
- Each fold's results are saved the moment the fold ends (its OOF slice, eval probabilities,
  checkpoint, and the user attr ``fold_done_<k>``), so a retried trial can resume from its
  finished folds and an interrupted one loses at most the running fold.
- A retry of a trial whose worker died (``RetryHeartbeatStaleTrialCallback``, or the journal
  reaper in ``search.worker.claims``) inherits the dead trial's user attrs; when its config and
  data are the same, it reuses those finished folds (probabilities, checkpoint, reported values) and
  trains only the rest. ``resumed_folds`` lists the reused ones.
- A final-stage trial (``search.refit``, marked by its user attrs, ``search.worker.stage``) trains
  with its own epochs (``refit_epochs``) instead of the study's, reports its curve at the same step
  scheme (so the dashboard draws it), and is never pruned: a divergence makes it FAIL.
- ``data_fingerprint``, ``folds_fingerprint`` and ``eval_fingerprint`` (user attrs) say which
  rows a trial's OOF and eval probabilities belong to; the ensemble refuses mismatches.
- Data (tables, folds, image caches) is loaded once per process in ``StudyData``. Folds and the
  eval set reach the engine as views on the cache's memmap (``ImageCache.view``), never as
  copies: a copy per fold (and of the eval set per trial) costs ~10 GB of RAM per worker on the
  real set.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import torch

from core.atomic import atomic_write
from core.config import MACHINE_FIELDS, ConfigError, TrainConfig
from core.dataset import training_targets
from core.engine import FoldResult, fit_fold, predict
from core.errors import DataError
from core.labels import NUM_CLASSES
from core.loader import RowView
from core.metrics import macro_f1
from core.study_data import StudyData
from core.weights import weights_file
from search import artifacts
from search.artifacts import (
    CLASS_F1,
    CONFUSION,
    EVAL,
    OOF,
    checkpoint_name,
    checkpoint_names,
    eval_fold_name,
    fold_done_attr,
    oof_fold_name,
)
from search.pseudo_labels import pseudo_training, with_pseudo
from search.space import check_fixed
from search.study_settings import StudySettings, pruning_step
from search.trial_plots import class_f1, confusion_png
from search.worker.budget import Budget
from search.worker.claims import retried_from
from search.worker.stage import final_epochs, is_final


@dataclass(frozen=True)
class FoldInputs:
    """One trial's arrays, cut per fold by the folds: training images (a memmap view), the
    eval images, the training targets (after the trial's age threshold), and the eval images
    with pseudo-labels every fold also trains on (``search.pseudo_labels``; opt-in)."""

    images: RowView
    eval_images: RowView
    targets: np.ndarray
    pseudo: np.ndarray | None = None  # per fold, per eval row: its pseudo-label, -1 for none

    def training(self, fold: int, val: np.ndarray) -> tuple[RowView, np.ndarray]:
        """(images, targets) fold ``fold`` trains on: the rows outside ``val``, then its pseudo
        ones."""
        images, targets = self.images[~val], self.targets[~val]
        if self.pseudo is None:
            return images, targets
        return with_pseudo(images, targets, self.eval_images, self.pseudo[fold])


@dataclass
class FoldSums:
    """What a trial's folds add up to: OOF rows, summed eval probabilities, each fold's F1, the
    epochs trained, the speeds seen, the folds resumed from a dead try."""

    oof: np.ndarray
    eval_sum: np.ndarray
    fold_f1: list[float] = field(default_factory=list)
    epochs_trained: int = 0
    speeds: list[float] = field(default_factory=list)
    resumed: list[int] = field(default_factory=list)

    def add(self, val: np.ndarray, val_probs: np.ndarray, eval_probs: np.ndarray,
            f1: float) -> None:
        self.oof[val] = val_probs
        self.eval_sum += eval_probs
        self.fold_f1.append(f1)


class FinalTrialDiverged(RuntimeError):
    """A final-stage trial's training blew up: it FAILs with this reason (never PRUNED)."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@dataclass(frozen=True)
class Machine:
    """Where and how this worker trains: what may differ between the machines of one study
    without changing what a trial means (so it is never stored on the study)."""

    device: str | None = None  # None: the config's own (the GPU when there is one)
    loader_workers: int | None = None  # None: the config's own
    weights: Path | None = None  # the local pretrained-weights folder (``--weights``)
    progress: bool = False
    budget: Budget | None = None  # the run's deadline, checked between epochs


class Objective:
    """Callable for ``study.optimize``: the study's module (its space), data, artifact store,
    fixed settings and this machine. ``fit``/``predict_fn`` are injectable for tests."""

    def __init__(self, study_module: ModuleType, data: StudyData, store: Any,
                 settings: StudySettings, machine: Machine = Machine(), *,
                 fit: Callable[..., FoldResult] = fit_fold,
                 predict_fn: Callable[..., np.ndarray] = predict) -> None:
        self.study_module, self.data, self.store = study_module, data, store
        self.settings, self.machine = settings, machine
        self.fit, self.predict = fit, predict_fn

    def config(self, trial: optuna.Trial) -> TrainConfig:
        """The study's space with the run's fixed epochs (a final-stage trial's own), device,
        loader workers and local weights file; validated. A sampled value the run's epochs cannot
        honour (a warmup longer than the run) is clamped and recorded as used (user attr
        ``clamped``)."""
        cfg = self.study_module.space(trial)
        check_fixed(trial, self.settings.fixed)
        cfg.epochs = int(final_epochs(trial) or self.settings.epochs)
        used_warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0) * 0.5)
        if used_warmup != cfg.warmup_epochs:
            trial.set_user_attr("clamped", {"warmup_epochs": {"sampled": cfg.warmup_epochs,
                                                              "used": used_warmup}})
            cfg.warmup_epochs = used_warmup
        machine = self.machine
        if machine.device is not None:
            cfg.device = machine.device
        if machine.loader_workers is not None:
            cfg.num_workers = int(machine.loader_workers)
        if cfg.pretrained and machine.weights is not None:
            path = weights_file(machine.weights, cfg.backbone)
            if path is None:
                raise ConfigError(f"no weights for backbone {cfg.backbone!r} in {machine.weights} "
                                  f"(python -m search.weights fills it)")
            cfg.pretrained_file = str(path)
        return cfg.validate()

    def resumable(self, trial: optuna.Trial, cfg: TrainConfig) -> dict[int, dict]:
        """Finished folds a retried trial inherited (fold -> ``fold_done`` summary), if usable.

        Only when the config (machine fields aside) and the data and folds are the ones those
        folds were trained with; otherwise the retry starts over.
        """
        if retried_from(trial) is None:
            return {}
        attrs = trial.user_attrs

        def same(config: dict | None) -> bool:
            machine = dict.fromkeys(MACHINE_FIELDS)  # where it runs, not what it trains
            return config is not None and {**config, **machine} == {**cfg.to_dict(), **machine}

        if not (same(attrs.get("config"))
                and all(attrs.get(k) == v for k, v in self.data.fingerprints().items())):
            return {}
        return {k: attrs[fold_done_attr(k)] for k in range(self.data.n_folds)
                if isinstance(attrs.get(fold_done_attr(k)), dict)}

    def _load_fold(self, trial: optuna.Trial, k: int,
                   n_val: int, n_eval: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A finished fold's saved (oof slice, eval probs); None when gone or the wrong shape."""
        try:
            val = artifacts.load_array(trial, self.store, oof_fold_name(k))
            ev = artifacts.load_array(trial, self.store, eval_fold_name(k))
        except DataError:
            return None
        if val.shape != (n_val, NUM_CLASSES) or ev.shape != (n_eval, NUM_CLASSES):
            return None
        return val, ev

    def __call__(self, trial: optuna.Trial) -> float:
        """config -> each fold (resumed from a dead try, else trained) -> macro F1 -> saved."""
        cfg = self.config(trial)
        data = self.data
        done = self.resumable(trial, cfg)
        trial.set_user_attr("config", cfg.to_dict())
        prints = data.fingerprints()
        for name, value in prints.items():
            trial.set_user_attr(name, value)
        eval_images = data.eval_images(cfg.image_size)
        inputs = FoldInputs(data.train_images(cfg.image_size), eval_images,
                            training_targets(data.table, cfg.age_threshold),
                            pseudo_training(trial.user_attrs, len(eval_images),
                                            prints["eval_fingerprint"], data.n_folds))
        sums = FoldSums(np.zeros((len(data.labels), NUM_CLASSES), np.float32),
                        np.zeros((len(inputs.eval_images), NUM_CLASSES), np.float64))
        trial.set_user_attr("epochs_trained", 0)  # a retry inherits the dead trial's count
        report = self._reporter(trial)
        for k in range(data.n_folds):
            saved = self._resume_fold(trial, k, done, cfg, report) if k in done else None
            if saved is None:
                self._train_fold(trial, k, cfg, inputs, sums, report)
                continue
            sums.add(data.folds == k, *saved)  # a retry: it finished before its worker died
            sums.resumed.append(k)
            trial.set_user_attr("resumed_folds", sums.resumed)

        value = macro_f1(data.labels, sums.oof)
        trial.set_user_attr("images_per_s", float(np.mean(sums.speeds)) if sums.speeds else 0.0)
        self._save_trial(trial, data.labels, sums.oof,
                         (sums.eval_sum / data.n_folds).astype(np.float32), value)
        return value

    @staticmethod
    def _reporter(trial: optuna.Trial) -> Callable[[float, int], bool]:
        """``report(value, step) -> prune?`` for this trial: a step reported twice is a bug
        (raised), and a final-stage trial is never pruned."""
        reported: set[int] = set()
        final = is_final(trial)

        def report(value: float, step: int) -> bool:
            if step in reported:
                raise RuntimeError(f"trial {trial.number}: step {step} reported twice")
            reported.add(step)
            trial.report(value, step)
            return not final and trial.should_prune()

        return report

    def _train_fold(self, trial: optuna.Trial, k: int, cfg: TrainConfig, inputs: FoldInputs,
                    sums: FoldSums, report: Callable[[float, int], bool]) -> None:
        """Train fold ``k``, report its curve, save its files the moment it ends, add it to
        ``sums``; a divergence or the pruner ends the trial (``TrialPruned``, or FAIL when
        final)."""
        val = self.data.folds == k
        labels = self.data.labels

        def on_epoch(epoch: int, val_f1: float) -> bool:
            if self.machine.budget is not None:  # the deadline stops a trial between epochs
                self.machine.budget.check()
            if self.settings.per_fold or not math.isfinite(val_f1):
                return False
            return report(val_f1, pruning_step(False, k, epoch, cfg.epochs))

        result = self.fit(cfg, *inputs.training(k, val), inputs.images[val], labels[val],
                          on_epoch=on_epoch, progress=self.machine.progress)
        sums.epochs_trained += len(result.history)
        sums.speeds += [h["images_per_s"] for h in result.history if "images_per_s" in h]
        trial.set_user_attr("epochs_trained", sums.epochs_trained)
        if result.diverged:
            why = f"diverged in fold {k} (non-finite loss or predictions, lr={cfg.lr:g})"
            if is_final(trial):
                raise FinalTrialDiverged(why)
            self._prune(trial, why)
        if result.stopped_early:
            self._prune(trial, f"pruner at fold {k}, epoch {len(result.history) - 1}")

        eval_probs = self.predict(result.state_dict, cfg, inputs.eval_images).astype(np.float32)
        self._save_fold(trial, k, result, eval_probs)
        sums.add(val, result.val_probs, eval_probs, float(result.selected_f1))
        trial.set_user_attr("fold_f1", sums.fold_f1)
        if self.settings.per_fold and report(float(result.selected_f1),
                                    pruning_step(True, k, 0, cfg.epochs)):
            self._prune(trial, f"pruner after fold {k}")

    def _resume_fold(self, trial: optuna.Trial, k: int, done: dict[int, dict], cfg: TrainConfig,
                     report: Callable[[float, int], bool]
                     ) -> tuple[np.ndarray, np.ndarray, float] | None:
        """A finished fold of the dead trial: (OOF slice, eval probs, F1), its values reported
        again at their steps (the pruner already let them pass); None when its files are gone
        or do not fit, and the fold trains again."""
        saved = self._load_fold(trial, k, int((self.data.folds == k).sum()),
                                len(self.data.eval_table))
        if saved is None:
            return None
        values = [done[k]["f1"]] if self.settings.per_fold else done[k].get("curve", [])
        for e, v in enumerate(values):
            if math.isfinite(v):
                report(float(v), pruning_step(self.settings.per_fold, k, e, cfg.epochs))
        return saved[0], saved[1], float(done[k]["f1"])

    def _save_fold(self, trial: optuna.Trial, k: int, result: FoldResult,
                   eval_probs: np.ndarray) -> None:
        artifacts.save_array(trial, self.store, oof_fold_name(k), result.val_probs)
        artifacts.save_array(trial, self.store, eval_fold_name(k), eval_probs)
        with tempfile.TemporaryDirectory(prefix="mask_search_ckpt_") as tmp:
            path = Path(tmp) / f"trial{trial.number}_fold{k}.pt"
            _atomic_torch_save(result.state_dict, path)
            artifacts.save_file(trial, self.store, checkpoint_name(k), path)
        trial.set_user_attr(fold_done_attr(k), {
            "f1": float(result.selected_f1), "selected_epoch": int(result.selected_epoch),
            "best_f1": float(result.best_f1), "best_epoch": int(result.best_epoch),
            "epochs": len(result.history),
            "curve": [float(h["val_f1"]) for h in result.history]})

    def _save_trial(self, trial: optuna.Trial, labels: np.ndarray, oof: np.ndarray,
                    eval_probs: np.ndarray, value: float) -> None:
        artifacts.save_array(trial, self.store, OOF, oof)
        artifacts.save_array(trial, self.store, EVAL, eval_probs)
        pred = oof.argmax(axis=1)
        with tempfile.TemporaryDirectory(prefix="mask_search_plots_") as tmp:
            png = Path(tmp) / f"confusion_trial{trial.number}.png"
            confusion_png(labels, pred, png,
                          f"trial {trial.number}: out-of-fold macro F1 {value:.4f}")
            artifacts.save_file(trial, self.store, CONFUSION, png)
            js = Path(tmp) / f"class_f1_trial{trial.number}.json"
            js.write_text(json.dumps(class_f1(labels, pred), indent=1))
            artifacts.save_file(trial, self.store, CLASS_F1, js)

    def _prune(self, trial: optuna.Trial, why: str) -> None:
        """Stop the trial as PRUNED, saying why (user attr ``pruned_because``). A pruned trial
        is never ensembled: every checkpoint it holds goes now (also folds a retry inherited,
        and any fold numbered above the one that was pruned)."""
        for name in checkpoint_names(trial):
            artifacts.remove_artifact(trial, self.store, name)
        trial.set_user_attr("pruned_because", why)
        raise optuna.TrialPruned(why)
