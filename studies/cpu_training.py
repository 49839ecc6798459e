"""The training settings the CPU-sized studies (demo, quality) share: one place for them."""

from __future__ import annotations

from typing import Any

import optuna


def cpu_training(trial: optuna.Trial, lr: tuple[float, float], epochs: int,
                 optimizer: str = "adamw") -> dict[str, Any]:
    """``optimizer`` (AdamW unless the study searches it) with cosine decay, batch 32, no TTA;
    lr (log-uniform in ``lr``), weight decay and the training targets' age threshold searched.
    ``TrainConfig`` keyword arguments, suggested in this order (a sampler's seeded draws follow
    the order of the calls)."""
    return {
        "optimizer": optimizer,
        "lr": trial.suggest_float("lr", *lr, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "scheduler": "cosine",
        "epochs": epochs,
        "batch_size": 32,
        "age_threshold": trial.suggest_int("age_threshold", 57, 60),
        "tta": False,
    }
