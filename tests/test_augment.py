"""Augmentation: strength 0 is the eval path, strength 1 changes images, eval is deterministic and
normalizes as ImageNet; CutMix/MixUp/half CutMix give soft targets that match the pixels they
mixed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.augment import (
    HALVES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_mixup,
    eval_transform,
    mix_batch,
    paste_half,
    train_transform,
)
from core.config import TrainConfig
from core.labels import NUM_CLASSES
from core.losses import create_loss

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


@pytest.mark.parametrize("mix", ["cutmix", "mixup", "halfcut"])
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


@pytest.mark.parametrize("mix", ["cutmix", "halfcut"])
def test_mix_is_deterministic_given_the_seed_and_respects_prob(mix):
    cfg = TrainConfig(mix=mix, mix_prob=0.5)
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


@pytest.mark.parametrize("half", HALVES)
def test_half_cutmix_pastes_one_half_of_the_flipped_batch_with_half_targets(half):
    """Image i keeps one half and gets the other from image N-1-i (the batch flipped); with even
    sizes its targets are exactly 0.5 for each of the two classes."""
    x, y = _labelled_batch(6)  # image i is all i, 8x10
    source = x.clone()
    mixed, soft = paste_half(x.clone(), y, half)
    partner = source.flip(0)
    kept = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[half]
    box = {"left": (..., slice(None), slice(0, 5)), "right": (..., slice(None), slice(5, 10)),
           "top": (..., slice(0, 4), slice(None)), "bottom": (..., slice(4, 8), slice(None))}
    assert torch.equal(mixed[box[kept]], source[box[kept]])  # e.g. the left half is the source's
    assert torch.equal(mixed[box[half]], partner[box[half]])
    expected = torch.zeros(6, NUM_CLASSES)
    expected[torch.arange(6), y] += 0.5
    expected[torch.arange(6), y.flip(0)] += 0.5
    assert torch.equal(soft, expected)


def test_half_cutmix_targets_follow_the_pasted_area_on_odd_sizes():
    n, h, w = 4, 7, 9
    y = torch.arange(n)
    for half in HALVES:
        x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, h, w).clone()
        mixed, soft = paste_half(x, y, half)
        for i in range(n):
            shares = torch.stack([(mixed[i] == c).float().mean() for c in range(n)])
            torch.testing.assert_close(shares, soft[i, :n])
        pasted = 4 / 9 if half in ("left", "right") else 3 / 7  # the smaller part of the cut
        assert soft[0, n - 1].item() == pytest.approx(pasted)


def test_half_cutmix_draws_every_half_and_repeats_per_seed():
    cfg = TrainConfig(mix="halfcut", mix_prob=1.0)
    seen = set()
    for seed in range(40):
        mixed, soft = _mixed(cfg, seed=seed)
        again, soft_again = _mixed(cfg, seed=seed)
        assert torch.equal(mixed, again) and torch.equal(soft, soft_again)
        assert set(soft.unique().tolist()) == {0.0, 0.5}
        own = mixed[0] == 0  # which pixels image 0 kept tells the half that was pasted
        rows, cols = own.any(dim=(0, 2)), own.any(dim=(0, 1))
        seen.add("left" if not cols[0] else "right" if not cols[-1] else
                 "top" if not rows[0] else "bottom")
    assert seen == set(HALVES)


def test_half_cutmix_targets_are_smoothed_by_the_loss_as_for_cutmix():
    """Mixers give unsmoothed targets and the loss smooths them (``label_smoothing``): the loss
    on a half-CutMix batch is PyTorch's cross entropy with smoothing on those soft targets."""
    cfg = TrainConfig(mix="halfcut", mix_prob=1.0, label_smoothing=0.1)
    _, soft = _mixed(cfg, seed=0)
    assert set(soft.unique().tolist()) == {0.0, 0.5}
    logits = torch.randn(6, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    loss = create_loss(cfg, np.arange(NUM_CLASSES))
    torch.testing.assert_close(loss(logits, soft),
                               F.cross_entropy(logits, soft, label_smoothing=0.1))
