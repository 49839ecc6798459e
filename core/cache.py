"""The image cache: every image decoded once, face-cropped, resized, in one uint8 memmap.

Decoding 384x512 JPEGs and cropping faces in every epoch of every trial would make a search
mostly I/O, so this happens once per (data set, face settings, image size). The cache folder
holds ``images.npy`` (N, h, w, 3) RGB, ``index.csv`` (file, split, person, box, box_source) and
``manifest.json`` (key, the source files' names/sizes/mtimes, shape). It is built under a
temporary name and renamed when complete, so a killed build never looks valid; it is reused
when the key and the source files match (checked with ``os.stat`` only, no image is opened) and
rebuilt when they differ. Processes building in one cache root at once (``search.run --workers``)
take turns on a lock file there, so one builds and the others reuse its result. An image that
cannot be decoded (empty, truncated, not an image, unreadable) stops the build with one
``DataError`` listing every such file, found in the first decoding pass, before any cache folder
exists. Face boxes do not depend on the image
size: raw detections live in a separate table next to the caches and are reused by every image
size (see ``core.faces``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from core import faces as face_rules
from core import images as img_io
from core.atomic import (
    disk_full,
    file_lock,
    is_disk_full,
    remove_dead_temps,
    reserve_space,
    temp_path,
)
from core.cli import Parser, run_cli
from core.errors import DataError
from core.face_pass import detections
from core.faces import FaceSettings
from core.loader import RowView
from core.pool import Runner, chunks

CACHE_VERSION = 2  # 2: every image cropped by the eval rule (no person fallback)
ENV_ROOT = "MASK_SEARCH_CACHE"
DEFAULT_ROOT_NAME = ".mask_search_cache"
LOCK_NAME = ".lock"  # in the cache root: one build at a time (see build_cache)
DEFAULT_FACES = FaceSettings()
INDEX_COLUMNS = ("file", "split", "person", *face_rules.BOX_COLUMNS, "prob", "box_source")


def default_cache_root(data_dir: str | Path) -> Path:
    """``$MASK_SEARCH_CACHE`` when set, else ``<data_dir>/.mask_search_cache``."""
    env = os.environ.get(ENV_ROOT)
    return Path(env) if env else Path(data_dir) / DEFAULT_ROOT_NAME


@dataclass
class ImageCache:
    """A built cache: ``images`` (read-only memmap, N x h x w x 3 uint8 RGB) and ``index``."""

    path: Path
    images: np.ndarray
    index: pd.DataFrame
    manifest: dict
    _pos: dict[str, int] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> ImageCache:
        """Reopen a complete cache folder; a missing manifest means an unfinished build."""
        path = Path(path)
        man = path / "manifest.json"
        if not man.is_file():
            raise DataError(f"{path}: not a complete image cache (no manifest.json)")
        try:
            manifest = json.loads(man.read_text())
            images = np.load(path / "images.npy", mmap_mode="r")
            index = pd.read_csv(path / "index.csv", dtype={"file": str, "person": str},
                                keep_default_na=False, na_values={"prob": [""]})
        except (OSError, ValueError) as e:  # pandas' and json's parse errors are ValueErrors
            raise DataError(f"{path}: damaged image cache ({e}); delete the folder") from None
        if len(index) != len(images) or list(images.shape) != manifest["shape"]:
            raise DataError(f"{path}: index.csv has {len(index)} rows, images.npy "
                            f"{images.shape}, manifest {manifest['shape']}; delete the folder")
        return cls(path, images, index, manifest)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def view(self, files: Sequence[str]) -> RowView:
        """``files``' images in that order, as a view on the memmap (nothing copied to RAM)."""
        return RowView(self.images, self.rows(files))

    def rows(self, files: Sequence[str]) -> np.ndarray:
        """Row numbers of ``files`` (paths relative to the data dir, as in the tables)."""
        if not self._pos:
            self._pos = {f: i for i, f in enumerate(self.index["file"])}
        try:
            return np.fromiter((self._pos[f] for f in files), dtype=np.int64, count=len(files))
        except KeyError as e:
            raise DataError(f"{self.path}: image {e.args[0]!r} is not in the cache "
                            f"(was the data changed after the cache was built?)") from None


