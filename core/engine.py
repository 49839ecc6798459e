"""Fit one fold and predict: the loop every trial runs, on a GPU for users and on the CPU in tests.

Why it looks like this:
- Validation is scored against the TRUE labels the caller passes (``val_labels``), never the
  relabeled training targets, and over the whole fold at once (macro F1 is not additive).
- Augmentation lives only in the training Dataset; validation and ``predict`` use
  ``eval_transform``, so a trial can never score itself on augmented images.
- Everything random is seeded from ``cfg.seed`` (torch, numpy, random, the Albumentations
  Compose, DataLoader shuffling and workers, CutMix/MixUp), so a run repeats exactly on the CPU.
- A search tries absurd settings: a non-finite loss ends the fold with ``diverged=True``
  instead of an exception, and the objective prunes the trial.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm.auto import tqdm

from core.augment import eval_transform, mix_batch, train_transform
from core.config import OPTIMIZERS, ConfigError, TrainConfig
from core.labels import NUM_CLASSES
from core.losses import build_loss
from core.metrics import macro_f1  # also re-exported as core.engine.macro_f1
from core.models import create_model, to_probabilities

#: How often (in steps) the loop syncs with the device to check the loss and update the bar.
#: Checking every step would stall the GPU pipeline; every few steps catches a NaN early enough.
SYNC_EVERY = 10


@dataclass
class FoldResult:
    """What one fold leaves behind.

    ``state_dict`` and ``val_probs`` are the SELECTED epoch's (``cfg.select_epoch``): the last
    finished epoch ("last", the default, honest: nothing is chosen on the validation labels),
    or the epoch with the best validation macro F1 ("best", optimistic: picked on the labels
    it is then scored on). ``selected_epoch``/``selected_f1`` say which epoch that was and its
    validation macro F1; ``best_epoch``/``best_f1`` are information only. A fold stopped early
    (pruning) or diverged selects among the epochs it finished.

    When the run diverges before its first validation, ``best_epoch`` and ``selected_epoch``
    are -1, the F1s 0.0, ``val_probs`` uniform and ``state_dict`` empty: no model worth keeping.
    """

    best_f1: float
    best_epoch: int
    history: list[dict[str, Any]]
    val_probs: np.ndarray
    state_dict: dict[str, torch.Tensor]
    selected_epoch: int
    selected_f1: float
    stopped_early: bool = False  # on_epoch asked to stop (pruning)
    diverged: bool = False  # non-finite loss or predictions; the fold was abandoned


class RowView:
    """Rows ``rows`` of ``images`` (N, h, w, 3), read one at a time: an index without a copy.

    ``memmap[rows]`` would load every selected image into RAM (gigabytes per fold on the real
    set, per worker); this reads ``images[rows[i]]`` only when item ``i`` is asked for. Enough
    of the array interface (``len``, ``shape``, ``ndim``, ``dtype``, int/slice indexing) for
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

    def __getitem__(self, i: int | slice) -> np.ndarray | RowView:
        if isinstance(i, slice):
            return RowView(self.images, self.rows[i])
        return self.images[int(self.rows[i])]

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


def make_loader(
    images: Images,
    labels: np.ndarray | None,
    transform: Callable,
    batch_size: int,
    cfg: TrainConfig,
    train: bool,
    device: str,
) -> DataLoader:
    """A DataLoader over uint8 arrays; shuffled, seeded and dropping a ragged tail when training."""
    workers = int(cfg.num_workers)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    return DataLoader(
        ImageArrayDataset(images, labels, transform),
        batch_size=batch_size,
        shuffle=train,
        # BatchNorm cannot train on a batch of one; a ragged tail also skews the per-step loss.
        drop_last=train and len(images) > batch_size,
        num_workers=workers,
        pin_memory=device.startswith("cuda"),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=seed_worker if workers > 0 else None,
        generator=generator,
    )


