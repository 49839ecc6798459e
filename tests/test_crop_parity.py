"""Crop parity (DESIGN rule 6): a training image, which is also a validation image, is cropped
by the rule an eval image gets; its person's other photos never shape its crop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

import core.face_pass as FP
from core.cache import build_cache
from core.faces import FaceSettings
from tests.conftest import TINY_PEOPLE

H, W = 8, 6  # the tiny layout's photos
OWN = (0.0, 0.0, 3.0, 4.0)  # where the first person's faces are: the top-left corner
OTHERS = (2.0, 3.0, 6.0, 8.0)  # everyone else's: the bottom-right


def fake_detect(missed: set[str]) -> Callable:
    """``detect_files`` that finds the first person's faces at ``OWN``, all others at
    ``OTHERS``, and nothing in the files whose path ends with one of ``missed``."""
    first = TINY_PEOPLE[0][4]

    def detect(paths, settings, runner, progress=False):
        det = np.full((len(paths), 6), np.nan)
        det[:, 5] = 0
        for i, p in enumerate(paths):
            if not any(p.endswith(m) for m in missed):
                det[i] = (*(OWN if f"/{first}/" in p else OTHERS), 0.99, 1)
        return det, np.tile([H, W], (len(paths), 1)), [None] * len(paths)

    return detect


def test_a_missed_training_face_is_cropped_like_a_missed_eval_face(
        tiny_layout, monkeypatch, tmp_path: Path) -> None:
    data = tiny_layout()
    first = TINY_PEOPLE[0][4]
    train_miss = next((data / "train" / "images" / first).glob("mask1.*")).relative_to(data)
    eval_miss = sorted((data / "eval" / "images").iterdir())[0].relative_to(data)
    monkeypatch.setattr(FP, "detect_files", fake_detect({train_miss.as_posix(),
                                                         eval_miss.as_posix()}))
    settings = FaceSettings(margin=0.0, yunet_margin=0.0, min_crop=0.0)
    cache = build_cache(data, (4, 3), settings, cache_root=tmp_path / "c", workers=1,
                        progress=False)
    idx = cache.index.set_index("file")
    cols = ["x1", "y1", "x2", "y2"]
    train_box = idx.loc[train_miss.as_posix(), cols].tolist()
    eval_box = idx.loc[eval_miss.as_posix(), cols].tolist()
    # the first person's six other photos all say "top-left"; an eval photo cannot know that
    assert train_box == eval_box, f"training crop {train_box} used information eval lacks"
    assert idx.loc[[train_miss.as_posix(), eval_miss.as_posix()], "box_source"].tolist() == \
        ["dataset", "dataset"]
    assert train_box != list(OWN)
    found = idx.loc[idx["box_source"] == settings.pass_sources()[0], cols]
    assert (found.to_numpy() == OWN).all(axis=1).sum() == 6  # the found ones keep their own
