"""Face boxes: which box each image is cropped to; margins, a fallback, the detection table.

Models in this task only look at the face, so every image is cropped to its face once, before
any training. Detection runs on a 1/``reduce`` decode (``core.images.read_small``) with
``min_face_size`` given in full-image pixels, so it searches for the same faces as
full-resolution MTCNN at a fraction of the cost (``bench/faces.py`` races the two).

The detectors (``core.detectors``) run in the order ``FaceSettings.detectors``, each on the
images the ones before found no face in: YuNet first, MTCNN on what it missed. Each detector's
box gets its own margin (their boxes cut the face differently), a crop far smaller than the
data set's typical one is grown (``min_crop``), and what is still missed falls back to the data
set's median crop, then to a centre crop; each image records where its box came from
(``box_source``: yunet, mtcnn, retry, dataset, center).

Crop parity (DESIGN rule 6): every image, training ones included, is cropped by the rule an eval
image gets. ``resolve_boxes`` can also fall back to the person's other boxes (``person=``), which
an eval photo cannot have; the cache does not use it (``bench.faces`` measures what it would
change), so validation and out-of-fold scores are computed on crops made like the submission's.
The data set's median crop (fallback and ``min_crop``) is taken over train and eval images alike.

Raw detections (no margin; MTCNN's best probability whatever its value) are kept in a CSV keyed
by image path with the file's size and mtime, so no image is ever detected twice with the same
detection settings; margins, ``min_crop``, MTCNN's probability threshold and fallbacks are
applied afterwards by ``resolve_boxes`` (cheap, no image read).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import atomic_write
from core.errors import DataError
from core.images import REDUCED_FLAGS

#: Every ``box_source``; the first three are faces a detector found (``FOUND_SOURCES``).
BOX_SOURCES = ("yunet", "mtcnn", "retry", "dataset", "center", "person")
FOUND_SOURCES = ("yunet", "mtcnn", "retry")
DETECTORS = ("yunet", "mtcnn")
#: Normalized (x1, y1, x2, y2) used when no face was found anywhere in the data set.
CENTER_BOX = (0.15, 0.1, 0.85, 0.8)
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
#: ``pass``: 0 no face, k > 0 found by pass k, named by ``FaceSettings.pass_sources()[k - 1]``.
DETECTION_COLUMNS = ("file", "size", "mtime_ns", "width", "height", *BOX_COLUMNS, "prob",
                     "pass")
DETECTION_VERSION = 3  # 2: reduced decode, per-stage thresholds, second pass; 3: detectors
MTCNN_MIN_FACE = 12  # P-Net's window: MTCNN cannot look for smaller faces


@dataclass(frozen=True)
class FaceSettings:
    """How faces are found and cropped; part of the image cache key.

    ``detectors`` run in this order, each on the images the ones before found no face in
    (names from ``DETECTORS``). ``min_face_size`` is the smallest face searched for, in
    full-image pixels (the competition's faces are 130 px and up in 384x512 photos): MTCNN gets
    ``min_face_size / reduce`` on the 1/``reduce`` decode, and YuNet boxes narrower than it are
    dropped, so both look for the same faces. ``yunet_score`` is YuNet's score threshold (a box
    below it is no face). ``yunet_retry`` (0: off) has YuNet look again at the images it found
    no face in, on the small decode enlarged that many times (masked faces it scores low at
    1/2 size often pass at full size), before the next detector. ``thresholds`` are MTCNN's
    per-stage (P-, R-, O-Net) thresholds, looser than its (0.6, 0.7, 0.7) because masked faces
    score low; ``min_prob`` is applied to MTCNN's best box afterwards. ``retry_scale`` (0: off)
    reruns the images MTCNN found no face in with its pyramid started at ``min_face_size *
    retry_scale``. ``margin`` (MTCNN's boxes, and the centre box) and ``yunet_margin`` are the
    fractions of the box width/height added on each side: each detector's own, because their
    boxes cut the face differently. ``min_crop`` (0: off) grows a crop smaller than that share
    of the data set's median crop, in width or height, about its centre until it is not: one
    data set's photos frame faces alike, and a much smaller box is mostly part of a face (on a
    masked face YuNet and MTCNN often box the eyes only). Margins and ``min_crop`` were chosen
    so crops hold the true face on three real-face sets, not so the boxes look alike; the YuNet
    margin then went from 0.25 to 0.18, which makes its crops as large around the face as
    MTCNN's (median 1.76x the face's area, MTCNN 1.74x, 0.25 gave 2.11x) while still holding
    the face, and lifted held-out macro F1 (``bench.options --arm faces``; docs/quality.md).
    ``batch_size`` and ``device`` change speed only, not results, so they are not in the key.
    The defaults were chosen on the real-face sets (``bench.faces``; README's benchmark table).
    """

    detectors: tuple[str, ...] = ("yunet", "mtcnn")
    reduce: int = 2
    min_face_size: int = 80
    yunet_score: float = 0.3
    yunet_retry: float = 2.0
    thresholds: tuple[float, float, float] = (0.3, 0.4, 0.4)
    factor: float = 0.709
    retry_scale: float = 1.19
    margin: float = 0.2
    yunet_margin: float = 0.18
    min_crop: float = 0.85
    min_prob: float = 0.5
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "detectors", tuple(self.detectors))  # a list would not hash
        if not self.detectors or len(set(self.detectors)) != len(self.detectors) or \
                not set(self.detectors) <= set(DETECTORS):
            raise DataError(f"FaceSettings.detectors must be some of {DETECTORS}, each once, in "
                            f"the order they run, got {self.detectors}")
        if self.reduce not in REDUCED_FLAGS:
            raise DataError(f"FaceSettings.reduce must be one of {sorted(REDUCED_FLAGS)}, "
                            f"got {self.reduce}")
        smallest = MTCNN_MIN_FACE * self.reduce if "mtcnn" in self.detectors else 1
        if self.min_face_size < smallest:
            raise DataError(f"FaceSettings.min_face_size must be >= {MTCNN_MIN_FACE} x reduce "
                            f"= {smallest} px (MTCNN's smallest face on the 1/{self.reduce} "
                            f"decode), got {self.min_face_size}" if smallest > 1 else
                            f"FaceSettings.min_face_size must be >= 1, got {self.min_face_size}")
        if not 0 < self.yunet_score <= 1:
            raise DataError(f"FaceSettings.yunet_score must be in (0, 1], got {self.yunet_score}")
        if self.yunet_retry != 0 and self.yunet_retry <= 1:
            raise DataError(f"FaceSettings.yunet_retry must be 0 (off) or > 1, "
                            f"got {self.yunet_retry}")
        if len(self.thresholds) != 3 or not all(0 < t <= 1 for t in self.thresholds):
            raise DataError(f"FaceSettings.thresholds must be three values in (0, 1], "
                            f"got {self.thresholds}")
        if not 0 < self.factor < 1:
            raise DataError(f"FaceSettings.factor must be in (0, 1), got {self.factor}")
        if self.retry_scale != 0 and self.retry_scale <= 1:
            raise DataError(f"FaceSettings.retry_scale must be 0 (off) or > 1, "
                            f"got {self.retry_scale}")
        if not 0 <= self.min_crop <= 1:
            raise DataError(f"FaceSettings.min_crop must be in [0, 1], got {self.min_crop}")
        for name in ("margin", "yunet_margin"):
            if not 0 <= getattr(self, name) <= 2:
                raise DataError(f"FaceSettings.{name} must be in [0, 2], "
                                f"got {getattr(self, name)}")
        if not 0 <= self.min_prob <= 1:
            raise DataError(f"FaceSettings.min_prob must be in [0, 1], got {self.min_prob}")

    def key(self) -> dict:
        """The fields that change boxes (what a cache is keyed on), as JSON would read them
        back (tuples become lists), so a stored key compares equal."""
        d = asdict(self)
        del d["batch_size"], d["device"]
        return json.loads(json.dumps(d))

    def detection_key(self) -> str:
        """Short hash of the fields that change raw detections (margins and min_prob do not)."""
        raw = json.dumps({"version": DETECTION_VERSION, "detectors": list(self.detectors),
                          "reduce": self.reduce, "min_face_size": self.min_face_size,
                          "yunet_score": self.yunet_score, "yunet_retry": self.yunet_retry,
                          "thresholds": list(self.thresholds), "factor": self.factor,
                          "retry_scale": self.retry_scale})
        return hashlib.sha1(raw.encode()).hexdigest()[:12]

    def pass_min_faces(self) -> list[float]:
        """MTCNN's ``min_face_size`` on the small decode, per MTCNN pass."""
        first = self.min_face_size / self.reduce
        return [first, first * self.retry_scale] if self.retry_scale else [first]

    def pass_sources(self) -> list[str]:
        """The ``box_source`` of each detection pass, in the order they run: the detection
        table's ``pass`` k was made by ``pass_sources()[k - 1]``."""
        out: list[str] = []
        for name in self.detectors:
            if name == "mtcnn":
                out += ["mtcnn", "retry"][:len(self.pass_min_faces())]
            else:  # both YuNet passes are YuNet's boxes (same margin)
                out += ["yunet"] * len(self.yunet_scales())
        return out

    def yunet_scales(self) -> list[float]:
        """How much YuNet enlarges the small decode, per YuNet pass."""
        return [1.0, self.yunet_retry] if self.yunet_retry else [1.0]

    def margin_of(self, source: str) -> float:
        """The margin a box from ``source`` gets (MTCNN's for its passes and the centre box)."""
        return self.yunet_margin if source == "yunet" else self.margin


def grow(boxes: np.ndarray, margin: float | np.ndarray) -> np.ndarray:
    """(N, 4) boxes grown by ``margin`` (one, or one per row) of their width/height on each
    side; any units (pixels or normalized), nothing clipped or rounded."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    m = np.broadcast_to(np.asarray(margin, dtype=np.float64), (len(b),))
    dx = (b[:, 2] - b[:, 0]) * m
    dy = (b[:, 3] - b[:, 1]) * m
    return np.stack([b[:, 0] - dx, b[:, 1] - dy, b[:, 2] + dx, b[:, 3] + dy], axis=1)


def to_pixels(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(N, 4) boxes in pixels clipped to (h, w) ``sizes``, rounded outwards to whole pixels,
    at least one pixel."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[:, 0]
    w = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)[:, 1]
    eps = 1e-6  # normalized medians scaled back land a hair off whole pixels
    x1 = np.clip(np.floor(b[:, 0] + eps), 0, w - 1)
    y1 = np.clip(np.floor(b[:, 1] + eps), 0, h - 1)
    x2 = np.clip(np.ceil(b[:, 2] - eps), x1 + 1, w)
    y2 = np.clip(np.ceil(b[:, 3] - eps), y1 + 1, h)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)


def add_margin(boxes: np.ndarray, sizes: np.ndarray, margin: float) -> np.ndarray:
    """Grow (N, 4) boxes by ``margin`` of their width/height on each side, clip to (h, w) sizes,
    round to whole pixels, and keep at least one pixel."""
    return to_pixels(grow(boxes, margin), sizes)


def found_sources(det: pd.DataFrame, settings: FaceSettings) -> np.ndarray:
    """Per row: the ``box_source`` of a face that counts as found, else "". A YuNet box always
    counts (its score threshold was applied when detecting), an MTCNN box when ``prob >=
    min_prob``. Without a ``pass`` column every box is taken as the first detector's."""
    n = len(det)
    k = det["pass"].to_numpy(dtype=np.int64) if "pass" in det else np.ones(n, dtype=np.int64)
    names = np.array(["", *settings.pass_sources()], dtype=object)
    if n and not 0 <= k.min() <= k.max() < len(names):
        raise DataError(f"face box table has detection pass {k.max()}, but these face settings "
                        f"run {len(names) - 1} passes; delete the table to redetect")
    source = names[k]
    prob = det["prob"].to_numpy(dtype=np.float64)
    counts = np.isfinite(prob) & ((source == "yunet") | (prob >= settings.min_prob))
    return np.where(counts & (source != ""), source, "").astype(object)


def found_faces(det: pd.DataFrame, settings: FaceSettings) -> np.ndarray:
    """Per row: whether a detector's face counts as found (``found_sources``)."""
    return found_sources(det, settings) != ""


def _crop_boxes(det: pd.DataFrame, settings: FaceSettings) -> tuple[np.ndarray, np.ndarray]:
    """Each row's found source and its box grown by that detector's margin, normalized by
    image size (NaN where no face counts)."""
    wh = det[["width", "height"]].to_numpy(dtype=np.float64)
    norm = det[list(BOX_COLUMNS)].to_numpy(dtype=np.float64) / np.concatenate([wh, wh], axis=1)
    source = found_sources(det, settings)
    margins = np.array([settings.margin_of(s) for s in source], dtype=np.float64)
    crops = grow(norm, margins)
    crops[source == ""] = np.nan
    return source, crops


def fallback_box(det: pd.DataFrame, settings: FaceSettings) -> np.ndarray | None:
    """The data set's median crop of a found face (margin included), normalized by image size
    (x1, y1, x2, y2 in [0, 1] before clipping): what an image with no face found gets, and the
    size ``min_crop`` is a share of. Medians are of crops, not raw boxes, because each
    detector's boxes get their own margin. None when no face was found at all."""
    source, crops = _crop_boxes(det, settings)
    found = source != ""
    return np.median(crops[found], axis=0) if found.any() else None


def at_least(crops: np.ndarray, typical: np.ndarray, share: float) -> np.ndarray:
    """(N, 4) crops, each grown about its centre (aspect kept) until neither its width nor its
    height is below ``share`` of the ``typical`` crop's; crops already that big are unchanged."""
    c = np.asarray(crops, dtype=np.float64).reshape(-1, 4)
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    tw, th = typical[2] - typical[0], typical[3] - typical[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.fmax(1.0, np.fmax(share * tw / w, share * th / h))
    cx, cy = (c[:, 0] + c[:, 2]) / 2, (c[:, 1] + c[:, 3]) / 2
    return np.stack([cx - k * w / 2, cy - k * h / 2, cx + k * w / 2, cy + k * h / 2], axis=1)


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

    ``det`` has ``width``, ``height``, ``x1..y2``, ``prob`` (NaN = no face) and ``pass`` (which
    detector pass found it, ``FaceSettings.pass_sources``; absent: the first); ``person`` names
    each row's person (None for eval images; the cache passes None for every image, see the
    module's crop parity). A found face (``found_sources``) gets its detector's margin, then
    ``min_crop``. Misses take the median of the same person's found crops (only with
    ``person``), else the data set's median crop, else ``CENTER_BOX`` with ``margin``; medians
    are taken on crops normalized by image size, so images of different sizes mix.
    ``fallback`` (normalized, from ``fallback_box``) replaces the median of ``det`` itself, for
    misses and ``min_crop`` alike: photos outside a data set are cropped as that data set's
    eval images are. Returns ``x1..y2`` (ints, clipped) and ``box_source``.
    """
    n = len(det)
    wh = det[["width", "height"]].to_numpy(dtype=np.float64)
    scale = np.concatenate([wh, wh], axis=1)
    source, crops = _crop_boxes(det, settings)
    found = source != ""
    if fallback is None:
        fallback = fallback_box(det, settings)
    if fallback is not None and settings.min_crop > 0 and found.any():
        crops[found] = at_least(crops[found], fallback, settings.min_crop)
    if person is not None:
        owners = pd.Series(list(person), dtype=object)
        known = found & owners.notna().to_numpy()
        if known.any():
            med = pd.DataFrame(crops[known]).groupby(owners[known].to_numpy()).median()
            take = ~found & owners.isin(med.index).to_numpy()
            if take.any():
                crops[take] = med.loc[owners[take].to_numpy()].to_numpy()
                source[take] = "person"
    rest = source == ""
    if rest.any():
        crops[rest] = grow(np.array(CENTER_BOX), settings.margin)[0] if fallback is None \
            else fallback
        source[rest] = "center" if fallback is None else "dataset"
    boxes = to_pixels(crops * scale, wh[:, ::-1])  # sizes as (h, w)
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
