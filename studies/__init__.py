"""Studies: one module per study (its data, fixed settings and search space), by name.

A study module provides (see ``studies.demo`` for the smallest one):

- ``FOLDS``, ``FOLD_SEED``, ``EPOCHS``: fixed per study, so every trial's out-of-fold
  predictions line up and a pruning step means the same thing in every trial;
- ``default_data(runs: Path) -> Path``: where the data lives when ``--data`` is not given;
- ``corrections(data_dir: Path) -> Path | None``: the label-corrections CSV to apply;
- ``space(trial) -> TrainConfig``: the define-by-run search space. ``search.space`` samples
  it to learn its parameter names (for ``--fix``) and the pretrained backbones it can pick
  (their weights are checked before any data is read);
- optionally ``FACES``: ``core.faces.FaceSettings`` for its photos (default: the competition's
  384x512 photos). Every tool that crops a study's images (the search, predict, explain,
  report, benches) takes them from ``face_settings``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from core.config import ConfigError
from core.faces import FaceSettings

#: Study name -> module. Add a study by writing a module and one line here.
STUDIES: dict[str, str] = {
    "demo": "studies.demo",
    "mask": "studies.mask",
    "quality": "studies.quality",
}


def get_study(name: str) -> ModuleType:
    """The module of study ``name``; an unknown name is one line listing the known ones."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; known studies: {', '.join(sorted(STUDIES))}")
    return importlib.import_module(STUDIES[name])


def face_settings(study: str | ModuleType) -> FaceSettings:
    """How the study's photos are searched for faces and cropped (its ``FACES``, else the
    defaults made for the competition's photos)."""
    module = get_study(study) if isinstance(study, str) else study
    return getattr(module, "FACES", None) or FaceSettings()
