"""Albumentations pipelines driven by one strength knob, and CutMix/MixUp/half CutMix on batches.

Why one knob: a search over a dozen augmentation parameters wastes trials; ``aug_strength`` in
[0, 1] scales every range and probability together, so 0 is the deterministic eval path and 1
the strongest set. Train, validation and prediction share the same tail (resize-if-needed,
ImageNet normalize, CHW tensor), so a size mismatch can never slip in silently.
"""

from __future__ import annotations

import os

# Albumentations asks PyPI for a newer version on import: a 2 s timeout and a UserWarning on an
# offline machine. Nothing here may touch the network, so opt out unless the user chose otherwise.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from timm.data import Mixup  # noqa: E402

from core.config import TrainConfig  # noqa: E402
from core.labels import NUM_CLASSES  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The ranges at strength 1. Faces are already cropped and centred, so geometry stays mild.
MAX_TRANSLATE = 0.10  # fraction of width/height
MAX_SCALE = 0.15  # zoom in/out by up to 15%
MAX_ROTATE = 15.0  # degrees
MAX_HUE, MAX_SAT, MAX_VAL = 10, 25, 15  # HueSaturationValue shift limits (uint8 units)
MAX_BRIGHTNESS = MAX_CONTRAST = 0.25
MAX_NOISE_STD = 0.08  # GaussNoise std as a fraction of the 0..255 range
MAX_P = 0.8  # probability of each photometric/geometric step at strength 1


def _tail(cfg: TrainConfig) -> list[A.BasicTransform]:
    """Resize (identity when the cache already has the size), normalize, to CHW float tensor."""
    h, w = cfg.image_size
    return [
        A.Resize(h, w, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        ToTensorV2(),
    ]


def eval_transform(cfg: TrainConfig) -> A.Compose:
    """Deterministic transform for validation and prediction: normalize only."""
    return A.Compose(_tail(cfg))


def train_transform(cfg: TrainConfig) -> A.Compose:
    """Training transform whose ranges and probabilities all scale with ``cfg.aug_strength``.

    Input uint8 HWC RGB, output float32 CHW ImageNet-normalized tensor. Strength 0 gives
    exactly ``eval_transform``. The Compose is seeded from ``cfg.seed`` for reproducible runs.
    """
    s = float(cfg.aug_strength)  # in [0, 1]: TrainConfig.validate checks it
    if s == 0.0:
        return eval_transform(cfg)
    # Augment after the resize so the ranges mean the same at every input size.
    h, w = cfg.image_size
    p = MAX_P * s
    steps: list[A.BasicTransform] = [
        A.Resize(h, w, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
        A.HorizontalFlip(p=0.5),
        A.Affine(
            translate_percent=(-MAX_TRANSLATE * s, MAX_TRANSLATE * s),
            scale=(1.0 - MAX_SCALE * s, 1.0 + MAX_SCALE * s),
            rotate=(-MAX_ROTATE * s, MAX_ROTATE * s),
            border_mode=cv2.BORDER_REFLECT_101,
            p=p,
        ),
        A.HueSaturationValue(
            hue_shift_limit=MAX_HUE * s, sat_shift_limit=MAX_SAT * s, val_shift_limit=MAX_VAL * s,
            p=p,
        ),
        A.RandomBrightnessContrast(
            brightness_limit=MAX_BRIGHTNESS * s, contrast_limit=MAX_CONTRAST * s, p=p
        ),
        A.GaussNoise(std_range=(0.0, MAX_NOISE_STD * s), p=p / 2),
    ]
    return A.Compose(steps + _tail(cfg)[1:], seed=cfg.seed)


#: The four boxes of half CutMix: which half of each image is pasted from its partner.
HALVES = ("left", "right", "top", "bottom")


def paste_half(x: torch.Tensor, y: torch.Tensor, half: str, num_classes: int = NUM_CLASSES
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste ``half`` of image N-1-i (the batch flipped, as timm pairs) onto image i, in place.

    Returns ``x`` and soft (N, num_classes) float32 targets that follow the pasted area: 0.5/0.5
    exactly when the cut dimension is even; with an odd one the pasted half is the smaller
    (floor) part, and the targets are its true share of the pixels. ``y``: int classes (N,).
    """
    if half not in HALVES:
        raise ValueError(f"half must be one of {', '.join(HALVES)}; got {half!r}")
    size = x.shape[-1] if half in ("left", "right") else x.shape[-2]
    cut = size // 2
    box = slice(0, cut) if half in ("left", "top") else slice(size - cut, size)
    region = (..., slice(None), box) if half in ("left", "right") else (..., box, slice(None))
    x[region] = x.flip(0)[region]  # flip() copies, so the in-place paste reads the originals
    pasted = cut / size
    own = F.one_hot(y.long(), num_classes).float()
    return x, own * (1.0 - pasted) + own.flip(0) * pasted


class HalfCutMix:
    """CutMix whose box is a whole half of the image, per batch (timm's "batch" mode).

    Why: faces are cropped and centred, so a random CutMix box mostly mixes background; a half
    always carries half a face. With probability ``prob`` a batch gets one of ``HALVES`` (left,
    right, top or bottom, uniformly) pasted from its partner image. Called like timm's ``Mixup``
    (``mixer(x, y) -> (x, soft targets)``), drawing from numpy's global state as timm does,
    which ``seed_everything`` seeds. Targets are not smoothed: the loss smooths, for every mix.
    """

    def __init__(self, prob: float = 1.0, num_classes: int = NUM_CLASSES) -> None:
        self.prob, self.num_classes = float(prob), num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if np.random.rand() >= self.prob:
            return x, F.one_hot(y.long(), self.num_classes).float()
        return paste_half(x, y, HALVES[np.random.randint(len(HALVES))], self.num_classes)


#: What ``create_mixup`` returns: a callable ``(images, int targets) -> (images, soft targets)``.
Mixer = Mixup | HalfCutMix


def create_mixup(cfg: TrainConfig) -> Mixer | None:
    """timm's batch-wise CutMix or MixUp, or our half CutMix (``cfg.mix``), applied with
    probability ``cfg.mix_prob``; None when mixing is off.

    ``correct_lam``: a CutMix box clipped at the border pastes less than lam asks for, and the
    targets follow the area actually pasted. timm draws from numpy's global state, which
    ``seed_everything`` seeds, so a seeded fold mixes the same way every time. Half CutMix pastes
    half the area whatever ``mix_alpha`` says.
    """
    if cfg.mix == "none" or cfg.mix_prob <= 0:
        return None
    if cfg.mix == "halfcut":
        return HalfCutMix(cfg.mix_prob, NUM_CLASSES)
    return Mixup(mixup_alpha=cfg.mix_alpha if cfg.mix == "mixup" else 0.0,
                 cutmix_alpha=cfg.mix_alpha if cfg.mix == "cutmix" else 0.0,
                 prob=cfg.mix_prob, mode="batch", correct_lam=True, label_smoothing=0.0,
                 num_classes=NUM_CLASSES)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixup: Mixer | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, targets) after ``mixup``: soft (N, 18) targets, ``x`` mixed in place.

    timm pairs image i with image N-1-i, so it needs an even batch: an odd one (a fold's last
    batch) and ``mixup=None`` leave the batch and its int targets as they are. Half CutMix
    follows the same rule, so every mix trains on the same batches.
    """
    if mixup is None or len(x) % 2:
        return x, y
    return mixup(x, y)
