"""The Optuna objective: trial -> config (from the study) -> k-fold training -> macro F1.

Why it looks like this:
- Folds are fixed per study (``person_folds`` with the study's seed), so every trial's
  out-of-fold (OOF) predictions line up row for row and can be ensembled later.
- Pruning: one value per epoch of each fold at step ``fold * epochs + epoch``, so a step means
  the same thing in every trial and Median/Halving/Hyperband compare like with like; with
  ``per_fold=True`` (the Wilcoxon pruner) one value per fold at step ``fold``. A step is never
  reported twice (that is checked, not hoped).
- The objective value is macro F1 over all OOF predictions together against the TRUE labels.
  Each fold contributes its SELECTED epoch (``TrainConfig.select_epoch``): by default the last
  one, so no epoch is picked on the labels the trial is scored on; "best" is optimistic.
- Each fold's results are saved the moment the fold ends (its OOF slice, eval probabilities,
  checkpoint, and the user attr ``fold_done_<k>``), so a retried trial can resume from its
  finished folds and an interrupted one loses at most the running fold.
- A retry of a trial whose worker died (``RetryHeartbeatStaleTrialCallback``, or the journal
  reaper in ``search.claims``) inherits the dead trial's user attrs; when its config and data
  are the same, it reuses those finished folds (probabilities, checkpoint, reported values) and
  trains only the rest. ``resumed_folds`` lists the reused ones.
- ``data_fingerprint``, ``folds_fingerprint`` and ``eval_fingerprint`` (user attrs) say which
  rows a trial's OOF and eval probabilities belong to; the ensemble refuses mismatches.
- Data (tables, folds, image caches) is loaded once per process in ``StudyData``. Folds and the
  eval set reach the engine as ``RowView``s on the cache's memmap, never as copies: a copy per
  fold (and of the eval set per trial) costs ~10 GB of RAM per worker on the real set.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState
from sklearn.metrics import confusion_matrix, f1_score

from core.atomic import atomic_write
from core.cache import ImageCache, build_cache
from core.config import MACHINE_FIELDS, ConfigError, TrainConfig
from core.dataset import data_fingerprint, load_eval_table, load_train_table, training_targets
from core.engine import FoldResult, RowView, fit_fold, predict
from core.errors import DataError
from core.labels import CLASS_NAMES, NUM_CLASSES
from core.metrics import macro_f1
from core.splits import folds_fingerprint, person_folds
from core.weights import weights_file
from search import artifacts
from search.budget import Budget
from search.claims import retried_from
from search.space import check_fixed

#: Artifact names (user attr ``artifact_<name>`` holds the id; see ``search.artifacts``).
OOF, EVAL, CONFUSION, CLASS_F1 = "oof", "eval", "confusion", "class_f1"
DEFAULT_KEEP_CHECKPOINTS = 10


def checkpoint_name(fold: int) -> str:
    """Artifact name of fold ``fold``'s selected-epoch ``state_dict`` (``torch.save`` file)."""
    return f"checkpoint_fold{fold}"


def checkpoint_names(trial: FrozenTrial | optuna.Trial) -> list[str]:
    """Names of the fold checkpoints ``trial`` has an artifact attr for (removed ones included).

    An attr counts when its name is exactly ``checkpoint_name(k)`` for its trailing number k.
    """
    out = []
    for key in trial.user_attrs:
        m = re.fullmatch(rf"{re.escape(artifacts.ATTR_PREFIX)}(.*?)(\d+)", key)
        if m and artifacts.attr_name(checkpoint_name(int(m[2]))) == key:
            out.append(checkpoint_name(int(m[2])))
    return out


def oof_fold_name(fold: int) -> str:
    """Artifact name of fold ``fold``'s validation probabilities (rows of that fold, in order)."""
    return f"oof_fold{fold}"


def eval_fold_name(fold: int) -> str:
    """Artifact name of fold ``fold``'s model's eval probabilities."""
    return f"eval_fold{fold}"


