"""The detection pass of a cache build: reduced decode, then the face detectors, for every
image not yet in the saved detection table, in parallel across cores.

Each worker process decodes its chunk of files small (``core.images.read_small``), runs the
detectors on the chunk (``core.detectors.FaceDetector``: YuNet image by image, MTCNN as batches on
what YuNet missed, each library with one thread: one process per core beats one process with
many threads on small images), and returns boxes already mapped to full-image pixels. The crop
pass then decodes each image once at full size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core import detectors as face_detectors
from core import faces as face_rules
from core import images as img_io
from core.faces import FaceSettings
from core.pool import Runner, chunks


def detect_chunk(paths: list[str], settings: FaceSettings
                 ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(N, 6) detections (``FaceDetector.detect_small``), (N, 2) full (h, w), and per file the
    reason it cannot be decoded (None when it can): every bad file of a chunk is reported."""
    det = np.full((len(paths), 6), np.nan)
    det[:, 5] = 0
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    reasons: list[str | None] = [None] * len(paths)
    smalls, scales, good = [], [], []
    for k, p in enumerate(paths):
        try:
            small, hw, scale = img_io.read_small(p, settings.reduce)
        except img_io.BadImageError as e:
            reasons[k] = e.reason
            continue
        smalls.append(small)
        scales.append(scale)
        sizes[k] = hw
        good.append(k)
    if good:  # the detector loads on the first decodable image (seconds; none if all are bad)
        det[good] = face_detectors.get_detector(settings).detect_small(smalls, scales)
    return det, sizes, reasons


def detect_files(paths: list[str], settings: FaceSettings, runner: Runner,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """``detect_chunk`` over all ``paths`` in chunks of ``batch_size``, on the runner's
    processes (in this process when the device is not the CPU: one GPU serves every batch).
    A detector that cannot load (YuNet's model file not installed) is said here, in one line,
    before any worker starts."""
    if "yunet" in settings.detectors:
        face_detectors.yunet_model()
    det = np.full((len(paths), 6), np.nan)
    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    reasons: list[str | None] = [None] * len(paths)
    slices = list(chunks(len(paths), max(settings.batch_size, 1)))
    run = runner.map if settings.device == "cpu" else map
    with tqdm(total=len(paths), desc="face boxes", disable=not progress, unit="img") as bar:
        for s, (d, hw, why) in zip(slices, run(detect_chunk, [paths[s] for s in slices],
                                               [settings] * len(slices)), strict=True):
            det[s], sizes[s], reasons[s] = d, hw, why
            bar.update(s.stop - s.start)
    return det, sizes, reasons


def detections(listing: pd.DataFrame, data_dir: Path, faces: FaceSettings, table: Path,
               runner: Runner, progress: bool) -> pd.DataFrame:
    """Raw detections for every listed file, detecting only files new or changed since the
    saved table; the table is updated atomically. Undecodable files stop the build with one
    error listing them all (after the good files' boxes are saved, so a rerun keeps them)."""
    saved = face_rules.load_detections(table)
    if saved.empty:
        saved = saved.astype({"size": np.int64, "mtime_ns": np.int64})
    keep = saved.merge(listing[["file", "size", "mtime_ns"]], on=["file", "size", "mtime_ns"])
    todo = listing.loc[~listing["file"].isin(keep["file"]), "file"].tolist()
    if todo:
        rows = listing.set_index("file").loc[todo, ["size", "mtime_ns"]]
        found, sizes, reasons = detect_files([str(data_dir / f) for f in todo], faces, runner,
                                             progress)
        new = pd.DataFrame({"file": todo, "size": rows["size"].to_numpy(),
                            "mtime_ns": rows["mtime_ns"].to_numpy(), "width": sizes[:, 1],
                            "height": sizes[:, 0]})
        new[[*face_rules.BOX_COLUMNS, "prob"]] = found[:, :5]
        new["pass"] = found[:, 5].astype(np.int64)
        ok = np.array([r is None for r in reasons], dtype=bool)
        new = new[ok]
        if len(new):  # the good files' boxes are kept even when some files are bad
            keep = pd.concat([keep, new], ignore_index=True) if len(keep) else new
            face_rules.save_detections(keep, table)
        if not ok.all():
            bad = [(f, r) for f, r in zip(todo, reasons, strict=True) if r is not None]
            order = {f: i for i, f in enumerate(listing["file"])}
            raise img_io.bad_images_error(data_dir, sorted(bad, key=lambda b: order[b[0]]))
    return keep.set_index("file").loc[listing["file"]].reset_index()
