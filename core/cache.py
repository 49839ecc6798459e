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
import multiprocessing
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from core import faces as F
from core.atomic import file_lock, remove_dead_temps, temp_path
from core.cli import run_cli
from core.errors import DataError

CACHE_VERSION = 1
ENV_ROOT = "MASK_SEARCH_CACHE"
DEFAULT_ROOT_NAME = ".mask_search_cache"
LOCK_NAME = ".lock"  # in the cache root: one build at a time (see build_cache)
CHUNK = 64  # images per worker task: big enough to hide pool overhead, small for a smooth bar
DEFAULT_FACES = F.FaceSettings()
INDEX_COLUMNS = ("file", "split", "person", *F.BOX_COLUMNS, "prob", "box_source")


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
        raise bad_images_error(data_dir, bad)
    listing["size"] = np.array([s.st_size for s in stats], dtype=np.int64)
    listing["mtime_ns"] = np.array([s.st_mtime_ns for s in stats], dtype=np.int64)
    return listing


def _hash(obj: object, n: int = 16) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def cache_key(data_dir: str | Path, image_size: tuple[int, int], faces: F.FaceSettings) -> dict:
    return {"version": CACHE_VERSION, "data": str(Path(data_dir).resolve()),
            "faces": faces.key(), "image_size": [int(image_size[0]), int(image_size[1])]}


# ---- worker functions (top level so a process pool can pickle them) ----

def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; nested threads only contend


def _small_copies(paths: list[str], detect_size: int
                  ) -> list[tuple[np.ndarray, tuple[int, int]] | str]:
    """Downscaled copy and full (h, w) per path, or the reason it cannot be decoded: every bad
    file of a chunk is reported, not just the first."""
    out: list[tuple[np.ndarray, tuple[int, int]] | str] = []
    for p in paths:
        try:
            img = F.read_rgb(p)
        except F.BadImageError as e:
            out.append(e.reason)
            continue
        out.append((F.downscale(img, detect_size), img.shape[:2]))
    return out


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
            out[start + i] = crop_resize(F.read_rgb(p), box, size)
        except F.BadImageError as e:
            bad.append((start + i, e.reason))
    out.flush()
    return len(paths), bad


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


def _chunks(n: int, size: int = CHUNK) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


