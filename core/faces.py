"""Face boxes: MTCNN on batches of downscaled copies, a margin, and a fallback when none is found.

Models in this task only look at the face, so every image is cropped to its face once, before
any training. Detecting on small copies (longer side ``detect_size``) of many images at once is
several times faster than the usual one-image-at-a-time full-resolution MTCNN at nearly the same
boxes (``bench/faces.py`` measures both). MTCNN misses many masked faces, so a missing face falls
back to the same person's found boxes, then to the data set's median box, then to a center crop,
and each image records which of these its box came from (``box_source``).

Raw detections (no margin, best probability whatever its value) are kept in a CSV keyed by image
path with the file's size and mtime, so no image is ever detected twice; margin, probability
threshold and fallbacks are applied afterwards by ``resolve_boxes`` (cheap, no image read).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.atomic import atomic_write
from core.errors import DataError

BOX_SOURCES = ("mtcnn", "person", "dataset", "center")
#: Normalized (x1, y1, x2, y2) used when no face was found anywhere in the data set.
CENTER_BOX = (0.15, 0.1, 0.85, 0.8)
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
DETECTION_COLUMNS = ("file", "size", "mtime_ns", "width", "height", *BOX_COLUMNS, "prob")


@dataclass(frozen=True)
class FaceSettings:
    """How faces are found and cropped; part of the image cache key.

    ``min_face_size`` is in pixels of the downscaled copy (MTCNN's image pyramid starts there):
    20 px at a 192 px longer side is a face about 1/10 of the image, much smaller than the faces
    in this data set. ``margin`` is the fraction of the box width/height added on each side.
    ``batch_size`` and ``device`` change speed only, not results, so they are not in the key.
    """

    detect_size: int = 192
    margin: float = 0.2
    min_prob: float = 0.9
    min_face_size: int = 20
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.detect_size < 24:
            raise DataError(f"FaceSettings.detect_size must be >= 24, got {self.detect_size}")
        if self.min_face_size < 12:
            raise DataError(f"FaceSettings.min_face_size must be >= 12 (MTCNN's smallest face), "
                            f"got {self.min_face_size}")
        if not 0 <= self.margin <= 2:
            raise DataError(f"FaceSettings.margin must be in [0, 2], got {self.margin}")
        if not 0 <= self.min_prob <= 1:
            raise DataError(f"FaceSettings.min_prob must be in [0, 1], got {self.min_prob}")

    def key(self) -> dict:
        """The fields that change boxes (what a cache is keyed on)."""
        d = asdict(self)
        del d["batch_size"], d["device"]
        return d

    def detection_key(self) -> str:
        """Short hash of the fields that change raw detections (margin/min_prob do not)."""
        raw = json.dumps({"detect_size": self.detect_size, "min_face_size": self.min_face_size})
        return hashlib.sha1(raw.encode()).hexdigest()[:12]


class BadImageError(DataError):
    """An image file that cannot be used. ``reason`` is short and stable ("truncated JPEG",
    "empty file", "not an image", "permission denied", ...) so a build can list every bad file
    in one message instead of stopping at the first."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_EOI = b"\xff\xd9"


def _read_bytes(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except IsADirectoryError:
        raise BadImageError(path, "a folder, not an image file") from None
    except OSError as e:
        raise BadImageError(path, f"cannot read ({e.strerror or e})") from None


def _jpeg_complete(data: bytes) -> bool:
    """Whether a JPEG that decoded has all its data: it ends with the EOI marker, or (trailing
    bytes after EOI, which some cameras write) PIL decodes it fully without complaint.

    OpenCV 4 decodes a cut-off JPEG into a partly gray image with only a log line; PIL with
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` off (its default) raises instead.
    """
    if data.rstrip(b"\x00\r\n ").endswith(JPEG_EOI):
        return True
    from PIL import Image  # deferred: only for the rare JPEG with bytes after its end

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _undecodable_reason(data: bytes) -> str:
    """Why bytes that OpenCV could not decode are not an image, from their first/last bytes."""
    if data.startswith(JPEG_MAGIC):
        return "corrupt JPEG" if data.rstrip(b"\x00\r\n ").endswith(JPEG_EOI) else \
            "truncated JPEG"
    if data.startswith(PNG_MAGIC):
        return "corrupt PNG" if b"IEND" in data[-16:] else "truncated PNG"
    head = data[:512]
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "not an image (a text file)"
        except UnicodeDecodeError:
            pass
    return "not an image (unknown format)"


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3); grayscale, RGBA (alpha dropped), palette
    and 16-bit images become 8-bit RGB, EXIF rotation is applied.

    Raises ``BadImageError`` for an empty, unreadable, truncated or non-image file: a partial
    decode must never reach the cache as if it were the photo.
    """
    data = _read_bytes(path)
    if not data:
        raise BadImageError(path, "empty file")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadImageError(path, _undecodable_reason(data))
    if data.startswith(JPEG_MAGIC) and not _jpeg_complete(data):
        raise BadImageError(path, "truncated JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def downscale(img: np.ndarray, detect_size: int) -> np.ndarray:
    """Copy with the longer side ``detect_size`` (never upscaled), for detection."""
    h, w = img.shape[:2]
    s = detect_size / max(h, w)
    if s >= 1:
        return np.ascontiguousarray(img)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


class FaceDetector:
    """Batched MTCNN on small copies; boxes come back in full-resolution pixels."""

    def __init__(self, settings: FaceSettings = FaceSettings()):
        from facenet_pytorch import MTCNN  # deferred: torch import is slow, reuse needs none

        self.settings = settings
        # thresholds are MTCNN's stage thresholds; our min_prob is applied in resolve_boxes
        self.mtcnn = MTCNN(keep_all=True, post_process=False, select_largest=False,
                           min_face_size=settings.min_face_size, device=settings.device)

    def detect_small(self, smalls: Sequence[np.ndarray], full_sizes: Sequence[tuple[int, int]]
                     ) -> np.ndarray:
        """Most probable face per image: (N, 5) x1, y1, x2, y2, prob at full resolution; NaN rows
        where MTCNN found nothing. ``smalls`` are downscaled copies, ``full_sizes`` (h, w)."""
        out = np.full((len(smalls), 5), np.nan)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(smalls):  # MTCNN batches need equal sizes
            groups.setdefault(s.shape, []).append(i)
        bs = self.settings.batch_size
        for shape, idx in groups.items():
            if min(shape[:2]) < self.settings.min_face_size:
                continue  # smaller than the smallest face: MTCNN's pyramid would be empty
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                boxes, probs = self.mtcnn.detect(np.stack([smalls[i] for i in chunk]))
                for i, b, p in zip(chunk, boxes, probs, strict=True):
                    if b is None:
                        continue
                    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
                    p = np.asarray(p, dtype=np.float64).reshape(-1)
                    k = int(np.argmax(p))
                    fh, fw = full_sizes[i]
                    sx, sy = fw / shape[1], fh / shape[0]
                    out[i, :4] = b[k] * (sx, sy, sx, sy)
                    out[i, 4] = p[k]
        return out

    def detect(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Full-resolution RGB images -> (N, 5) boxes as in ``detect_small``."""
        smalls = [downscale(im, self.settings.detect_size) for im in images]
        return self.detect_small(smalls, [im.shape[:2] for im in images])


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


def resolve_boxes(det: pd.DataFrame, settings: FaceSettings,
                  person: Sequence[str | None] | None = None) -> pd.DataFrame:
    """Final crop box per image from raw detections, with the fallback order.

    ``det`` has ``width``, ``height``, ``x1..y2`` and ``prob`` (NaN = no face); ``person`` names
    each row's person (None for eval images). A detection counts when ``prob >= min_prob``.
    Misses take the median of the same person's found boxes, else the data set's median box,
    else ``CENTER_BOX``; medians are taken on boxes normalized by image size, so images of
    different sizes mix. Returns ``x1..y2`` (ints, margin added, clipped) and ``box_source``.
    """
    n = len(det)
    wh = det[["width", "height"]].to_numpy(dtype=np.float64)
    scale = np.concatenate([wh, wh], axis=1)
    norm = det[list(BOX_COLUMNS)].to_numpy(dtype=np.float64) / scale
    found = det["prob"].to_numpy(dtype=np.float64) >= settings.min_prob  # NaN -> False
    source = np.where(found, "mtcnn", "").astype(object)
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
        if found.any():
            norm[rest] = np.median(norm[found], axis=0)
            source[rest] = "dataset"
        else:
            norm[rest] = CENTER_BOX
            source[rest] = "center"
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
