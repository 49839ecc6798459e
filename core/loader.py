"""Cached images -> batches: views on the cache, the Dataset, seeding, and the DataLoader.

Why a view and not a copy: a fold's rows of the memory-mapped cache would be gigabytes of RAM
per worker on the real set; ``RowView`` reads one image when it is asked for. Workers default
by device (``default_loader_workers``): on a GPU augmentation must run beside the model.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler, get_worker_info

from core.config import SAMPLERS, ConfigError, TrainConfig
from core.labels import NUM_CLASSES
from core.losses import class_weights


class RowView:
    """Rows ``rows`` of ``images`` (N, h, w, 3), read one at a time: an index without a copy.

    ``memmap[rows]`` would load every selected image into RAM (gigabytes per fold on the real
    set, per worker); this reads ``images[rows[i]]`` only when item ``i`` is asked for. Enough
    of the array interface (``len``, ``shape``, ``ndim``, ``dtype``, int/slice/mask indexing) for
    ``ImageArrayDataset``, ``fit_fold`` and ``predict``.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray | Sequence[int]):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"rows must be 1-D, got shape {rows.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError(f"rows out of range for {len(images)} images "
                             f"({rows.min()}..{rows.max()})")
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | slice | np.ndarray) -> np.ndarray | RowView:
        """One image for an int; a narrower view for a slice, a boolean mask or row numbers."""
        if isinstance(i, (slice, np.ndarray)):
            return RowView(self.images, self.rows[i])
        return self.images[int(self.rows[i])]

    def join(self, other: RowView) -> RowView:
        """These rows, then ``other``'s: one view, still nothing copied. Both must view the same
        array (a study's training and eval images share one cache)."""
        if other.images is not self.images:
            raise ValueError("only views on the same image array can be joined")
        return RowView(self.images, np.concatenate([self.rows, other.rows]))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.images.shape[1:])

    @property
    def ndim(self) -> int:
        return self.images.ndim

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype


#: What the engine takes as images: a uint8 (N, h, w, 3) array (a memmap is fine) or a RowView.
Images = np.ndarray | RowView


class ImageArrayDataset(Dataset):
    """uint8 images (N, h, w, 3) (an array, memmap or ``RowView``) + labels -> (tensor, label)."""

    def __init__(self, images: Images, labels: np.ndarray | None, transform: Callable):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, h, w, 3); got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.transform(image=np.asarray(self.images[i]))["image"]
        return x, (-1 if self.labels is None else int(self.labels[i]))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random: model init and anything else drawing from global state."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own seed, derived from the loader's seeded generator.

    Albumentations keeps its own random state (global seeds do not reach it), and every worker
    starts from a copy of the same Compose, so without this all workers would augment alike.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    reseed = getattr(getattr(info.dataset, "transform", None), "set_random_seed", None)
    if reseed is not None:
        reseed(seed)


#: Most DataLoader workers chosen by default: beyond this, more processes only add memory.
MAX_AUTO_LOADER_WORKERS = 12


def default_loader_workers(device: str, processes: int = 1) -> int:
    """DataLoader workers when none are asked for (``--loader-workers``).

    On CUDA, augmentation and collation must run beside the GPU, not between its steps: each of
    ``processes`` training processes gets (its share of the cores) - 1, at most
    ``MAX_AUTO_LOADER_WORKERS``. On the CPU the model and the loader share the same cores and
    loading is a small part of a step (augmenting one 384x288 image costs about 5 ms against
    about 1 s for its training step with resnet18), so workers cannot pay for themselves: 0.
    ``python -m bench.train --preset mask`` compares 0, 1 and 2 side by side.
    """
    if not device.startswith("cuda"):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(MAX_AUTO_LOADER_WORKERS, (cores or 1) // max(1, processes) - 1))


def sample_weights(labels: np.ndarray, scheme: str) -> torch.Tensor:
    """Per-image draw weights (N,) float64: the image's class weight under ``scheme``.

    The formulas are the loss's class weights (``core.losses.class_weights``), one source for
    both: "inverse" draws every present class equally often on average, "sqrt_inverse" draws a
    class of n_c images in proportion to sqrt(n_c). The sampler normalizes, so the scale of the
    weights does not matter.
    """
    if scheme not in SAMPLERS or scheme == "none":
        raise ConfigError(f"config field 'sampler': a weighted sampler is one of "
                          f"{', '.join(SAMPLERS[1:])} (got {scheme!r})")
    t = np.asarray(labels, dtype=np.int64)
    return class_weights(t, scheme, num_classes=NUM_CLASSES).double()[torch.from_numpy(t)]


def create_loader(
    images: Images,
    labels: np.ndarray | None,
    transform: Callable,
    batch_size: int,
    cfg: TrainConfig,
    train: bool,
    device: str,
) -> DataLoader:
    """A DataLoader over uint8 arrays; shuffled, seeded and dropping a ragged tail when training.

    With ``cfg.sampler`` other than "none", training batches are drawn with replacement by a
    ``WeightedRandomSampler`` (``len(images)`` draws per epoch) over ``labels``' class counts,
    so rare classes come up more often. It draws from a generator seeded with ``cfg.seed``, in
    the main process, so the draws repeat exactly and do not depend on ``num_workers``.
    """
    workers = int(cfg.num_workers)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    sampler = None
    if train and cfg.sampler != "none":
        if labels is None:
            raise ValueError("a weighted sampler needs the training labels")
        # Its own generator: the loader's also seeds workers, once per epoch without persistent
        # workers and once per run with them, so sharing it would tie the draws to num_workers.
        sampler = WeightedRandomSampler(sample_weights(labels, cfg.sampler), len(images),
                                        replacement=True,
                                        generator=torch.Generator().manual_seed(int(cfg.seed)))
    return DataLoader(
        ImageArrayDataset(images, labels, transform),
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        # BatchNorm cannot train on a batch of one; a ragged tail also skews the per-step loss.
        drop_last=train and len(images) > batch_size,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
    )
