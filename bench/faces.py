"""Face crops on real faces: a fair speed race against the usual MTCNN, and crop accuracy.

On a real-face set in the competition layout (``core.synth --faces``: real photos, drawn masks,
``true_boxes.csv``; ``--data``, or built under ``runs/`` on first use from ``--faces``, default
``$MASK_SEARCH_FACES`` else ``../shared/faces``):

- **Speed**, on ``--images`` of its photos read from disk: the usual way (each image decoded at
  full size and given to MTCNN alone, one process with ``--threads`` torch threads) against ours
  (``core.face_pass.detect_files`` with the default ``FaceSettings``: 1/``reduce`` JPEG decode,
  YuNet, then MTCNN batches on the images YuNet found no face in; ``--threads`` processes of
  one thread each, the same total threads) and ours in one process, which says what
  parallelism adds. The usual arm also runs with one torch thread, and the speedup is quoted
  against whichever usual arm is faster. The usual arm gets our ``min_face_size`` (full-image
  pixels), thresholds and factor, so both search for the same faces (ours drops YuNet boxes
  narrower than it). Arms are interleaved, rotating their order, and the median of
  ``--repeats`` runs is reported, with each arm's mean IoU of its raw boxes with the true boxes
  (the detectors cut faces differently, so this says where a box is, not how good its crop is).
- **Crops**, on every image, through the cache build a search uses: the share of faces found
  (by any detector) and the share of crops holding >= 90% of the true face, by split x mask
  state x box_source, the share more than twice the true face's area, and what the person
  fallback (which eval images cannot have, so the cache does not use it) would change on
  training images.

- **Arrangements** (``--arrangements``, instead of the above): the detectors alone and in
  either order, at 1/2 and full decode, through the same detection pass in one process, on
  every image: CPU ms per image (median of ``--repeats``, interleaved), found share and crops
  holding the face per split x mask state; how the default was chosen.

    python -m bench.faces [--data DIR | --faces DIR] [--images 200] [--repeats 3] [--threads N]
    python -m bench.faces --arrangements [--data DIR]

Last line, for scripts: ``faces speedup=X.Xx iou=0.xxx masked_found=0.xxx crop_ok_min=0.xxx``:
``iou`` is ours with the true boxes, ``masked_found`` the lowest found share and
``crop_ok_min`` the lowest share of crops holding the face, over split x mask state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import HOLDS, containment, crop_shares
from core import faces as F
from core.cache import build_cache
from core.face_pass import detect_files
from core.pool import Runner
from core.synth_faces import default_faces_dir, generate

ROOT = Path(__file__).resolve().parents[1]
MASK_NAMES = {0: "worn", 1: "incorrect", 2: "none"}
BIG = 2.0  # a crop "too big" has more than twice the true face's area


def ensure_data(faces: Path, people: int, eval_people: int) -> Path:
    """The real-face set under ``runs/``, written on first use (same arguments, same bytes)."""
    out = ROOT / "runs" / f"bench_faces-{people}-{eval_people}"
    if not (out / "true_boxes.csv").exists():
        print(f"writing the real-face set {out} from {faces} ...", flush=True)
        generate(out, faces, people, eval_people, seed=0, overwrite=True)
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, 4) x1, y1, x2, y2 rows."""
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = ix * iy
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


