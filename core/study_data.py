"""A study's data as its trials read it: tables, fixed person folds, face-cropped caches.

Why in ``core``: the search's objective, the tools that read a finished study and
``core.train_fold`` (one fold from the shell) must assemble the same rows, folds and crops, so
there is one way to do it, and it needs nothing from Optuna. The face settings are the study's
(``studies.face_settings``): a cache built with other settings holds other crops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.cache import DEFAULT_FACES, ImageCache, build_cache
from core.dataset import load_eval_table, load_train_table
from core.faces import FaceSettings
from core.fingerprints import fingerprints
from core.loader import RowView
from core.splits import person_folds


@dataclass
class StudyData:
    """Everything a trial reads from disk, loaded once per process and shared by all trials."""

    data_dir: Path
    table: pd.DataFrame
    eval_table: pd.DataFrame
    folds: np.ndarray
    faces: FaceSettings = DEFAULT_FACES  # the study's (studies.face_settings)
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
            self._caches[key] = build_cache(self.data_dir, key, self.faces,
                                            progress=self.progress)
        return self._caches[key]

    def train_images(self, image_size: tuple[int, int]) -> RowView:
        """The training images in table order, as a view on the cache (nothing copied to RAM)."""
        return self.cache(image_size).view(self.table["file"].tolist())

    def eval_images(self, image_size: tuple[int, int]) -> RowView:
        """The eval images in info.csv order, as a view on the cache (nothing copied to RAM)."""
        return self.cache(image_size).view(self.eval_table["file"].tolist())

    def fingerprints(self) -> dict[str, str]:
        return fingerprints(self.table, self.folds, self.eval_table)


def load_study_data(data_dir: str | Path, corrections: str | Path | None, n_folds: int,
                    fold_seed: int, faces: FaceSettings = DEFAULT_FACES,
                    progress: bool = False) -> StudyData:
    """Read the tables and make the study's fixed folds (caches come lazily per image size)."""
    data_dir = Path(data_dir)
    table = load_train_table(data_dir, corrections)
    return StudyData(data_dir=data_dir, table=table, eval_table=load_eval_table(data_dir),
                     folds=person_folds(table, n_folds=n_folds, seed=fold_seed), faces=faces,
                     progress=progress)
