"""Fit one fold and predict: the loop every trial runs, on a GPU for users and on the CPU in tests.

Why it looks like this:
- Validation is scored against the TRUE labels the caller passes (``val_labels``), never the
  relabeled training targets, and over the whole fold at once (macro F1 is not additive).
- Augmentation lives only in the training Dataset; validation and ``predict`` use
  ``eval_transform``, so a trial can never score itself on augmented images.
- Everything random is seeded from ``cfg.seed`` (torch, numpy, random, the Albumentations
  Compose, DataLoader shuffling or weighted sampling and workers, CutMix/MixUp/half CutMix),
  so a run repeats exactly on the CPU.
- A search tries absurd settings: a non-finite loss ends the fold with ``diverged=True``
  instead of an exception, and the objective prunes the trial.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from core.augment import Mixer, create_mixup, eval_transform, mix_batch, train_transform
from core.config import ConfigError, TrainConfig
from core.labels import NUM_CLASSES
from core.loader import Images, create_loader, seed_everything
from core.losses import create_loss
from core.metrics import macro_f1  # also re-exported as core.engine.macro_f1
from core.models import create_model, to_probabilities
from core.optim import create_optimizer, create_scheduler

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
    loader = create_loader(images, None, eval_transform(cfg), batch_size or cfg.batch_size, cfg,
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
    mixup: Mixer | None = None,
) -> torch.Tensor:
    """One optimizer step on a CPU batch; returns the loss as a detached device scalar.

    Shared by ``fit_fold`` and ``bench/train.py`` so the benchmark times the real step. No
    ``.item()`` here: a host sync every step would stall the GPU pipeline.
    """
    x = x.to(device, non_blocking=True, memory_format=memory_format_for(device, cfg))
    y = y.to(device, non_blocking=True)
    x, target = mix_batch(x, y, mixup)
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


def _train_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loader: DataLoader, cfg: TrainConfig, device: str,
                 mixup: Mixer | None, desc: str, progress: bool
                 ) -> tuple[float, int, float]:
    """One pass over the training batches: (mean loss, NaN when it diverged; images; seconds).

    The loss is read back from the device every ``SYNC_EVERY`` steps only (a sync per step
    would stall a GPU); a non-finite running loss ends the pass at once."""
    t0 = time.perf_counter()
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen, steps = 0, len(loader)
    with tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True) as bar:
        for step, (x, y) in enumerate(bar):
            loss_sum += train_step(model, criterion, optimizer, scheduler, x, y, cfg, device,
                                   mixup) * len(x)
            seen += len(x)
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
                running = loss_sum.item() / seen
                if not math.isfinite(running):
                    return float("nan"), seen, time.perf_counter() - t0
                bar.set_postfix(loss=f"{running:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    return loss_sum.item() / max(seen, 1), seen, time.perf_counter() - t0


def _fold_inputs(cfg: TrainConfig, train_images: Images, train_targets: np.ndarray,
                 val_images: Images, val_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked inputs of a fold: a valid config, images at its size, int64 targets and labels."""
    cfg.validate()
    _check_size(train_images, cfg, "train_images")
    _check_size(val_images, cfg, "val_images")
    if len(train_images) == 0 or len(val_images) == 0:
        raise ValueError("fit_fold needs at least one training and one validation image")
    return np.asarray(train_targets, dtype=np.int64), np.asarray(val_labels, dtype=np.int64)


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
    train_targets, val_labels = _fold_inputs(cfg, train_images, train_targets, val_images,
                                             val_labels)
    device = cfg.resolved_device()
    seed_everything(cfg.seed)
    model = create_model(cfg).to(device, memory_format=memory_format_for(device, cfg))
    criterion = create_loss(cfg, train_targets).to(device)
    optimizer = create_optimizer(cfg, model)
    train_loader = create_loader(train_images, train_targets, train_transform(cfg), cfg.batch_size,
                               cfg, train=True, device=device)
    val_loader = create_loader(val_images, val_labels, eval_transform(cfg), cfg.batch_size, cfg,
                             train=False, device=device)
    scheduler = create_scheduler(cfg, optimizer, len(train_loader))
    mixup = create_mixup(cfg)

    history: list[dict[str, Any]] = []
    best_f1, best_epoch = 0.0, -1
    sel_f1, sel_epoch = 0.0, -1
    sel_state: dict[str, torch.Tensor] = {}
    sel_probs = np.full((len(val_images), NUM_CLASSES), 1.0 / NUM_CLASSES, np.float32)
    stopped = diverged = False

    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        loss, seen, train_seconds = _train_epoch(
            model, criterion, optimizer, scheduler, train_loader, cfg, device, mixup,
            f"epoch {epoch + 1}/{cfg.epochs}", progress)
        probs = (_predict_loader(model, val_loader, cfg, device, tta=cfg.tta)
                 if math.isfinite(loss) else None)
        diverged = probs is None or not np.isfinite(probs).all()  # a search tries absurd settings
        val_f1 = float("nan") if diverged else macro_f1(val_labels, probs)
        history.append({"epoch": epoch, "train_loss": loss, "val_f1": val_f1,
                        "seconds": time.perf_counter() - t0, "images_per_s": seen / train_seconds,
                        **({"diverged": True} if diverged else
                           {"lr": scheduler.get_last_lr()[0]})})
        if diverged:
            break
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
