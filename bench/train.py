"""Training images/s end to end vs the model alone, measured side by side in one run.

- limit: the same model, loss, optimizer and step (``core.engine.train_step``) on one random
  batch already on the device: what the hardware can do with no input pipeline at all;
- ours: the engine's own loader (``core.engine.make_loader``: rows of the memory-mapped cache ->
  ``train_transform`` -> batches, ``--workers`` processes, pinned memory on CUDA) -> the step;
- naive: every image re-read from its 384x512 file (PIL decode, face crop, resize), the same
  augmentation and the same step (``bench.loader.NaiveImages``).

Each figure is the median images/s over ``--windows`` timed windows of ``--steps`` steps (one
warm-up window first, not counted). Ratios are to the limit; goal: ours >= 0.9.

    python -m bench.train                                   # CPU, resnet18 at 128x96
    python -m bench.train --device cuda --size 224 224 --batch 256 --workers 14 \\
        --channels-last --amp --people 300                  # a GPU
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loader import NaiveImages
from core.augment import train_transform
from core.cache import build_cache
from core.config import TrainConfig
from core.engine import (
    make_loader,
    make_optimizer,
    make_scheduler,
    memory_format_for,
    seed_everything,
    seed_worker,
    train_step,
)
from core.losses import build_loss
from core.models import create_model
from core.synth import generate


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(cfg: TrainConfig, batches: Iterator, windows: int, steps: int) -> float:
    """Median images/s of ``windows`` windows of ``steps`` training steps on ``batches``."""
    device = cfg.resolved_device()
    seed_everything(cfg.seed)
    model = create_model(cfg).to(device, memory_format=memory_format_for(device, cfg)).train()
    targets = np.arange(cfg.batch_size) % 18
    criterion = build_loss(cfg, targets).to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch=(windows + 1) * steps)
    rates = []
    for w in range(windows + 1):  # window 0 warms up (workers start, kernels pick algorithms)
        _sync(device)
        t, n = time.perf_counter(), 0
        for _ in range(steps):
            x, y = next(batches)
            train_step(model, criterion, optimizer, scheduler, x, y, cfg, device)
            n += len(x)
        _sync(device)
        if w:
            rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def forever(loader: DataLoader) -> Iterator:
    """Batches across epochs without end (persistent workers keep running)."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--channels-last", action="store_true", help="CUDA only")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, CUDA only")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in process)")
    ap.add_argument("--people", type=int, default=10, help="synthetic people, 7 images each")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed window")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--aug-strength", type=float, default=TrainConfig().aug_strength)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(backbone=args.backbone, image_size=tuple(args.size), batch_size=args.batch,
                      device=args.device, amp=args.amp, channels_last=args.channels_last,
                      num_workers=args.workers, aug_strength=args.aug_strength).validate()
    device = cfg.resolved_device()
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", people=args.people, eval_people=1, seed=0,
                        size=(512, 384), progress=False)
        t = time.perf_counter()
        cache = build_cache(data, cfg.image_size, cache_root=Path(tmp) / "cache",
                            workers=max(args.workers, 1), progress=False)
        build_s = time.perf_counter() - t
        n = len(cache)
        labels = np.arange(n) % 18
        pinned = device.startswith("cuda")

        # The limit's batch already sits on the device: the model alone, no input pipeline.
        x = torch.randn(cfg.batch_size, 3, *cfg.image_size, device=device)
        y = torch.randint(0, 18, (cfg.batch_size,), device=device)
        limit = timed(cfg, itertools.repeat((x, y)), args.windows, args.steps)

        ours_loader = make_loader(cache.images, labels, train_transform(cfg), cfg.batch_size, cfg,
                                  train=True, device=device)
        ours = timed(cfg, forever(ours_loader), args.windows, args.steps)
        del ours_loader

        naive = float("nan")
        if not args.skip_naive:
            ds = NaiveImages(data, cache, train_transform(cfg), cfg.image_size)
            naive_loader = DataLoader(
                _Labelled(ds, labels), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                num_workers=args.workers, pin_memory=pinned,
                persistent_workers=args.workers > 0,
                worker_init_fn=seed_worker if args.workers > 0 else None)
            naive = timed(cfg, forever(naive_loader), args.windows, args.steps)

    h, w = cfg.image_size
    print(f"{args.backbone} at {h}x{w}, batch {cfg.batch_size}, device {device}, "
          f"amp {cfg.amp and pinned}, channels_last {cfg.channels_last and pinned}, "
          f"{args.workers} workers, {args.threads} torch threads, aug_strength "
          f"{cfg.aug_strength}, {n} cached images; median of {args.windows} windows x "
          f"{args.steps} steps")
    print(f"one-time cache build (faces + crop)   : {build_s:8.1f} s")
    print(f"limit (random batch on the device)    : {limit:8.1f} images/s")
    print(f"ours  (cache -> aug -> model -> step) : {ours:8.1f} images/s  "
          f"ratio {ours / limit:5.2f}  (goal >= 0.9)")
    print(f"naive (decode 384x512 -> ... -> step) : {naive:8.1f} images/s  "
          f"ratio {naive / limit:5.2f}")


class _Labelled(torch.utils.data.Dataset):
    """(image, label) pairs from an image-only dataset, like the engine's loader yields."""

    def __init__(self, images: torch.utils.data.Dataset, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


if __name__ == "__main__":
    main()