def make_optimizer(cfg: TrainConfig, model: nn.Module | Iterable) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (Nesterov momentum when momentum > 0) from timm's optimizer factory.

    Given the model, timm keeps weight decay off biases, norm layers and other 1-D parameters:
    decaying a BatchNorm scale towards 0 (the mask space goes up to 0.1) only hurts. Given bare
    parameters, every one is decayed.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"config field 'optimizer': must be {', '.join(OPTIMIZERS)} "
                          f"(got {cfg.optimizer!r})")
    name = cfg.optimizer if cfg.optimizer != "sgd" else "sgd" if cfg.momentum > 0 else "momentum"
    return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule: linear warmup over ``cfg.warmup_epochs`` (may be fractional), then
    cosine to 0 / step decay every ``cfg.step_every`` epochs / constant; or one-cycle, whose own
    rising phase is the warmup (``warmup_epochs / epochs`` of the run, 0.3 when unset)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=min(max(pct, 1e-3), 0.999),
            cycle_momentum=False,  # keep the configured momentum/betas: one knob at a time
        )

    def after_warmup(step: int) -> float:
        if cfg.scheduler == "cosine":
            t = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        if cfg.scheduler == "step":
            return cfg.step_gamma ** (step // (cfg.step_every * steps_per_epoch))
        return 1.0  # "none"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return after_warmup(step)

    if cfg.scheduler not in ("cosine", "step", "none"):
        raise ConfigError(f"config field 'scheduler': unknown {cfg.scheduler!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: str, cfg: TrainConfig):
    """bf16 autocast on CUDA when ``cfg.amp``; a no-op context on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16,
                          enabled=bool(cfg.amp) and device.startswith("cuda"))


def memory_format_for(device: str, cfg: TrainConfig) -> torch.memory_format:
    """channels_last on CUDA when ``cfg.channels_last`` (faster convolutions with AMP)."""
    if cfg.channels_last and device.startswith("cuda"):
        return torch.channels_last
    return torch.contiguous_format


@torch.no_grad()
def _predict_loader(
    model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: str, tta: bool
) -> np.ndarray:
    model.eval()
    fmt = memory_format_for(device, cfg)
    out = []
    for x, _ in loader:
        x = x.to(device, non_blocking=True, memory_format=fmt)
        with _autocast(device, cfg):
            p = to_probabilities(model, model(x))
            if tta:
                p = 0.5 * (p + to_probabilities(model, model(torch.flip(x, dims=[3]))))
        out.append(p.float().cpu())
    if not out:
        return np.zeros((0, NUM_CLASSES), np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def predict(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    cfg: TrainConfig,
    images: Images,
    tta: bool | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """18-way probabilities (N, 18) float32 for uint8 images (N, h, w, 3) at ``cfg.image_size``
    (an array or a ``RowView``).

    Uses the deterministic ``eval_transform``; ``tta`` (default ``cfg.tta``) averages with the
    horizontally flipped image. A state dict is loaded into ``create_model(cfg)``
    built without pretrained weights.
    """
    device = cfg.resolved_device()
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
    else:  # the state dict overwrites every weight: pretrained ones would be fetched for nothing
        model = create_model(dataclasses.replace(cfg, pretrained=False))
        model.load_state_dict(model_or_state_dict)
    model = model.to(device, memory_format=memory_format_for(device, cfg))
    _check_size(images, cfg, "images")
    loader = make_loader(images, None, eval_transform(cfg), batch_size or cfg.batch_size, cfg,
                         train=False, device=device)
    return _predict_loader(model, loader, cfg, device, cfg.tta if tta is None else tta)


def _check_size(images: Images, cfg: TrainConfig, name: str) -> None:
    """One preprocessing path: arrays must already be at the config's (height, width)."""
    if tuple(images.shape[1:3]) != tuple(cfg.image_size):
        raise ConfigError(f"config field 'image_size': {name} are {tuple(images.shape[1:3])} "
                          f"(h, w) but the config says {tuple(cfg.image_size)}; build the cache "
                          f"at the config's size")


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    device: str,
    mix_rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """One optimizer step on a CPU batch; returns the loss as a detached device scalar.

    Shared by ``fit_fold`` and ``bench/train.py`` so the benchmark times the real step. No
    ``.item()`` here: a host sync every step would stall the GPU pipeline.
    """
    x = x.to(device, non_blocking=True, memory_format=memory_format_for(device, cfg))
    y = y.to(device, non_blocking=True)
    target = y
    if cfg.mix != "none" and cfg.mix_prob > 0:
        x, target = mix_batch(x, y, cfg, mix_rng)
    with _autocast(device, cfg):
        outputs = model(x)
    loss = criterion(outputs.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def fit_fold(
    cfg: TrainConfig,
    train_images: Images,
    train_targets: np.ndarray,
    val_images: Images,
    val_labels: np.ndarray,
    on_epoch: Callable[[int, float], bool] | None = None,
    progress: bool = True,
) -> FoldResult:
    """Train ``cfg.epochs`` epochs on one fold; validate after each against the TRUE labels.

    ``train_targets`` are the (possibly age-relabeled) training classes, ``val_labels`` the true
    classes. ``on_epoch(epoch, val_f1)`` returning True stops the fold now (pruning); the result
    so far comes back with ``stopped_early=True``. The selected epoch's weights (on the CPU) and
    validation probabilities are kept (``cfg.select_epoch``; see ``FoldResult``).
    """
    cfg.validate()
    _check_size(train_images, cfg, "train_images")
    _check_size(val_images, cfg, "val_images")
    train_targets = np.asarray(train_targets, dtype=np.int64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    if len(train_images) == 0 or len(val_images) == 0:
        raise ValueError("fit_fold needs at least one training and one validation image")

    device = cfg.resolved_device()
    seed_everything(cfg.seed)
    model = create_model(cfg).to(device, memory_format=memory_format_for(device, cfg))
    criterion = build_loss(cfg, train_targets).to(device)
    optimizer = make_optimizer(cfg, model)
    train_loader = make_loader(train_images, train_targets, train_transform(cfg), cfg.batch_size,
                               cfg, train=True, device=device)
    val_loader = make_loader(val_images, val_labels, eval_transform(cfg), cfg.batch_size, cfg,
                             train=False, device=device)
    steps = len(train_loader)
    scheduler = make_scheduler(cfg, optimizer, steps)
    mix_rng = np.random.default_rng(cfg.seed)

    history: list[dict[str, Any]] = []
    best_f1, best_epoch = 0.0, -1
    sel_f1, sel_epoch = 0.0, -1
    sel_state: dict[str, torch.Tensor] = {}
    sel_probs = np.full((len(val_images), NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)
    stopped = diverged = False

    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not progress, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            loss_sum += train_step(model, criterion, optimizer, scheduler, x, y, cfg, device,
                                   mix_rng) * len(x)
            seen += len(x)
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
                running = loss_sum.item() / seen
                if not math.isfinite(running):
                    diverged = True
                    break
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        if diverged:
            history.append({"epoch": epoch, "train_loss": float("nan"), "val_f1": float("nan"),
                            "seconds": train_seconds, "images_per_s": seen / train_seconds,
                            "diverged": True})
            break

        probs = _predict_loader(model, val_loader, cfg, device, tta=cfg.tta)
        if not np.isfinite(probs).all():
            diverged = True
            history.append({"epoch": epoch, "train_loss": loss_sum.item() / seen,
                            "val_f1": float("nan"), "seconds": time.perf_counter() - t0,
                            "images_per_s": seen / train_seconds, "diverged": True})
            break
        val_f1 = macro_f1(val_labels, probs)
        history.append({"epoch": epoch, "train_loss": loss_sum.item() / max(seen, 1),
                        "val_f1": val_f1, "seconds": time.perf_counter() - t0,
                        "images_per_s": seen / train_seconds,
                        "lr": scheduler.get_last_lr()[0]})
        if val_f1 > best_f1 or best_epoch < 0:
            best_f1, best_epoch = val_f1, epoch
        # "last" snapshots every finished epoch: a later epoch may diverge and wreck the weights.
        if cfg.select_epoch == "last" or best_epoch == epoch:
            sel_f1, sel_epoch, sel_probs = val_f1, epoch, probs
            sel_state = {k: v.detach().to("cpu", copy=True) for k, v in
                         model.state_dict().items()}
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['train_loss']:.4f} "
                       f"val macro F1 {val_f1:.4f} ({history[-1]['images_per_s']:.0f} img/s)")
        if on_epoch is not None and on_epoch(epoch, val_f1):
            stopped = True
            break

    return FoldResult(best_f1=best_f1, best_epoch=best_epoch, history=history,
                      val_probs=sel_probs, state_dict=sel_state, selected_epoch=sel_epoch,
                      selected_f1=sel_f1, stopped_early=stopped, diverged=diverged)