class _Runner:
    """Runs chunk tasks in a process pool, or in this process when ``workers <= 1``."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() \
                else "spawn"  # no fork: the parent may hold torch threads
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context(method),
                                            initializer=_init_worker)

    def map(self, fn, *iterables) -> Iterator:
        if self.pool is None:
            return map(fn, *iterables)
        return self.pool.map(fn, *iterables)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ---- build ----

def _detections(listing: pd.DataFrame, data_dir: Path, faces: F.FaceSettings, table: Path,
                runner: _Runner, progress: bool) -> pd.DataFrame:
    """Raw detections for every listed file, detecting only files new or changed since the
    saved table; the table is updated atomically."""
    saved = F.load_detections(table)
    if saved.empty:
        saved = saved.astype({"size": np.int64, "mtime_ns": np.int64})
    keep = saved.merge(listing[["file", "size", "mtime_ns"]], on=["file", "size", "mtime_ns"])
    todo = listing.loc[~listing["file"].isin(keep["file"]), "file"].tolist()
    if todo:
        detector = None  # loaded on the first decodable image (seconds; none if all are bad)
        rows = listing.set_index("file").loc[todo, ["size", "mtime_ns"]]
        found = np.full((len(todo), 5), np.nan)
        sizes = np.zeros((len(todo), 2), dtype=np.int64)
        ok = np.ones(len(todo), dtype=bool)
        bad: list[tuple[str, str]] = []
        slices = list(_chunks(len(todo), max(faces.batch_size, 1)))
        paths = [[str(data_dir / f) for f in todo[s]] for s in slices]
        with tqdm(total=len(todo), desc="face boxes", disable=not progress, unit="img") as bar:
            for s, res in zip(slices, runner.map(_small_copies, paths,
                                                 [faces.detect_size] * len(paths)), strict=True):
                good = [k for k, r in enumerate(res) if not isinstance(r, str)]
                for k, r in enumerate(res):
                    if isinstance(r, str):
                        ok[s.start + k] = False
                        bad.append((todo[s.start + k], r))
                if good:
                    detector = detector or F.get_detector(faces)
                    idx = [s.start + k for k in good]
                    sizes[idx] = [res[k][1] for k in good]
                    found[idx] = detector.detect_small([res[k][0] for k in good],
                                                       sizes[idx].tolist())
                bar.update(s.stop - s.start)
        new = pd.DataFrame({"file": todo, "size": rows["size"].to_numpy(),
                            "mtime_ns": rows["mtime_ns"].to_numpy(), "width": sizes[:, 1],
                            "height": sizes[:, 0]})
        new[[*F.BOX_COLUMNS, "prob"]] = found
        new = new[ok]
        if len(new):  # the good files' boxes are kept even when some files are bad
            keep = pd.concat([keep, new], ignore_index=True) if len(keep) else new
            F.save_detections(keep, table)
        if bad:
            order = {f: i for i, f in enumerate(listing["file"])}
            raise bad_images_error(data_dir, sorted(bad, key=lambda b: order[b[0]]))
    return keep.set_index("file").loc[listing["file"]].reset_index()


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
                faces: F.FaceSettings = DEFAULT_FACES, cache_root: str | Path | None = None,
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


def _build(data_dir: Path, listing: pd.DataFrame, sources: list, key: dict,
           faces: F.FaceSettings, final: Path, workers: int | None, progress: bool) -> None:
    """Build the cache into a temp folder and install it at ``final`` (under the root's lock,
    which also covers the read-detect-write of the face-box table that all image sizes share)."""
    root, name = final.parent, final.name
    h, w = key["image_size"]
    remove_dead_temps(root, f"{glob.escape(name)}*")  # killed builds' folders, old copies
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    runner = _Runner(workers)
    tmp = temp_path(final)
    try:
        # rows are keyed by (relative path, size, mtime_ns), so a copy of the data (copy2 keeps
        # mtimes) reuses them; a changed file gets a new row
        table = root / f"boxes-{faces.detection_key()}.csv"
        det = _detections(listing, data_dir, faces, table, runner, progress)
        person = [p if s == "train" else None for p, s in zip(listing["person"], listing["split"],
                                                              strict=True)]
        boxes = F.resolve_boxes(det, faces, person)
        tmp.mkdir()
        npy = tmp / "images.npy"
        np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(listing), h, w, 3))
        slices = list(_chunks(len(listing)))
        box_arr = boxes[list(F.BOX_COLUMNS)].to_numpy()
        files = [str(data_dir / f) for f in listing["file"]]
        n = len(slices)
        bad: list[tuple[int, str]] = []
        with tqdm(total=len(listing), desc=f"cache {h}x{w}", disable=not progress,
                  unit="img") as bar:
            for done, chunk_bad in runner.map(_crop_chunk, [str(npy)] * n,
                                              [s.start for s in slices],
                                              [files[s] for s in slices],
                                              [box_arr[s] for s in slices], [(h, w)] * n):
                bad.extend(chunk_bad)
                bar.update(done)
        if bad:  # files changed after their boxes were found (same size and mtime)
            raise bad_images_error(data_dir, [(listing["file"].iat[i], r) for i, r in sorted(bad)])
        index = listing[["file", "split", "person"]].copy()
        index[list(F.BOX_COLUMNS)] = box_arr
        index["prob"] = det["prob"].to_numpy()
        index["box_source"] = boxes["box_source"].to_numpy()
        index[list(INDEX_COLUMNS)].to_csv(tmp / "index.csv", index=False)
        manifest = {"key": key, "sources": sources, "shape": [len(listing), h, w, 3],
                    "box_sources": index["box_source"].value_counts().to_dict()}
        (tmp / "manifest.json").write_text(json.dumps(manifest))  # last: marks it complete
        _install(tmp, final)
    finally:
        runner.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    from core.config import TrainConfig

    default_h, default_w = TrainConfig().image_size
    d = F.FaceSettings()
    ap = argparse.ArgumentParser(prog="python -m core.cache",
                                 description="Prebuild the face-cropped image cache of a data set.")
    ap.add_argument("--data", required=True, help="data folder (train/, eval/)")
    ap.add_argument("--height", type=int, default=default_h)
    ap.add_argument("--width", type=int, default=default_w)
    ap.add_argument("--cache-root", default=None,
                    help=f"default: ${ENV_ROOT} or DATA/{DEFAULT_ROOT_NAME}")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--detect-size", type=int, default=d.detect_size)
    ap.add_argument("--margin", type=float, default=d.margin)
    ap.add_argument("--min-prob", type=float, default=d.min_prob)
    ap.add_argument("--min-face-size", type=int, default=d.min_face_size)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    args = ap.parse_args(argv)
    return run_cli(lambda: _build_and_report(args), args.debug)


def _build_and_report(args: argparse.Namespace) -> int:
    """Body of ``python -m core.cache``: build (or reuse) the cache and say what it holds."""
    settings = F.FaceSettings(detect_size=args.detect_size, margin=args.margin,
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