def fold_done_attr(fold: int) -> str:
    """User attr set (to a small summary dict) once fold ``fold`` is saved."""
    return f"fold_done_{fold}"


def eval_fingerprint(eval_table: pd.DataFrame) -> str:
    """Short hash of the eval table's files in order (``eval/info.csv``).

    A trial's eval probabilities are rows in this order; the ensemble checks it so that an
    edited or reordered info.csv (same row count) cannot put them on the wrong ImageIDs.
    """
    h = hashlib.sha256()
    for f in eval_table["file"]:
        h.update(f"{f}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class StudyData:
    """Everything a trial reads from disk, loaded once per process and shared by all trials."""

    data_dir: Path
    table: pd.DataFrame
    eval_table: pd.DataFrame
    folds: np.ndarray
    faces: Any = None  # core.faces.FaceSettings, or None for the cache's default
    progress: bool = False
    _caches: dict[tuple[int, int], ImageCache] = field(default_factory=dict, repr=False)

    @property
    def n_folds(self) -> int:
        return int(self.folds.max()) + 1

    @property
    def labels(self) -> np.ndarray:
        """The TRUE classes (threshold 60): what validation and the objective score against."""
        return self.table["label"].to_numpy(np.int64)

    def cache(self, image_size: tuple[int, int]) -> ImageCache:
        """The image cache at ``image_size`` (built on first use, then kept open)."""
        key = (int(image_size[0]), int(image_size[1]))
        if key not in self._caches:
            kwargs = {} if self.faces is None else {"faces": self.faces}
            self._caches[key] = build_cache(self.data_dir, key, progress=self.progress, **kwargs)
        return self._caches[key]

    def train_rows(self, image_size: tuple[int, int]) -> np.ndarray:
        return self.cache(image_size).rows(self.table["file"].tolist())

    def eval_images(self, image_size: tuple[int, int]) -> RowView:
        """The eval images in info.csv order, as a view on the cache (nothing copied to RAM)."""
        cache = self.cache(image_size)
        return RowView(cache.images, cache.rows(self.eval_table["file"].tolist()))


def load_study_data(data_dir: str | Path, corrections: str | Path | None, n_folds: int,
                    fold_seed: int, faces: Any = None, progress: bool = False) -> StudyData:
    """Read the tables and make the study's fixed folds (caches come lazily per image size)."""
    data_dir = Path(data_dir)
    table = load_train_table(data_dir, corrections)
    return StudyData(data_dir=data_dir, table=table, eval_table=load_eval_table(data_dir),
                     folds=person_folds(table, n_folds=n_folds, seed=fold_seed), faces=faces,
                     progress=progress)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def confusion_png(labels: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    """Row-normalized 18x18 confusion matrix (true rows, predicted columns) as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any thread

    cm = confusion_matrix(labels, pred, labels=list(range(NUM_CLASSES)))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(9, 8), dpi=80)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=90, fontsize=7)
    ax.set_yticks(range(NUM_CLASSES), CLASS_NAMES, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i, j in zip(*np.nonzero(cm), strict=True):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def class_f1(labels: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    """F1 per class name; None for a class absent from both truth and predictions."""
    present = set(np.unique(labels)) | set(np.unique(pred))
    scores = f1_score(labels, pred, labels=list(range(NUM_CLASSES)), average=None,
                      zero_division=0)
    return {name: (float(scores[c]) if c in present else None)
            for c, name in enumerate(CLASS_NAMES)}


class Objective:
    """Callable for ``study.optimize``. ``fit``/``predict_fn`` are injectable for tests."""

    def __init__(self, study_module: ModuleType, data: StudyData, store: Any, *,
                 epochs: int | None = None, device: str | None = None, per_fold: bool = False,
                 progress: bool = False, fit: Callable[..., FoldResult] = fit_fold,
                 predict_fn: Callable[..., np.ndarray] = predict, weights: Path | None = None,
                 loader_workers: int | None = None, fixed: dict[str, Any] | None = None,
                 budget: Budget | None = None) -> None:
        self.study_module, self.data, self.store = study_module, data, store
        self.epochs, self.device, self.per_fold, self.progress = epochs, device, per_fold, progress
        self.fit, self.predict = fit, predict_fn
        self.weights, self.loader_workers, self.fixed = weights, loader_workers, fixed or {}
        self.budget = budget

    def config(self, trial: optuna.Trial) -> TrainConfig:
        """The study's space with the run's fixed epochs, device, loader workers and local
        weights file; validated. A sampled value the run's epochs cannot honour (a warmup
        longer than the run) is clamped and recorded as used (user attr ``clamped``)."""
        cfg = self.study_module.space(trial)
        check_fixed(trial, self.fixed)
        if self.epochs is not None:
            cfg.epochs = int(self.epochs)
        used_warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0) * 0.5)
        if used_warmup != cfg.warmup_epochs:
            trial.set_user_attr("clamped", {"warmup_epochs": {"sampled": cfg.warmup_epochs,
                                                              "used": used_warmup}})
            cfg.warmup_epochs = used_warmup
        if self.device is not None:
            cfg.device = self.device
        if self.loader_workers is not None:
            cfg.num_workers = int(self.loader_workers)
        if cfg.pretrained and self.weights is not None:
            path = weights_file(self.weights, cfg.backbone)
            if path is None:
                raise ConfigError(f"no weights for backbone {cfg.backbone!r} in {self.weights} "
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
                and attrs.get("data_fingerprint") == data_fingerprint(self.data.table)
                and attrs.get("folds_fingerprint") == folds_fingerprint(self.data.folds)
                and attrs.get("eval_fingerprint") == eval_fingerprint(self.data.eval_table)):
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
        cfg = self.config(trial)
        data = self.data
        labels = data.labels
        done = self.resumable(trial, cfg)
        trial.set_user_attr("config", cfg.to_dict())
        trial.set_user_attr("data_fingerprint", data_fingerprint(data.table))
        trial.set_user_attr("folds_fingerprint", folds_fingerprint(data.folds))
        trial.set_user_attr("eval_fingerprint", eval_fingerprint(data.eval_table))
        rows = data.train_rows(cfg.image_size)
        images = data.cache(cfg.image_size).images
        eval_images = data.eval_images(cfg.image_size)
        targets = training_targets(data.table, cfg.age_threshold)

        oof = np.zeros((len(labels), NUM_CLASSES), np.float32)
        eval_sum = np.zeros((len(eval_images), NUM_CLASSES), np.float64)
        fold_f1: list[float] = []
        speeds: list[float] = []
        reported: set[int] = set()
        epochs_trained = 0
        resumed: list[int] = []
        trial.set_user_attr("epochs_trained", 0)  # a retry inherits the dead trial's count

        def report(value: float, step: int) -> bool:
            if step in reported:
                raise RuntimeError(f"trial {trial.number}: step {step} reported twice")
            reported.add(step)
            trial.report(value, step)
            return trial.should_prune()

        for k in range(data.n_folds):
            val = data.folds == k
            tr_idx, val_idx = rows[~val], rows[val]
            saved = (self._load_fold(trial, k, int(val.sum()), len(eval_images))
                     if k in done else None)
            if saved is not None:  # a retry: this fold finished before its worker died
                oof[val] = saved[0]
                eval_sum += saved[1]
                fold_f1.append(float(done[k]["f1"]))
                # Re-report what the pruner saw then (it already let these steps pass).
                values = [done[k]["f1"]] if self.per_fold else done[k].get("curve", [])
                for e, v in enumerate(values):
                    if math.isfinite(v):
                        report(float(v), k if self.per_fold else k * cfg.epochs + e)
                resumed.append(k)
                trial.set_user_attr("resumed_folds", resumed)
                continue

            def on_epoch(epoch: int, val_f1: float, k: int = k) -> bool:
                if self.budget is not None:  # the deadline stops a trial between epochs
                    self.budget.check()
                if self.per_fold or not math.isfinite(val_f1):
                    return False
                return report(val_f1, k * cfg.epochs + epoch)

            # Views on the memmap: fancy-indexing it would copy the fold's images into RAM.
            result = self.fit(cfg, RowView(images, tr_idx), targets[~val],
                              RowView(images, val_idx), labels[val],
                              on_epoch=on_epoch, progress=self.progress)
            epochs_trained += len(result.history)
            speeds += [h["images_per_s"] for h in result.history if "images_per_s" in h]
            trial.set_user_attr("epochs_trained", epochs_trained)
            if result.diverged:
                self._drop_checkpoints(trial)
                trial.set_user_attr("pruned_because", f"diverged in fold {k} "
                                    f"(non-finite loss or predictions, lr={cfg.lr:g})")
                raise optuna.TrialPruned(f"diverged in fold {k}")
            if result.stopped_early:
                self._drop_checkpoints(trial)
                trial.set_user_attr("pruned_because", f"pruner at fold {k}, epoch "
                                    f"{len(result.history) - 1}")
                raise optuna.TrialPruned(f"pruned in fold {k}")

            eval_probs = self.predict(result.state_dict, cfg, eval_images).astype(np.float32)
            self._save_fold(trial, k, result, eval_probs)
            oof[val] = result.val_probs
            eval_sum += eval_probs
            fold_f1.append(float(result.selected_f1))
            trial.set_user_attr("fold_f1", fold_f1)
            if self.per_fold and report(float(result.selected_f1), k):
                self._drop_checkpoints(trial)
                trial.set_user_attr("pruned_because", f"pruner after fold {k}")
                raise optuna.TrialPruned(f"pruned after fold {k}")

        value = macro_f1(labels, oof)
        trial.set_user_attr("images_per_s", float(np.mean(speeds)) if speeds else 0.0)
        self._save_trial(trial, labels, oof, (eval_sum / data.n_folds).astype(np.float32), value)
        return value

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

    def _drop_checkpoints(self, trial: optuna.Trial) -> None:
        """A pruned trial is never ensembled: every checkpoint it holds goes now (also folds a
        retry inherited, and any fold numbered above the one that was pruned)."""
        for name in checkpoint_names(trial):
            artifacts.remove_artifact(trial, self.store, name)


class CheckpointRetention:
    """Study callback: keep fold checkpoints only for the best ``keep`` COMPLETE trials.

    Probabilities stay for every complete trial (they are small and the ensemble ranks on them);
    checkpoints are what fills a disk. Checkpoints of complete trials beyond the best ``keep``
    and of FAIL/PRUNED trials go, except while a WAITING/RUNNING trial still refers to them: a
    retry inherits its dead origin's attrs (same artifact ids) and resumes from those folds, so
    an origin with a live retry is left alone, and no id a live or kept trial holds is removed.
    Removing an already-removed checkpoint is a no-op, so every worker may run this after each
    of its trials.
    """

    def __init__(self, store: Any, keep: int = DEFAULT_KEEP_CHECKPOINTS) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.store, self.keep = store, keep

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        ranked = sorted(done, key=lambda t: (-t.value, t.number))
        live = [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
        origins = {retried_from(t) for t in live} - {None}

        def ids(t: FrozenTrial) -> set[str]:
            return {str(t.user_attrs[artifacts.attr_name(n)]) for n in checkpoint_names(t)
                    if t.user_attrs[artifacts.attr_name(n)]}

        protected = set().union(*(ids(t) for t in live + ranked[:self.keep]))
        spent = [t for t in trials if t.state in (TrialState.FAIL, TrialState.PRUNED)
                 and t.number not in origins]
        for t in ranked[self.keep:] + spent:
            for name in checkpoint_names(t):
                if str(t.user_attrs[artifacts.attr_name(name)]) not in protected:
                    artifacts.remove_artifact(t, self.store, name)
