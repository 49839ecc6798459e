"""Face-pass images/s on one device: MTCNN alone against our default pass, side by side.

``bench.faces`` races the detectors on the CPU against real faces; a GPU box has no real faces
with it (they live in ``../shared``, outside the checkout), so this one times the detection pass
a cache build runs (``core.face_pass.detect_files``: 1/``reduce`` decode, then the detectors)
on synthetic photos at the competition's 384x512, on ``--device``:

- ``mtcnn``: MTCNN alone (``FaceSettings(detectors=("mtcnn",))``) on the device;
- ``default``: the default ``FaceSettings`` (YuNet on the CPU, MTCNN on the device for the
  images YuNet missed).

Both arms read the same files from disk, after one untimed warm-up run each (model loading and
CUDA start-up are not the pass's speed); repeats are interleaved in a rotating order and each
figure is the median images/s. ``found`` is the share of photos where a face was found: drawn
faces are not real ones, so it says the arms agree on what they see, not how good they are.

    python -m bench.face_speed --device cuda          # the GPU check's face figures
    python -m bench.face_speed --people 4 --repeats 1 # a CPU smoke run

Last line: ``face_speed device=D mtcnn=N default=N images/s found_mtcnn=F found_default=F``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cache import source_listing
from core.face_pass import detect_files
from core.faces import FaceSettings
from core.pool import Runner

#: The arms: their name and the detectors each runs, in order.
ARMS: dict[str, tuple[str, ...]] = {"mtcnn": ("mtcnn",), "default": FaceSettings().detectors}


def photo_paths(data: Path) -> list[str]:
    """Every photo of a data set in the competition layout, as a cache build lists them."""
    return [str(data / f) for f in source_listing(data)["file"]]


def time_arms(paths: list[str], device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median images/s and found share per arm, arms interleaved in a rotating order."""
    settings = {name: dataclasses.replace(FaceSettings(), detectors=dets, device=device)
                for name, dets in ARMS.items()}
    speeds: dict[str, list[float]] = {name: [] for name in ARMS}
    found: dict[str, float] = {}
    with Runner(1) as runner:
        for s in settings.values():  # warm-up: models load, CUDA starts
            detect_files(paths[: s.batch_size], s, runner)
        for r in range(repeats):
            names = list(ARMS)
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                det, _, _ = detect_files(paths, settings[name], runner)
                speeds[name].append(len(paths) / (time.perf_counter() - start))
                found[name] = float(np.mean(~np.isnan(det[:, 0])))
    return {name: {"images_per_s": statistics.median(v), "found": found[name]}
            for name, v in speeds.items()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.face_speed",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="a data set in the competition layout (default: a synthetic one, "
                         "made in a temporary folder)")
    ap.add_argument("--people", type=int, default=40, help="synthetic people (7 photos each)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="face_speed-") as tmp:
        data = args.data
        if data is None:
            from core.synth import generate

            data = generate(Path(tmp) / "data", people=args.people, eval_people=1)
        paths = photo_paths(data)
        if not paths:
            print(f"{data}: no photos under train/images or eval/images", file=sys.stderr)
            return 2
        result = time_arms(paths, args.device, args.repeats)
    for name, r in result.items():
        print(f"{name:8s} {r['images_per_s']:8.1f} images/s  found {r['found']:.3f}  "
              f"({len(paths)} photos, median of {args.repeats})")
    m, d = result["mtcnn"], result["default"]
    print(f"face_speed device={args.device} mtcnn={m['images_per_s']:.1f} "
          f"default={d['images_per_s']:.1f} images/s found_mtcnn={m['found']:.3f} "
          f"found_default={d['found']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
