"""Face crops of photos outside the data set, by the rule the data set's eval images get.

Why here and not in the cache: a user's own photos are not in the competition layout and need
no memmap, but a model must see them exactly as it saw its eval images - the same reduced
decode, the same detector passes, the same margins, and the data set's own median crop
(``core.faces.fallback_box``), not one of their own, for a photo with no face found and as the
size ``min_crop`` compares a found face's crop with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core import faces as face_rules
from core import images as img_io
from core.cache import DEFAULT_FACES, crop_resize, default_cache_root, source_listing
from core.errors import DataError
from core.face_pass import detect_files, detections
from core.faces import FaceSettings
from core.pool import Runner

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_photos(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given (whatever their name) and the photos under each folder (``.jpg``,
    ``.jpeg``, ``.png`` in any case; macOS ``._`` files and hidden folders skipped), sorted per
    folder. A path that does not exist stays in the list: its row will say so."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(p)
            continue
        found = [f for f in p.rglob("*") if f.suffix.lower() in PHOTO_SUFFIXES and f.is_file()
                 and not f.name.startswith("._")
                 and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        out.extend(sorted(found))
    return out


def data_fallback(data_dir: Path, faces: FaceSettings = DEFAULT_FACES) -> np.ndarray | None:
    """The fallback box of the data set at ``data_dir`` (train and eval images, as its cache
    resolves them), from the saved face-box table: no image is decoded when its cache is
    built. None when no face was found in the whole set."""
    table = default_cache_root(data_dir) / f"boxes-{faces.detection_key()}.csv"
    with Runner(1) as runner:
        det = detections(source_listing(data_dir), data_dir, faces, table, runner,
                         progress=False)
    return face_rules.fallback_box(det, faces)


@dataclass
class PhotoCrops:
    """Per photo: its crop at each size (``None`` when unreadable), box source and reason."""

    files: list[Path]
    crops: dict[tuple[int, int], list[np.ndarray | None]] = field(repr=False)
    box_source: list[str]
    reasons: list[str]

    def stack(self, size: tuple[int, int]) -> np.ndarray:
        """The readable photos' crops at ``size`` as one uint8 (N, h, w, 3) array."""
        rows = [c for c in self.crops[size] if c is not None]
        return np.stack(rows) if rows else np.zeros((0, *size, 3), np.uint8)

    @property
    def readable(self) -> np.ndarray:
        return np.array([not r for r in self.reasons], dtype=bool)


def crop_photos(files: Sequence[Path], sizes: Sequence[tuple[int, int]],
                fallback: np.ndarray | None, faces: FaceSettings = DEFAULT_FACES,
                progress: bool = False) -> PhotoCrops:
    """Detect, resolve (eval rule, ``fallback`` for misses) and crop every photo at every size.

    An unreadable or missing file never stops the others: its crops are None and its reason
    says why (the decoder's words, or "no such file").
    """
    files = list(files)
    reasons = ["" if f.is_file() else "no such file" for f in files]
    todo = [i for i, r in enumerate(reasons) if not r]
    with Runner(1) as runner:
        found, hw, why = detect_files([str(files[i]) for i in todo], faces, runner, progress)
    for i, r in zip(todo, why, strict=True):
        reasons[i] = r or ""
    ok = [k for k, i in enumerate(todo) if not reasons[i]]
    det = pd.DataFrame({"width": hw[ok, 1], "height": hw[ok, 0]})
    det[[*face_rules.BOX_COLUMNS, "prob"]] = found[ok, :5]
    det["pass"] = found[ok, 5].astype(np.int64)
    boxes = face_rules.resolve_boxes(det, faces, person=None, fallback=fallback)
    crops: dict[tuple[int, int], list[np.ndarray | None]] = {
        tuple(s): [None] * len(files) for s in sizes}
    source = [""] * len(files)
    for row, k in enumerate(ok):
        i = todo[k]
        try:
            img = img_io.read_rgb(files[i])
        except img_io.BadImageError as e:  # changed since it was detected
            reasons[i] = e.reason
            continue
        box = boxes[list(face_rules.BOX_COLUMNS)].iloc[row].to_numpy()
        for size in crops:
            crops[size][i] = crop_resize(img, box, size)
        source[i] = str(boxes["box_source"].iat[row])
    return PhotoCrops(files, crops, source, reasons)


def check_any(files: Sequence[Path], given: Sequence[str | Path]) -> None:
    """One clear line when the paths given hold no photo at all."""
    if not files:
        raise DataError(f"no photos (.jpg, .jpeg, .png) in {', '.join(map(str, given))}")
