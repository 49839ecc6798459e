"""Face boxes: MTCNN on small decodes, a second pass for missed faces, a margin, a fallback.

Models in this task only look at the face, so every image is cropped to its face once, before
any training. Detection runs on a 1/``reduce`` decode (``core.images.read_small``) of many images
at once, with ``min_face_size`` given in full-image pixels, so it searches for the same faces as
full-resolution MTCNN at a fraction of the cost (``bench/faces.py`` races the two). MTCNN misses
masked faces at its default thresholds, so ours are looser, and an image with no face gets a
second pass whose image pyramid is shifted by about half a step (``retry_scale``): on the
real-face set such faces are often found at the other pyramid scales. What is still missed falls
back to the data set's median box, then to a center crop; each image records where its box came
from (``box_source``: mtcnn, retry, dataset, center).

Crop parity (DESIGN rule 6): every image, training ones included, is cropped by the rule an eval
image gets. ``resolve_boxes`` can also fall back to the person's other boxes (``person=``), which
an eval photo cannot have; the cache does not use it (``bench.faces`` measures what it would
change), so validation and out-of-fold scores are computed on crops made like the submission's.

Raw detections (no margin, best probability whatever its value) are kept in a CSV keyed by image
path with the file's size and mtime, so no image is ever detected twice with the same detection
settings; margin, probability threshold and fallbacks are applied afterwards by
``resolve_boxes`` (cheap, no image read).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.atomic import atomic_write
from core.errors import DataError
from core.images import REDUCED_FLAGS

BOX_SOURCES = ("mtcnn", "retry", "dataset", "center", "person")
#: Normalized (x1, y1, x2, y2) used when no face was found anywhere in the data set.
CENTER_BOX = (0.15, 0.1, 0.85, 0.8)
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
#: ``pass``: 0 no face, 1 found by the first pass, 2 by the second (``retry_scale``).
DETECTION_COLUMNS = ("file", "size", "mtime_ns", "width", "height", *BOX_COLUMNS, "prob",
                     "pass")
DETECTION_VERSION = 2  # 2: reduced decode, per-stage thresholds, second pass
MTCNN_MIN_FACE = 12  # P-Net's window: MTCNN cannot look for smaller faces


@dataclass(frozen=True)
class FaceSettings:
    """How faces are found and cropped; part of the image cache key.

    ``min_face_size`` is the smallest face searched for, in full-image pixels (the competition's
    faces are 130 px and up in 384x512 photos); MTCNN gets ``min_face_size / reduce`` on the
    1/``reduce`` decode. ``thresholds`` are MTCNN's per-stage (P-, R-, O-Net) thresholds, looser
    than its (0.6, 0.7, 0.7) because masked faces score low; ``min_prob`` is applied to the best
    box's O-Net probability afterwards. ``retry_scale`` (0: off) reruns images with no face with
    the pyramid started at ``min_face_size * retry_scale``. ``margin`` is the fraction of the box
    width/height added on each side. ``batch_size`` and ``device`` change speed only, not
    results, so they are not in the key. The defaults were chosen on the real-face set
    (``bench.faces``; README's benchmark table): 1/2 rather than 1/4 because with the same
    smallest face MTCNN's pyramid levels are the same size either way, so it costs about the
    same, while its boxes match full resolution better (mean IoU 0.90 against 0.84).
    """

    reduce: int = 2
    min_face_size: int = 80
    thresholds: tuple[float, float, float] = (0.3, 0.4, 0.4)
    factor: float = 0.709
    retry_scale: float = 1.19
    margin: float = 0.2
    min_prob: float = 0.5
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.reduce not in REDUCED_FLAGS:
            raise DataError(f"FaceSettings.reduce must be one of {sorted(REDUCED_FLAGS)}, "
                            f"got {self.reduce}")
        if self.min_face_size < MTCNN_MIN_FACE * self.reduce:
            raise DataError(f"FaceSettings.min_face_size must be >= {MTCNN_MIN_FACE} x reduce "
                            f"= {MTCNN_MIN_FACE * self.reduce} px (MTCNN's smallest face on "
                            f"the 1/{self.reduce} decode), got {self.min_face_size}")
        if len(self.thresholds) != 3 or not all(0 < t <= 1 for t in self.thresholds):
            raise DataError(f"FaceSettings.thresholds must be three values in (0, 1], "
                            f"got {self.thresholds}")
        if not 0 < self.factor < 1:
            raise DataError(f"FaceSettings.factor must be in (0, 1), got {self.factor}")
        if self.retry_scale != 0 and self.retry_scale <= 1:
            raise DataError(f"FaceSettings.retry_scale must be 0 (off) or > 1, "
                            f"got {self.retry_scale}")
        if not 0 <= self.margin <= 2:
            raise DataError(f"FaceSettings.margin must be in [0, 2], got {self.margin}")
        if not 0 <= self.min_prob <= 1:
            raise DataError(f"FaceSettings.min_prob must be in [0, 1], got {self.min_prob}")

    def key(self) -> dict:
        """The fields that change boxes (what a cache is keyed on), as JSON would read them
        back (tuples become lists), so a stored key compares equal."""
        d = asdict(self)
        del d["batch_size"], d["device"]
        return json.loads(json.dumps(d))

    def detection_key(self) -> str:
        """Short hash of the fields that change raw detections (margin/min_prob do not)."""
        raw = json.dumps({"version": DETECTION_VERSION, "reduce": self.reduce,
                          "min_face_size": self.min_face_size,
                          "thresholds": list(self.thresholds), "factor": self.factor,
                          "retry_scale": self.retry_scale})
        return hashlib.sha1(raw.encode()).hexdigest()[:12]

    def pass_min_faces(self) -> list[float]:
        """MTCNN's ``min_face_size`` on the small decode, per pass."""
        first = self.min_face_size / self.reduce
        return [first, first * self.retry_scale] if self.retry_scale else [first]


def shrink(img: np.ndarray, reduce: int) -> tuple[np.ndarray, tuple[float, float]]:
    """An in-memory image at 1/``reduce`` size (area interpolation, as the reduced decode of a
    non-JPEG) and its (sy, sx) factors back to full size; for images not read from a file."""
    if reduce == 1:
        return np.ascontiguousarray(img), (1.0, 1.0)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // reduce), max(1, h // reduce)),
                       interpolation=cv2.INTER_AREA)
    return small, (h / small.shape[0], w / small.shape[1])


