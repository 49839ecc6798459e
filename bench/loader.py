"""Training input alone (no model): our cache + augmentation vs the naive loader vs the limit.

Naive: every epoch, PIL opens and decodes each 384x512 file, crops the face box, resizes.
Ours: rows of the memory-mapped cache (decoded, cropped and resized once). Both then run the
same ``core.augment.train_transform`` through a torch DataLoader with the same output size,
batch size and worker count. Limit: the same cache rows through the same DataLoader with no
augmentation at all (only the tensor conversion): what input costs when augmentation is free.
Arms are interleaved in a rotating order, each figure the median of ``--repeats`` runs. Goal:
ours >= 5x the naive images/s. The one-time cache build is printed separately (it is paid once
per data set and crop settings, not per epoch or trial).

    python -m bench.loader [--people 40 --epochs 2 --workers 2 --repeats 3]

Last line: ``loader ours/naive=X.Xx ours/limit=0.XX``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from core.augment import train_transform
from core.cache import ImageCache, build_cache
from core.config import TrainConfig
from core.synth import generate


class CachedImages(Dataset):
    """Rows of the cache through the training transform."""

    def __init__(self, cache: ImageCache, transform):
        self.images, self.transform = cache.images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(image=np.asarray(self.images[i]))["image"]


class NaiveImages(Dataset):
    """Open, decode, crop and resize the source file on every access, then the same transform."""

    def __init__(self, data: Path, cache: ImageCache, transform, size: tuple[int, int]):
        self.files = [data / f for f in cache.index["file"]]
        self.boxes = cache.index[["x1", "y1", "x2", "y2"]].to_numpy().tolist()
        self.transform, self.size = transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as im:
            face = im.convert("RGB").crop(self.boxes[i]).resize(
                (self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        return self.transform(image=np.asarray(face))["image"]


def to_tensor(image: np.ndarray) -> dict[str, torch.Tensor]:
    """The limit arm's transform: no augmentation, the layout change every transform ends with."""
    return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)}


def images_per_s(ds: Dataset, batch_size: int, workers: int, epochs: int) -> float:
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    next(iter(loader))  # start the workers outside the timing
    t, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x in loader:
            n += len(x)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=40, help="7 images each, 384x512")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=args.workers)
    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {"naive": [], "ours": [], "limit": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", people=args.people, eval_people=1, seed=0,
                        size=(512, 384), progress=False)
        t = time.perf_counter()
        cache = build_cache(data, cfg.image_size, cache_root=Path(tmp) / "cache",
                            workers=args.workers, progress=False)
        build_s = time.perf_counter() - t
        tf = train_transform(cfg)
        arms = {"naive": NaiveImages(data, cache, tf, cfg.image_size),
                "ours": CachedImages(cache, tf), "limit": CachedImages(cache, to_tensor)}
        names = list(arms)
        for r in range(args.repeats):  # rotating order: a machine getting busier hits all alike
            for name in names[r % 3:] + names[:r % 3]:
                rates[name].append(images_per_s(arms[name], cfg.batch_size, args.workers,
                                                args.epochs))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{len(cache)} images 384x512 -> {cfg.image_size[0]}x{cfg.image_size[1]}, batch "
          f"{cfg.batch_size}, {args.workers} workers, {args.epochs} epochs, "
          f"aug_strength {cfg.aug_strength}, median of {args.repeats} interleaved runs")
    print(f"one-time cache build (faces + crop): {build_s:6.1f} s")
    print(f"naive (PIL decode+crop+resize+aug) : {med['naive']:8.1f} images/s")
    print(f"ours  (cache + aug)                : {med['ours']:8.1f} images/s")
    print(f"limit (cache, no augmentation)     : {med['limit']:8.1f} images/s")
    print(f"loader ours/naive={med['ours'] / med['naive']:.1f}x "
          f"ours/limit={med['ours'] / med['limit']:.2f}", flush=True)


if __name__ == "__main__":
    main()
