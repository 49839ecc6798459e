"""Augmentation: strength 0 is the eval path, strength 1 changes images, eval is deterministic and
normalizes as ImageNet; CutMix/MixUp give soft targets that match the pixels they mixed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from core.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_mixup,
    eval_transform,
    mix_batch,
    train_transform,
)
from core.config import TrainConfig
from core.labels import NUM_CLASSES

SIZE = (48, 32)


def _image(seed=0, size=SIZE):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _apply(transform, img):
    return transform(image=img)["image"]


def test_eval_transform_normalizes_deterministically():
    cfg = TrainConfig(image_size=SIZE)
    img = _image()
    out = _apply(eval_transform(cfg), img)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (3, *SIZE)
    expected = (img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    torch.testing.assert_close(_apply(eval_transform(cfg), img), out, rtol=0, atol=0)


def test_wrong_size_input_is_resized():
    cfg = TrainConfig(image_size=SIZE, aug_strength=0.7)
    big = _image(size=(96, 64))
    assert _apply(eval_transform(cfg), big).shape == (3, *SIZE)
    assert _apply(train_transform(cfg), big).shape == (3, *SIZE)


def test_strength_zero_equals_eval():
    cfg = TrainConfig(image_size=SIZE, aug_strength=0.0)
    train, ev = train_transform(cfg), eval_transform(cfg)
    for seed in range(5):
        img = _image(seed)
        torch.testing.assert_close(_apply(train, img), _apply(ev, img), rtol=0, atol=0)


def test_strength_one_changes_images_and_is_reproducible_per_seed():
    cfg = TrainConfig(image_size=SIZE, aug_strength=1.0, seed=3)
    img = _image()
    reference = _apply(eval_transform(cfg), img)
    first = _apply(train_transform(cfg), img)
    train = train_transform(cfg)
    outs = [_apply(train, img) for _ in range(8)]
    changed = [not torch.equal(o, reference) for o in outs]
    assert sum(changed) >= 6  # each step fires with p=0.8 (noise 0.4): unchanged is rare
    assert not all(torch.equal(outs[0], o) for o in outs[1:])  # random draw per call
    assert all(o.shape == (3, *SIZE) and o.dtype == torch.float32 for o in outs)
    torch.testing.assert_close(outs[0], first, rtol=0, atol=0)  # same cfg.seed, same sequence


def test_strength_scales_how_far_images_move():
    img = _image()
    reference = _apply(eval_transform(TrainConfig(image_size=SIZE)), img)

    def mean_change(strength):
        t = train_transform(TrainConfig(image_size=SIZE, aug_strength=strength))
        return np.mean([(_apply(t, img) - reference).abs().mean().item() for _ in range(20)])

    assert 0 < mean_change(0.1) < mean_change(1.0)


def test_no_albumentations_warnings():
    img = _image()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any deprecation/UserWarning from the 2.x API fails here
        for strength in (0.0, 0.3, 1.0):
            cfg = TrainConfig(image_size=SIZE, aug_strength=strength)
            _apply(train_transform(cfg), img)
            _apply(eval_transform(cfg), img)


NO_NETWORK_IMPORT = """
import socket
attempts = []
def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access")
socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse
import core.augment
assert not attempts, f"importing core.augment tried the network: {attempts}"
"""


@pytest.mark.slow
def test_import_makes_no_network_update_check():
    # Albumentations asks PyPI for updates on import (a 2 s timeout, then a UserWarning offline).
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", NO_NETWORK_IMPORT],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _labelled_batch(n=6):
    """Image i is filled with the value i, its label is class i: pixels reveal their source."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 8, 10).clone()
    return x, torch.arange(n)


def _mixed(cfg: TrainConfig, seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _labelled_batch(n)
    np.random.seed(seed)  # timm's Mixup draws from numpy's global state (seed_everything's)
    return mix_batch(x, y, create_mixup(cfg))


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_mix_targets_match_mixed_pixels(mix):
    """The soft targets say how much of each source image is in each mixed one: for CutMix
    that is the area actually pasted, after the box is clipped at the border (timm's
    ``correct_lam``), not the lam that was drawn."""
    mixed, soft = _mixed(TrainConfig(mix=mix, mix_prob=1.0, mix_alpha=1.0), seed=0)
    assert soft.shape == (6, NUM_CLASSES) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(6))
    assert soft.max() < 1  # with alpha=1 a lam of exactly 0 or 1 has probability 0
    for seed in range(20):
        mixed, soft = _mixed(TrainConfig(mix=mix, mix_prob=1.0, mix_alpha=1.0), seed=seed)
        for i in range(6):
            if mix == "mixup":  # every pixel is sum_c soft[i, c] * c
                expected = (soft[i, :6] * torch.arange(6.0)).sum()
                torch.testing.assert_close(mixed[i], torch.full_like(mixed[i], expected.item()))
            else:  # the share of pixels from image c is soft[i, c]
                shares = torch.stack([(mixed[i] == c).float().mean() for c in range(6)])
                torch.testing.assert_close(shares, soft[i, :6])


def test_mix_is_deterministic_given_the_seed_and_respects_prob():
    cfg = TrainConfig(mix="cutmix", mix_prob=0.5)
    a, b = _mixed(cfg, seed=7), _mixed(cfg, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x, _ = _labelled_batch()
    mixed = [not torch.equal(_mixed(cfg, seed=s)[0], x) for s in range(40)]
    assert 8 <= sum(mixed) <= 32


@pytest.mark.parametrize(("mix", "prob", "n"), [("none", 1.0, 6), ("mixup", 0.0, 6),
                                                ("mixup", 1.0, 5)])
def test_no_mix_leaves_the_batch_and_its_labels(mix, prob, n):
    """Mixing off, or an odd batch (timm pairs image i with N-1-i), trains on the plain batch."""
    x, y = _labelled_batch(n)
    out, target = _mixed(TrainConfig(mix=mix, mix_prob=prob), seed=0, n=n)
    assert torch.equal(out, x) and torch.equal(target, y)