class FaceDetector:
    """Batched MTCNN on small copies, with a second pass for misses; boxes in full pixels."""

    def __init__(self, settings: FaceSettings = FaceSettings()):
        from facenet_pytorch import MTCNN  # deferred: torch import is slow, reuse needs none

        self.settings = settings
        self.passes = [MTCNN(keep_all=True, post_process=False, select_largest=False,
                             min_face_size=m, thresholds=list(settings.thresholds),
                             factor=settings.factor, device=settings.device)
                       for m in settings.pass_min_faces()]

    def detect_small(self, smalls: Sequence[np.ndarray], scales: Sequence[tuple[float, float]]
                     ) -> np.ndarray:
        """Most probable face per image: (N, 6) x1, y1, x2, y2, prob, pass in full-image pixels
        (NaN box and prob, pass 0, where no pass found one). ``smalls`` are small copies,
        ``scales`` their (sy, sx) factors back to full size."""
        out = np.full((len(smalls), 6), np.nan)
        out[:, 5] = 0
        todo = list(range(len(smalls)))
        for k, (mtcnn, min_face) in enumerate(zip(self.passes, self.settings.pass_min_faces(),
                                                  strict=True), start=1):
            self._run(mtcnn, min_face, smalls, scales, todo, out, k)
            todo = [i for i in todo if out[i, 5] == 0]
        return out

    def _run(self, mtcnn, min_face: float, smalls: Sequence[np.ndarray],
             scales: Sequence[tuple[float, float]], todo: list[int], out: np.ndarray,
             k: int) -> None:
        """One pass over the images ``todo``, batched by size (MTCNN batches need equal sizes);
        fills ``out`` rows where a face is found."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in todo:
            groups.setdefault(smalls[i].shape, []).append(i)
        bs = self.settings.batch_size
        for shape, idx in groups.items():
            if min(shape[:2]) < min_face:
                continue  # smaller than the smallest face: MTCNN's pyramid would be empty
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                boxes, probs = mtcnn.detect(np.stack([smalls[i] for i in chunk]))
                for i, b, p in zip(chunk, boxes, probs, strict=True):
                    if b is None:
                        continue
                    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
                    p = np.asarray(p, dtype=np.float64).reshape(-1)
                    j = int(np.argmax(p))
                    sy, sx = scales[i]
                    out[i, :4] = b[j] * (sx, sy, sx, sy)
                    out[i, 4:] = p[j], k

    def detect(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Full-resolution RGB images -> (N, 6) boxes as in ``detect_small``."""
        small = [shrink(im, self.settings.reduce) for im in images]
        return self.detect_small([s for s, _ in small], [f for _, f in small])


@functools.lru_cache(maxsize=4)
def get_detector(settings: FaceSettings) -> FaceDetector:
    """One detector per settings per process: loading MTCNN costs seconds, detecting does not."""
    return FaceDetector(settings)


