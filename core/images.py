"""Image decoding: one full decode for the crop, a cheap reduced decode for face detection.

Every image reaches the cache through ``read_rgb`` (full resolution, for the crop) and, when its
face is detected, through ``read_small``: OpenCV's ``IMREAD_REDUCED_COLOR_{2,4,8}`` decodes a
JPEG at 1/2, 1/4 or 1/8 size inside the DCT, several times cheaper than a full decode and a
resize, and detection on a 192x256 copy needs no more. Both raise ``BadImageError`` with a short,
stable reason for a file that cannot be used, so a build lists every bad file at once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.errors import DataError

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_EOI = b"\xff\xd9"
#: OpenCV's decode flag per reduction (1 = full resolution).
REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class BadImageError(DataError):
    """An image file that cannot be used. ``reason`` is short and stable ("truncated JPEG",
    "empty file", "not an image", "permission denied", ...) so a build can list every bad file
    in one message instead of stopping at the first."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


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


def _decode(path: str | Path, data: bytes, reduce: int) -> np.ndarray:
    """``data`` decoded to RGB at 1/``reduce`` size, or ``BadImageError``."""
    if not data:
        raise BadImageError(path, "empty file")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), REDUCED_FLAGS[reduce])
    if img is None:
        raise BadImageError(path, _undecodable_reason(data))
    if data.startswith(JPEG_MAGIC) and not _jpeg_complete(data):
        raise BadImageError(path, "truncated JPEG")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3); grayscale, RGBA (alpha dropped), palette
    and 16-bit images become 8-bit RGB, EXIF rotation is applied.

    Raises ``BadImageError`` for an empty, unreadable, truncated or non-image file: a partial
    decode must never reach the cache as if it were the photo.
    """
    return _decode(path, _read_bytes(path), 1)


def _full_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the decoded image from the file's header alone (PIL reads no pixels),
    after EXIF rotation as OpenCV applies it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if data.startswith(JPEG_MAGIC) and im.getexif().get(EXIF_ORIENTATION) in TRANSPOSED:
            w, h = h, w
    return h, w


def read_small(path: str | Path, reduce: int
               ) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
    """A 1/``reduce`` decode for detection, the full decode's (height, width), and the (sy, sx)
    factors that map the small copy's pixels back to the full image's.

    A JPEG is reduced in the DCT, in whole 8x8 blocks: small pixel i covers full pixels
    ``reduce*i .. reduce*i + reduce - 1`` (a last, partial block rounds the size up), so the
    factor is exactly ``reduce``. Other formats are decoded whole and resized by OpenCV to
    ``floor(size / reduce)``, so the factor is full size over small size.
    """
    data = _read_bytes(path)
    small = _decode(path, data, reduce)
    if reduce == 1:
        return small, small.shape[:2], (1.0, 1.0)
    h, w = _full_size(data)
    if data.startswith(JPEG_MAGIC):
        return small, (h, w), (float(reduce), float(reduce))
    return small, (h, w), (h / small.shape[0], w / small.shape[1])


#: How many bad files one error message lists (a wholly broken copy would list thousands).
MAX_LISTED = 50


def bad_images_error(data_dir: Path, bad: Sequence[tuple[str, str]]) -> DataError:
    """One error for every undecodable image found in a pass: (file, reason) pairs.

    Nothing is skipped, train or eval: a training image that cannot be decoded almost always
    means a broken copy (skipping it would silently change the data and the folds), and the
    submission needs a row for every eval image.
    """
    counts = pd.Series([r for _, r in bad]).value_counts()
    summary = ", ".join(f"{n} {r}" for r, n in counts.items())
    lines = [f"  {f}: {r}" for f, r in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
    return DataError(f"{data_dir}: {len(bad)} image file(s) cannot be used ({summary}); no cache "
                     f"was written. Copy them again from the original data, then rerun:\n"
                     + "\n".join(lines))
