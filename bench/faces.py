"""Face detection: the usual per-image full-resolution MTCNN vs ours (batched, downscaled copies).

Both run on the same ~40 images: the package-shipped photos (skimage astronaut, matplotlib
grace_hopper) pasted at random places and scales on 384x512 canvases. Prints images/s of each,
the speed ratio (goal >= 5x) and the mean IoU of our boxes against the full-resolution ones
(goal >= 0.9). Medians over ``--repeats`` runs.

    python -m bench.faces [--images 40 --repeats 3 --detect-size 160]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.faces import FaceSettings, get_detector
from tests.test_faces import astronaut, grace_hopper, iou, paste


def scenes(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` 384x512 canvases, alternating the two photos, random scale and place."""
    rng = np.random.default_rng(seed)
    photos = [(astronaut(), (0.8, 1.4)), (grace_hopper(), (0.45, 0.75))]
    out = []
    for i in range(n):
        (photo, face), (lo, hi) = photos[i % 2]
        s = rng.uniform(lo, hi)
        # anywhere the face stays on the canvas (the photo itself may run off the edge)
        x = int(rng.integers(0, max(1, 384 - int(face[2] * s))))
        y = int(rng.integers(0, max(1, 512 - int(face[3] * s))))
        out.append(paste(photo, face, s, (x, y))[0])
    return out


def full_resolution(images: list[np.ndarray], device: str) -> np.ndarray:
    """The usual way: one MTCNN call per full-size image, the most probable face."""
    mtcnn = _usual(device)
    out = np.full((len(images), 5), np.nan)
    for i, img in enumerate(images):
        boxes, probs = mtcnn.detect(img)
        if boxes is not None:
            k = int(np.argmax(probs))
            out[i] = (*boxes[k], probs[k])
    return out


_USUAL = {}


def _usual(device: str):
    from facenet_pytorch import MTCNN

    if device not in _USUAL:
        _USUAL[device] = MTCNN(keep_all=True, post_process=False, select_largest=False,
                               device=device)
    return _USUAL[device]


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detect-size", type=int, default=FaceSettings().detect_size)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    images = scenes(args.images)
    settings = FaceSettings(detect_size=args.detect_size, device=args.device)
    ours = get_detector(settings)
    ours.detect(images[:2])  # warm-up both (first calls allocate)
    full_resolution(images[:2], args.device)
    t_full, full = timed(lambda: full_resolution(images, args.device), args.repeats)
    t_ours, mine = timed(lambda: ours.detect(images), args.repeats)
    n = len(images)
    both = ~np.isnan(full[:, 4]) & ~np.isnan(mine[:, 4])
    ious = [iou(a[:4], b[:4]) for a, b in zip(mine[both], full[both], strict=True)]
    print(f"{n} images 384x512, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} runs")
    print(f"full-resolution MTCNN, per image : {n / t_full:8.1f} images/s "
          f"(faces found {int((~np.isnan(full[:, 4])).sum())}/{n})")
    print(f"ours, batched at {args.detect_size:4d} px       : {n / t_ours:8.1f} images/s "
          f"(faces found {int((~np.isnan(mine[:, 4])).sum())}/{n})")
    print(f"speed ratio                      : {t_full / t_ours:8.1f}x   (goal >= 5x)")
    print(f"mean IoU ours vs full resolution : {np.mean(ious):8.3f}    (goal >= 0.9; "
          f"min {np.min(ious):.3f}, {len(ious)} images found by both)")


if __name__ == "__main__":
    main()
