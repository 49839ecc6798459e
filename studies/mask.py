"""The competition study: pretrained timm backbones on the real mask data, 5 folds.

The data is the competition folder (``--data`` or ``$MASK_DATA``), with the publicly reported
label errors fixed from the shipped corrections file. The space covers what matters on this
task: backbone and input size, an 18-way head or three heads (with a 3-way or an ordinal age
head), the loss for the rare ">=60" classes (focal, class weights, label smoothing, a soft
macro-F1 term, weighted sampling), augmentation and CutMix/MixUp/half CutMix, the optimizer and
schedule, and the age threshold used to relabel *training* targets (scoring always uses 60).
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from core.config import MIXES, ConfigError, TrainConfig
from core.dataset import PUBLIC_CORRECTIONS
from studies.top_teams import OFF, top_team_options

FOLDS = 5
FOLD_SEED = 0
EPOCHS = 8
DATA_ENV = "MASK_DATA"
#: Backbones the space may pick, all pretrained (``search.run`` checks the weights of the ones
#: the space can still pick, found by sampling it, before any work starts).
BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "efficientnet_b3",
             "convnext_tiny")
#: (height, width): the photos are 384x512 portrait, face crops keep that 4:3 shape.
IMAGE_SIZES = {"224x168": (224, 168), "288x224": (288, 224), "384x288": (384, 288)}


#: Recipes that worked in the competition, enqueued as the first trials of a new study (warm
#: start): focal loss with class weights, age threshold 59, Adam with cosine decay, and the
#: flips, shift-scale-rotate, hue/saturation, brightness/contrast and noise of aug_strength.
#: Both are single-head recipes, so they keep the 3-way age of every earlier study without
#: naming ``age_head``: the space suggests it only for head "multi", and a recipe may name only
#: parameters its branch suggests (``search.space.fits``).
WARM_START = (
    {"backbone": "resnet18", "image_size": "224x168", "head": "single", "drop_rate": 0.2,
     "loss": "focal", "focal_gamma": 2.0, "class_weights": "sqrt_inverse",
     "label_smoothing": 0.0, "aug_strength": 0.5, "mix": "none", "optimizer": "adam",
     "lr": 3e-4, "weight_decay": 1e-5, "scheduler": "cosine", "warmup_epochs": 0.5,
     "age_threshold": 59, **OFF},
    {"backbone": "efficientnet_b3", "image_size": "288x224", "head": "single", "drop_rate": 0.3,
     "loss": "focal", "focal_gamma": 2.0, "class_weights": "sqrt_inverse",
     "label_smoothing": 0.0, "aug_strength": 0.5, "mix": "none", "optimizer": "adam",
     "lr": 3e-4, "weight_decay": 1e-5, "scheduler": "cosine", "warmup_epochs": 0.5,
     "age_threshold": 59, **OFF},
)


def default_data(runs: Path) -> Path:
    """The competition folder from ``$MASK_DATA``; there is no sensible built-in default."""
    value = os.environ.get(DATA_ENV)
    if not value:
        raise ConfigError(f"study 'mask' needs the competition data: pass --data DIR or set "
                          f"{DATA_ENV}")
    return Path(value)


def corrections(data_dir: Path) -> Path:
    """The publicly reported label errors of the real set, shipped with the package."""
    return PUBLIC_CORRECTIONS


def space(trial: optuna.Trial) -> TrainConfig:
    """Define-by-run space; conditional parameters are only suggested when they matter."""
    loss = trial.suggest_categorical("loss", ["ce", "focal"])
    mix = trial.suggest_categorical("mix", list(MIXES))
    optimizer = trial.suggest_categorical("optimizer", ["adamw", "adam", "sgd"])
    lr_range = (1e-3, 1e-1) if optimizer == "sgd" else (1e-5, 3e-3)
    scheduler = trial.suggest_categorical("scheduler", ["cosine", "onecycle", "step", "none"])
    class_weights = trial.suggest_categorical(
        "class_weights", ["none", "inverse", "sqrt_inverse", "effective"])
    head = trial.suggest_categorical("head", ["single", "multi"])
    extras = top_team_options(trial, head)
    return TrainConfig(
        backbone=trial.suggest_categorical("backbone", list(BACKBONES)),
        image_size=IMAGE_SIZES[trial.suggest_categorical("image_size", list(IMAGE_SIZES))],
        head=head,
        pretrained=True,  # the competition's backbones start from ImageNet weights
        drop_rate=trial.suggest_float("drop_rate", 0.0, 0.5),
        loss=loss,
        focal_gamma=trial.suggest_float("focal_gamma", 0.5, 3.0) if loss == "focal" else 0.0,
        class_weights=class_weights,
        effective_beta=(trial.suggest_float("effective_beta", 0.9, 0.9999, log=True)
                        if class_weights == "effective" else 0.999),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.2),
        aug_strength=trial.suggest_float("aug_strength", 0.0, 1.0),
        mix=mix,
        mix_prob=trial.suggest_float("mix_prob", 0.1, 1.0) if mix != "none" else 0.0,
        optimizer=optimizer,
        lr=trial.suggest_float("lr", *lr_range, log=True),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        scheduler=scheduler,
        warmup_epochs=(trial.suggest_float("warmup_epochs", 0.0, 2.0)
                       if scheduler != "onecycle" else 0.0),
        epochs=EPOCHS,
        batch_size=32,
        age_threshold=trial.suggest_int("age_threshold", 57, 60),
        **extras,
    )
