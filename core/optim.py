"""The optimizer and the learning-rate schedule of a training run, from its config."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from core.config import TrainConfig


def create_optimizer(cfg: TrainConfig, model: nn.Module | Iterable) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (Nesterov momentum when momentum > 0) from timm's optimizer factory,
    for a validated ``cfg`` (``TrainConfig.validate`` checks the names once).

    Given the model, timm keeps weight decay off biases, norm layers and other 1-D parameters:
    decaying a BatchNorm scale towards 0 (the mask space goes up to 0.1) only hurts. Given bare
    parameters, every one is decayed.
    """
    name = cfg.optimizer if cfg.optimizer != "sgd" else "sgd" if cfg.momentum > 0 else "momentum"
    return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum)


def create_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-iteration schedule from torch's own schedulers: linear warmup over
    ``cfg.warmup_epochs`` (may be fractional), then cosine to 0 / step decay every
    ``cfg.step_every`` epochs / constant; or one-cycle, whose own rising phase is the warmup
    (``warmup_epochs / epochs`` of the run, 0.3 when unset)."""
    sched = torch.optim.lr_scheduler
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.scheduler == "onecycle":
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs > 0 else 0.3
        return sched.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total, pct_start=min(max(pct, 1e-3), 0.999),
            cycle_momentum=False,  # keep the configured momentum/betas: one knob at a time
        )
    after_warmup = {
        "cosine": lambda: sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
        "step": lambda: sched.StepLR(optimizer, step_size=cfg.step_every * steps_per_epoch,
                                     gamma=cfg.step_gamma),
        "none": lambda: sched.ConstantLR(optimizer, factor=1.0, total_iters=0),
    }
    if warmup <= 0:
        return after_warmup[cfg.scheduler]()
    # factor (step + 1) / (warmup + 1) during the warmup, exactly 1 when the main schedule starts
    ramp = sched.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, after_warmup[cfg.scheduler]()],
                              milestones=[warmup])