def source_listing(data_dir: str | Path) -> pd.DataFrame:
    """Every image the cache holds (train table order, then eval order), with size and mtime.

    Only the tables and ``os.stat``: deciding whether a cache is current opens no image.
    """
    from core.dataset import load_eval_table, load_train_table

    data_dir = Path(data_dir)
    train = load_train_table(data_dir)
    parts = [pd.DataFrame({"file": train["file"], "split": "train", "person": train["person"]})]
    if (data_dir / "eval" / "info.csv").exists():
        ev = load_eval_table(data_dir)
        parts.append(pd.DataFrame({"file": ev["file"], "split": "eval", "person": ""}))
    listing = pd.concat(parts, ignore_index=True)
    stats, bad = [], []
    for f in listing["file"]:
        try:
            stats.append(os.stat(data_dir / f))
        except OSError as e:  # a dangling link, a folder we may not enter
            bad.append((f, "permission denied" if isinstance(e, PermissionError)
                        else f"cannot read ({e.strerror or e})"))
    if bad:
        raise img_io.bad_images_error(data_dir, bad)
    listing["size"] = np.array([s.st_size for s in stats], dtype=np.int64)
    listing["mtime_ns"] = np.array([s.st_mtime_ns for s in stats], dtype=np.int64)
    return listing


def _hash(obj: object, n: int = 16) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def cache_key(data_dir: str | Path, image_size: tuple[int, int], faces: FaceSettings) -> dict:
    return {"version": CACHE_VERSION, "data": str(Path(data_dir).resolve()),
            "faces": faces.key(), "image_size": [int(image_size[0]), int(image_size[1])]}