class Usual:
    """The usual way: full decode, one MTCNN call per full-size image, the most probable face,
    looking for the same smallest face (full-image pixels) with the same thresholds."""

    def __init__(self, s: F.FaceSettings):
        from facenet_pytorch import MTCNN

        self.mtcnn = MTCNN(keep_all=True, post_process=False, select_largest=False,
                           min_face_size=s.min_face_size, thresholds=list(s.thresholds),
                           factor=s.factor, device=s.device)

    def __call__(self, paths: list[str]) -> np.ndarray:
        out = np.full((len(paths), 5), np.nan)
        for i, p in enumerate(paths):
            img = cv2.cvtColor(cv2.imread(p, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            boxes, probs = self.mtcnn.detect(img)
            if boxes is not None:
                k = int(np.argmax(probs))
                out[i] = (*boxes[k], probs[k])
        return out


def _threads(n: int, fn: Callable) -> Callable:
    """``fn`` run with ``n`` torch threads in this process (the in-process arms share it)."""
    def run(paths: list[str]) -> np.ndarray:
        torch.set_num_threads(n)
        return fn(paths)
    return run


def race(paths: list[str], s: F.FaceSettings, threads: int, repeats: int) -> dict:
    """Seconds per arm (median of ``repeats``, interleaved, order rotated) and their boxes.

    The usual way runs twice: with ``threads`` torch threads (the same budget as ours) and with
    one, because on a loaded machine torch's threads can slow it down a lot, and the speedup is
    quoted against the faster of the two."""
    usual = Usual(s)
    pool, alone = Runner(threads), Runner(1)
    arms = {"usual": _threads(threads, usual), "usual_1thread": _threads(1, usual),
            "ours": lambda p: detect_files(p, s, pool)[0],
            "ours_1proc": _threads(threads, lambda p: detect_files(p, s, alone)[0])}
    try:
        for name, fn in arms.items():  # warm-up: load models, start and fill the pool; ours
            fn(paths if name.startswith("ours") else paths[:2])  # on all, so MTCNN loads too
        times: dict[str, list[float]] = {k: [] for k in arms}
        boxes: dict[str, np.ndarray] = {}
        names = list(arms)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                boxes[name] = arms[name](paths)
                times[name].append(time.perf_counter() - t)
    finally:
        pool.close()
    return {"seconds": {k: statistics.median(v) for k, v in times.items()}, "boxes": boxes}


def crop_figures(data: Path, s: F.FaceSettings, threads: int) -> tuple[pd.DataFrame, dict]:
    """Build the cache as a search does and measure its crops against the true boxes."""
    root = Path(tempfile.mkdtemp(prefix="bench_faces_cache-"))
    t = time.perf_counter()
    cache = build_cache(data, (32, 24), s, cache_root=root, workers=threads, progress=False)
    build_s = time.perf_counter() - t
    truth = pd.read_csv(data / "true_boxes.csv")
    shares = crop_shares(cache.index, truth)
    m = cache.index.merge(truth, on="file", suffixes=("", "_t"))
    cols = list(F.BOX_COLUMNS)
    tb = m[[f"{c}_t" for c in cols]].to_numpy(float)
    crop = m[cols].to_numpy(float)
    t_area = (tb[:, 2] - tb[:, 0]) * (tb[:, 3] - tb[:, 1])
    big = ((crop[:, 2] - crop[:, 0]) * (crop[:, 3] - crop[:, 1]) / t_area > BIG).mean()
    found = m.assign(found=m["box_source"].isin(F.FOUND_SOURCES))
    found = found.groupby(["split", "mask"])["found"].mean()
    det = F.load_detections(root / f"boxes-{s.detection_key()}.csv").set_index("file")
    det = det.loc[m["file"]].reset_index()
    train = (m["split"] == "train").to_numpy()
    missed = train & ~F.found_faces(det, s)
    person = F.resolve_boxes(det, s, [p if t else None for p, t in zip(m["person"], train,
                                                                         strict=True)])
    holds = lambda b: containment(b[cols].to_numpy(float)[missed], tb[missed]) >= HOLDS  # noqa
    alt = {"missed": int(missed.sum()), "eval_rule": float(holds(m).mean()) if missed.any()
           else float("nan"), "person_rule": float(holds(person).mean()) if missed.any()
           else float("nan")}
    return shares, {"big": float(big), "found": found, "build_s": build_s, "person": alt,
                    "n": len(m)}


#: name -> FaceSettings changes from the default; the default's row is "yunet+mtcnn 1/2".
ARRANGEMENTS: dict[str, dict] = {
    "mtcnn 1/2": {"detectors": ("mtcnn",)},
    "yunet 1/2 no retry": {"detectors": ("yunet",), "yunet_retry": 0},
    "yunet 1/2": {"detectors": ("yunet",)},
    "yunet+mtcnn 1/2 no retry": {"yunet_retry": 0},
    "yunet+mtcnn 1/2": {},
    "mtcnn+yunet 1/2": {"detectors": ("mtcnn", "yunet")},
    "yunet 1/1 no retry": {"detectors": ("yunet",), "yunet_retry": 0, "reduce": 1},
    "yunet+mtcnn 1/1": {"reduce": 1},
}


def arrangements(data: Path, repeats: int) -> None:
    """Print CPU ms/image, found share and crop_ok per arrangement (see ``ARRANGEMENTS``):
    every image through ``detect_files`` in this process with one thread per library, runs
    interleaved, the median CPU time of ``repeats``; crops resolved by the eval rule."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    truth = pd.read_csv(data / "true_boxes.csv")
    paths = [str(data / f) for f in truth["file"]]
    split = truth["file"].str.split("/").str[0]
    arms = {k: F.FaceSettings(**v) for k, v in ARRANGEMENTS.items()}
    cpu: dict[str, list[float]] = {k: [] for k in arms}
    tables: dict[str, pd.DataFrame] = {}
    with Runner(1) as runner:
        for s in {a.detectors: a for a in arms.values()}.values():  # load every model
            detect_files(paths[:8], s, runner)
        for r in range(repeats):
            names = list(arms)[r % len(arms):] + list(arms)[:r % len(arms)]
            for name in names:
                t = time.process_time()
                det, hw, _ = detect_files(paths, arms[name], runner)
                cpu[name].append((time.process_time() - t) / len(paths) * 1e3)
                table = pd.DataFrame({"width": hw[:, 1], "height": hw[:, 0]})
                table[[*F.BOX_COLUMNS, "prob"]] = det[:, :5]
                table["pass"] = det[:, 5].astype(np.int64)
                tables[name] = table
    print(f"{len(paths)} photos from {data}; one process, CPU ms per image (median of {repeats}"
          f"); found and crop_ok: lowest over the splits per mask state (worn/incorrect/none)")
    for name, s in arms.items():
        table = tables[name]
        crops = F.resolve_boxes(table, s).assign(file=truth["file"], split=split)
        shares = crop_shares(crops, truth)
        ok = shares[shares["box_source"] == "all"].groupby("mask")["share"].min()
        found = pd.Series(F.found_faces(table, s)).groupby([split, truth["mask"]]).mean()
        found = found.groupby(level=1).min()
        cells = lambda v: "/".join(f"{v[m]:.3f}" for m in MASK_NAMES)  # noqa: E731
        print(f"  {name:26s} {statistics.median(cpu[name]):5.1f} ms  found {cells(found)}  "
              f"crop_ok {cells(ok)}")


def print_crops(shares: pd.DataFrame, fig: dict) -> float:
    """Print found-rate and crop accuracy by split x mask x box_source; the lowest "all" share."""
    print(f"\ncrops of all {fig['n']} images (cache build {fig['build_s']:.0f} s), share holding "
          f">= {HOLDS:.0%} of the true face, by box_source (images):")
    for (split, mask), g in shares.groupby(["split", "mask"], sort=False):
        cells = "  ".join(f"{r.box_source} {r.share:.3f} ({r.images})" for r in g.itertuples())
        print(f"  {split:5s} {MASK_NAMES[mask]:9s} found {fig['found'][(split, mask)]:.3f}"
              f"  | {cells}")
    print(f"crops more than {BIG:g}x the true face's area: {fig['big']:.3f} (goal <= 0.05)")
    p = fig["person"]
    print(f"training images no detector found a face in: {p['missed']}; holding the face by "
          f"the eval rule "
          f"(used) {p['eval_rule']:.2f}, by their person's boxes (not used) {p['person_rule']:.2f}")
    return float(shares.loc[shares["box_source"] == "all", "share"].min())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faces",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=Path, default=default_faces_dir())
    ap.add_argument("--data", type=Path, default=None, help="a set with true_boxes.csv "
                    "(core.synth --faces; default: built from --faces under runs/)")
    ap.add_argument("--people", type=int, default=100)
    ap.add_argument("--eval-people", type=int, default=50)
    ap.add_argument("--images", type=int, default=200, help="photos in the speed race")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--arrangements", action="store_true",
                    help="compare detector arrangements and decode scales instead")
    args = ap.parse_args(argv)
    data = args.data or ensure_data(args.faces, args.people, args.eval_people)
    if args.arrangements:
        arrangements(data, args.repeats)
        return 0
    s = F.FaceSettings()
    truth = pd.read_csv(data / "true_boxes.csv")
    pick = np.sort(np.random.default_rng(0).permutation(len(truth))[:args.images])
    paths = [str(data / f) for f in truth["file"].iloc[pick]]
    true_boxes = truth[list(F.BOX_COLUMNS)].iloc[pick].to_numpy(np.float64)
    res = race(paths, s, args.threads, args.repeats)
    sec, boxes = res["seconds"], res["boxes"]
    n = len(paths)
    print(f"{n} photos 384x512 from {data}, {args.threads} threads per arm, median of "
          f"{args.repeats} interleaved runs; smallest face {s.min_face_size} px, MTCNN "
          f"thresholds {s.thresholds}; ours: {' then '.join(s.detectors)} on 1/{s.reduce} "
          f"decodes, YuNet score >= {s.yunet_score} (again {s.yunet_retry:g}x enlarged on its "
          f"misses)")
    ious = {}
    for name, label in (("usual", f"usual: full decode, MTCNN per image, {args.threads} thr"),
                        ("usual_1thread", "usual, 1 torch thread"),
                        ("ours_1proc", "ours, one process"),
                        ("ours", f"ours, {args.threads} processes x 1 thread")):
        found = ~np.isnan(boxes[name][:, 4])
        ious[name] = iou(boxes[name][found, :4], true_boxes[found])
        print(f"  {label:42s} {n / sec[name]:7.1f} images/s  faces found {found.sum()}/{n}"
              f"  IoU with the true boxes mean {ious[name].mean():.3f} (median "
              f"{np.median(ious[name]):.3f})")
    best_usual = min(sec["usual"], sec["usual_1thread"])
    speedup = best_usual / sec["ours"]
    print(f"speedup {speedup:.1f}x against the faster usual arm ({sec['usual'] / sec['ours']:.1f}x"
          f" at {args.threads} threads; one process {best_usual / sec['ours_1proc']:.1f}x; goal "
          f">= 5x)")
    shares, fig = crop_figures(data, s, args.threads)
    ok_min = print_crops(shares, fig)
    print("faces found by mask state (lowest of the splits): " + ", ".join(
        f"{MASK_NAMES[k]} {v:.3f}" for k, v in fig["found"].groupby(level="mask").min().items())
        + " (goal >= 0.97 each)")
    print(f"faces speedup={speedup:.1f}x iou={ious['ours'].mean():.3f} "
          f"masked_found={fig['found'].min():.3f} crop_ok_min={ok_min:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
