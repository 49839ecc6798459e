"""A study as the tools after a search read it (predict, explain, report): its flags, storage,
artifact store, submission JSON, and the fold models of its trials.

Why one module: each of those CLIs must say the same thing, in one line, when the study is
missing, has no complete trial, or has no ensemble yet; and load a trial's models one way.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch

from core.config import TrainConfig
from core.errors import DataError
from core.study_data import load_study_data
from search import paths
from search.artifacts import checkpoint_name, load_file, open_store
from search.ensemble.submission import Submission
from search.ensemble.trials import open_study
from search.worker.stage import best_first
from studies import face_settings

#: Study user attr: the absolute path of the submission JSON ``search.ensemble`` last wrote.
SUBMISSION_ATTR = "submission_json"


def add_study_flags(p: argparse.ArgumentParser) -> None:
    """``--study``, ``--storage``, ``--artifacts``, ``--debug``: as ``search.ensemble`` has them."""
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="Optuna storage URL or journal file "
                                     "(default sqlite:///runs/<study>.db)")
    p.add_argument("--artifacts", help="artifact folder or s3:// URL (default runs/artifacts)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")


@dataclass
class FinishedStudy:
    name: str
    storage: str
    study: optuna.Study
    store: Any

    @functools.cached_property
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        """Every trial, read once: the tools after a search read, they do not wait for more."""
        return self.study.get_trials(deepcopy=False)

    @property
    def faces(self):
        """The study's face settings (``studies.face_settings``): crops as its cache has them."""
        return face_settings(self.name)

    @property
    def n_folds(self) -> int:
        return int(self.study.user_attrs.get("n_folds", 0))

    def complete(self) -> list[optuna.trial.FrozenTrial]:
        """Complete trials, best first (ties: lower number)."""
        return best_first(self.trials)

    def trial(self, number: int) -> optuna.trial.FrozenTrial:
        trials = self.trials
        if not 0 <= number < len(trials):
            raise DataError(f"study {self.name!r} has no trial {number} "
                            f"(trials 0..{len(trials) - 1})")
        return trials[number]

    @property
    def submission_path(self) -> Path:
        """Where ``search.ensemble`` last wrote the submission's JSON (recorded on the study:
        ``--out`` may put it anywhere), else where it writes it by default."""
        recorded = self.study.user_attrs.get(SUBMISSION_ATTR)
        return Path(recorded) if recorded else paths.study_dir(self.name) / "submission.json"

    def submission(self) -> Submission:
        """The ensemble's choice (members, weights, decision rule); one line when never
        written."""
        path = self.submission_path
        if not path.is_file():
            raise DataError(f"study {self.name!r} has no ensemble yet ({path} is missing): run "
                            f"python -m search.ensemble --study {self.name} first")
        try:
            return Submission.from_json(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({e}); run search.ensemble again") from None


def study_rows(study: optuna.Study, data_dir: str | Path | None = None
               ) -> tuple[Path, pd.DataFrame, np.ndarray]:
    """(data folder, train table, folds) exactly as the study's trials saw them, from the
    study's own attrs (``data_dir`` overrides where the data lives now), assembled as the
    trials assembled them (``core.study_data``)."""
    attrs = study.user_attrs
    data_dir = data_dir or attrs.get("data_dir")
    if not data_dir:
        raise DataError(f"study {study.study_name!r} has no user attr 'data_dir'; pass --data")
    for key in ("n_folds", "fold_seed"):
        if key not in attrs:
            raise DataError(f"study {study.study_name!r} has no user attr {key!r} (not made by "
                            "search.run?)")
    data = load_study_data(Path(data_dir), attrs.get("corrections"), int(attrs["n_folds"]),
                           int(attrs["fold_seed"]))
    return data.data_dir, data.table, data.folds


def open_finished(args: argparse.Namespace) -> FinishedStudy:
    """The study of ``--study``/``--storage``/``--artifacts``, with at least one complete trial."""
    paths.check_study_name(args.study)
    storage = args.storage or paths.default_storage_url(args.study)
    found = FinishedStudy(args.study, storage, open_study(args.study, storage),
                          open_store(args.artifacts or paths.default_artifacts_dir()))
    if not found.complete():
        raise DataError(f"study {args.study!r} has no complete trial yet: run python -m "
                        f"search.run --study {args.study} first")
    return found


def trial_config(trial: optuna.trial.FrozenTrial, device: str | None = None) -> TrainConfig:
    """The config the trial trained with, to run here (``device``: default the GPU if any)."""
    cfg = TrainConfig.from_dict(trial.user_attrs["config"])
    cfg.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.pretrained, cfg.pretrained_file = False, ""  # the checkpoints hold every weight
    cfg.num_workers = 0
    return cfg.validate()


def fold_states(trial: optuna.trial.FrozenTrial, store: Any, n_folds: int
                ) -> list[dict[str, torch.Tensor]]:
    """The trial's fold checkpoints (state dicts on the CPU), fold 0 first."""
    states = []
    with tempfile.TemporaryDirectory(prefix="mask_search_models_") as tmp:
        for k in range(n_folds):
            try:
                path = load_file(trial, store, checkpoint_name(k), Path(tmp) / f"fold{k}.pt")
            except DataError as e:
                raise DataError(f"trial {trial.number}: no checkpoint for fold {k} ({e}); "
                                f"retention keeps the best --keep-checkpoints trials'") from None
            states.append(torch.load(path, map_location="cpu", weights_only=True))
    return states