def crop_resize(img: np.ndarray, box: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """The one preprocessing path: crop the (x1, y1, x2, y2) box, resize to (h, w)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = img[y1:y2, x1:x2]
    return cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _crop_chunk(npy: str, start: int, paths: list[str], boxes: np.ndarray,
                size: tuple[int, int]) -> tuple[int, list[tuple[int, str]]]:
    """Decode, crop and resize ``paths`` into rows ``start..`` of the memmap at ``npy``; return
    the count and (row, reason) of each file that could not be decoded."""
    out = np.load(npy, mmap_mode="r+")
    bad = []
    for i, (p, box) in enumerate(zip(paths, boxes, strict=True)):
        try:
            out[start + i] = crop_resize(img_io.read_rgb(p), box, size)
        except img_io.BadImageError as e:
            bad.append((start + i, e.reason))
    out.flush()
    return len(paths), bad


# ---- build ----


def _install(tmp: Path, final: Path) -> None:
    """Put the finished ``tmp`` folder at ``final`` (caller holds the root's lock).

    A folder cannot be renamed over a non-empty one, so an old (stale or damaged) ``final`` is
    first moved to a pid-named temp (reaped by a later build if we are killed here) and removed
    after. Readers that skip the lock and look in between find no folder and fall back to
    waiting for the lock: they never see a folder without its manifest.
    """
    old = None
    if final.exists():
        old = temp_path(final.with_name(f"{final.name}-old"))
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _open_current(final: Path, key: dict, sources: list) -> ImageCache | None:
    """The cache at ``final`` when it is complete and built from ``key`` and ``sources``."""
    try:
        manifest = json.loads((final / "manifest.json").read_text())
    except (OSError, ValueError):
        return None  # absent, unfinished or unreadable: (re)build it
    if manifest.get("key") != key or manifest.get("sources") != sources:
        return None
    try:
        return ImageCache.open(final)
    except DataError:
        return None  # damaged after it was built (e.g. images.npy cut short): rebuild


def build_cache(data_dir: str | Path, image_size: tuple[int, int] = (128, 96),
                faces: FaceSettings = DEFAULT_FACES, cache_root: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> ImageCache:
    """Open the cache for (data, faces, image_size), building it first when missing or stale.

    ``image_size`` is (height, width). ``workers`` processes decode images (None: one per core,
    at most 8; 0 or 1: in this process). Processes that need the same cache at once (``search.run
    --workers``) build it once: builds in one cache root take turns on ``<cache_root>/.lock``
    (they would compete for the same cores anyway, and share the face-box table), and whoever
    waited reuses what was built meanwhile.
    """
    data_dir = Path(data_dir)
    h, w = int(image_size[0]), int(image_size[1])
    if min(h, w) < 1:
        raise DataError(f"image_size must be (height, width) >= 1, got {image_size}")
    root = Path(cache_root) if cache_root is not None else default_cache_root(data_dir)
    key = cache_key(data_dir, (h, w), faces)
    name = f"images-{h}x{w}-{_hash(key, 12)}"
    final = root / name
    listing = source_listing(data_dir)
    sources = [[f, int(s), int(m)] for f, s, m in
               zip(listing["file"], listing["size"], listing["mtime_ns"], strict=True)]
    cache = _open_current(final, key, sources)  # no lock: a valid cache is never modified
    if cache is not None:
        return cache
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / LOCK_NAME):
        cache = _open_current(final, key, sources)  # built by another process while we waited
        if cache is None:
            _build(data_dir, listing, sources, key, faces, final, workers, progress)
            cache = ImageCache.open(final)
    return cache


def _crop_pass(runner: Runner, npy: Path, files: list[str], box_arr: np.ndarray,
               size: tuple[int, int], progress: bool) -> list[tuple[int, str]]:
    """Decode each image once at full size, crop and resize it into its memmap row (chunks on
    the runner's processes); the (row, reason) of each file that could not be decoded."""
    slices = list(chunks(len(files)))
    n = len(slices)
    bad: list[tuple[int, str]] = []
    with tqdm(total=len(files), desc=f"cache {size[0]}x{size[1]}", disable=not progress,
              unit="img") as bar:
        for done, chunk_bad in runner.map(_crop_chunk, [str(npy)] * n, [s.start for s in slices],
                                          [files[s] for s in slices],
                                          [box_arr[s] for s in slices], [size] * n):
            bad.extend(chunk_bad)
            bar.update(done)
    return bad


def _build(data_dir: Path, listing: pd.DataFrame, sources: list, key: dict,
           faces: FaceSettings, final: Path, workers: int | None, progress: bool) -> None:
    """Build the cache into a temp folder and install it at ``final`` (under the root's lock,
    which also covers the read-detect-write of the face-box table that all image sizes share)."""
    root, name = final.parent, final.name
    h, w = key["image_size"]
    remove_dead_temps(root, f"{glob.escape(name)}*")  # killed builds' folders, old copies
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    runner = Runner(workers)
    tmp = temp_path(final)
    try:
        # rows are keyed by (relative path, size, mtime_ns), so a copy of the data (copy2 keeps
        # mtimes) reuses them; a changed file gets a new row
        table = root / f"boxes-{faces.detection_key()}.csv"
        det = detections(listing, data_dir, faces, table, runner, progress)
        # crop parity (DESIGN rule 6): every image is cropped by the rule an eval image gets,
        # never with its person's other boxes, since training images are also validation images
        boxes = face_rules.resolve_boxes(det, faces, person=None)
        face_rules.say_if_no_face(data_dir, det, faces)
        tmp.mkdir()
        npy = tmp / "images.npy"
        np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(listing), h, w, 3))
        reserve_space(npy)
        box_arr = boxes[list(face_rules.BOX_COLUMNS)].to_numpy()
        bad = _crop_pass(runner, npy, [str(data_dir / f) for f in listing["file"]], box_arr,
                         (h, w), progress)
        if bad:  # files changed after their boxes were found (same size and mtime)
            raise img_io.bad_images_error(data_dir, [(listing["file"].iat[i], r)
                                                     for i, r in sorted(bad)])
        index = listing[["file", "split", "person"]].copy()
        index[list(face_rules.BOX_COLUMNS)] = box_arr
        index["prob"] = det["prob"].to_numpy()
        index["box_source"] = boxes["box_source"].to_numpy()
        index[list(INDEX_COLUMNS)].to_csv(tmp / "index.csv", index=False)
        manifest = {"key": key, "sources": sources, "shape": [len(listing), h, w, 3],
                    "box_sources": index["box_source"].value_counts().to_dict()}
        (tmp / "manifest.json").write_text(json.dumps(manifest))  # last: marks it complete
        _install(tmp, final)
    except OSError as e:
        if is_disk_full(e):  # one line naming the cache; the temp folder goes (finally)
            raise disk_full(final) from e
        raise
    finally:
        runner.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    from core.config import TrainConfig

    default_h, default_w = TrainConfig().image_size
    d = FaceSettings()
    ap = Parser(prog="python -m core.cache",
                description="Prebuild the face-cropped image cache of a data set.")
    ap.add_argument("--data", required=True, help="data folder (train/, eval/)")
    ap.add_argument("--height", type=int, default=default_h)
    ap.add_argument("--width", type=int, default=default_w)
    ap.add_argument("--cache-root", default=None,
                    help=f"default: ${ENV_ROOT} or DATA/{DEFAULT_ROOT_NAME}")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--reduce", type=int, default=d.reduce, choices=sorted(img_io.REDUCED_FLAGS),
                    help="detect on a 1/N decode")
    ap.add_argument("--margin", type=float, default=d.margin)
    ap.add_argument("--min-prob", type=float, default=d.min_prob)
    ap.add_argument("--min-face-size", type=int, default=d.min_face_size,
                    help="smallest face searched for, in full-image pixels")
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    args = ap.parse_args(argv)
    return run_cli(lambda: _build_and_report(args), args.debug)


def _build_and_report(args: argparse.Namespace) -> int:
    """Body of ``python -m core.cache``: build (or reuse) the cache and say what it holds."""
    settings = FaceSettings(reduce=args.reduce, margin=args.margin,
                              min_prob=args.min_prob, min_face_size=args.min_face_size,
                              device=args.device)
    cache = build_cache(args.data, (args.height, args.width), settings, args.cache_root,
                        args.workers)
    counts = cache.index["box_source"].value_counts().to_dict()
    print(f"{cache.path}: {len(cache)} images {cache.image_size[0]}x{cache.image_size[1]}, "
          f"box sources {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