def add_margin(boxes: np.ndarray, sizes: np.ndarray, margin: float) -> np.ndarray:
    """Grow (N, 4) boxes by ``margin`` of their width/height on each side, clip to (h, w) sizes,
    round to whole pixels, and keep at least one pixel."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[:, 0]
    w = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[:, 1]
    dx = (b[:, 2] - b[:, 0]) * margin
    dy = (b[:, 3] - b[:, 1]) * margin
    eps = 1e-6  # normalized medians scaled back land a hair off whole pixels
    x1 = np.clip(np.floor(b[:, 0] - dx + eps), 0, w - 1)
    y1 = np.clip(np.floor(b[:, 1] - dy + eps), 0, h - 1)
    x2 = np.clip(np.ceil(b[:, 2] + dx - eps), x1 + 1, w)
    y2 = np.clip(np.ceil(b[:, 3] + dy - eps), y1 + 1, h)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)


def found_faces(det: pd.DataFrame, settings: FaceSettings) -> np.ndarray:
    """Per row: a face counts as found (``prob >= min_prob``; NaN, no face, is False)."""
    return det["prob"].to_numpy(dtype=np.float64) >= settings.min_prob


def fallback_box(det: pd.DataFrame, settings: FaceSettings) -> np.ndarray | None:
    """The data set's median found box, normalized by image size (x1, y1, x2, y2 in [0, 1]):
    what an image with no face found gets. None when no face was found at all."""
    wh = det[["width", "height"]].to_numpy(dtype=np.float64)
    norm = det[list(BOX_COLUMNS)].to_numpy(dtype=np.float64) / np.concatenate([wh, wh], axis=1)
    found = found_faces(det, settings)
    return np.median(norm[found], axis=0) if found.any() else None


def say_if_no_face(data_dir: Path, det: pd.DataFrame, faces: FaceSettings) -> None:
    """One line on stderr when no image of the set has a face found: then every crop is the
    centre box, which trains and scores far worse, and the usual cause is photos smaller than
    the faces searched for (the defaults are made for the competition's 384x512 photos)."""
    if len(det) == 0 or found_faces(det, faces).any():
        return
    w, h = int(det["width"].median()), int(det["height"].median())
    print(f"note: {data_dir}: no face found in any of its {len(det)} images (photos about "
          f"{w}x{h}, faces searched from {faces.min_face_size} px on a 1/{faces.reduce} "
          f"decode); every crop is the centre box. For small photos give the study "
          f"FACES = FaceSettings(reduce=1, min_face_size=...)", file=sys.stderr)


def resolve_boxes(det: pd.DataFrame, settings: FaceSettings,
                  person: Sequence[str | None] | None = None,
                  fallback: np.ndarray | None = None) -> pd.DataFrame:
    """Final crop box per image from raw detections, with the fallback order.

    ``det`` has ``width``, ``height``, ``x1..y2`` and ``prob`` (NaN = no face); ``person`` names
    each row's person (None for eval images; the cache passes None for every image, see the
    module's crop parity). A detection counts when ``prob >= min_prob``; ``pass`` 2 (when
    present) marks it ``retry``. Misses take the median of the same person's found boxes (only
    with ``person``), else the data set's median box,
    else ``CENTER_BOX``; medians are taken on boxes normalized by image size, so images of
    different sizes mix. ``fallback`` (normalized, from ``fallback_box``) replaces the median of
    ``det`` itself: photos outside a data set are cropped as that data set's eval images are.
    Returns ``x1..y2`` (ints, margin added, clipped) and ``box_source``.
    """
    n = len(det)
    wh = det[["width", "height"]].to_numpy(dtype=np.float64)
    scale = np.concatenate([wh, wh], axis=1)
    norm = det[list(BOX_COLUMNS)].to_numpy(dtype=np.float64) / scale
    found = found_faces(det, settings)
    second = det["pass"].to_numpy() == 2 if "pass" in det else np.zeros(n, dtype=bool)
    source = np.where(found, np.where(second, "retry", "mtcnn"), "").astype(object)
    if person is not None:
        owners = pd.Series(list(person), dtype=object)
        known = found & owners.notna().to_numpy()
        if known.any():
            med = pd.DataFrame(norm[known]).groupby(owners[known].to_numpy()).median()
            take = ~found & owners.isin(med.index).to_numpy()
            if take.any():
                norm[take] = med.loc[owners[take].to_numpy()].to_numpy()
                source[take] = "person"
    rest = source == ""
    if rest.any():
        if fallback is None:
            fallback = fallback_box(det, settings)
        norm[rest] = CENTER_BOX if fallback is None else fallback
        source[rest] = "center" if fallback is None else "dataset"
    sizes = wh[:, ::-1]  # (h, w)
    boxes = add_margin(norm * scale, sizes, settings.margin)
    out = pd.DataFrame(boxes, columns=list(BOX_COLUMNS), index=det.index)
    out["box_source"] = pd.Series(source, index=det.index, dtype=str) if n else []
    return out


def load_detections(path: Path) -> pd.DataFrame:
    """The saved detection table, or an empty one when there is none yet."""
    if not path.exists():
        return pd.DataFrame(columns=list(DETECTION_COLUMNS))
    try:
        return pd.read_csv(path, dtype={"file": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"face box table {path} is unreadable ({e}); delete it to redetect") from e


def save_detections(table: pd.DataFrame, path: Path) -> None:
    """Write the detection table atomically (``core.atomic``): a crash or kill mid-write
    leaves the previous table intact, and its temp is removed by the next write."""
    atomic_write(path, lambda tmp: table[list(DETECTION_COLUMNS)].to_csv(tmp, index=False))
