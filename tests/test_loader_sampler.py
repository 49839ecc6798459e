"""Weighted sampling in ``create_loader``: draws follow the class weights, repeat per seed, work
with workers, and the default ("none") is exactly the shuffle the loader always had."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, WeightedRandomSampler

from core.config import SAMPLERS, ConfigError, TrainConfig
from core.loader import ImageArrayDataset, RowView, create_loader, sample_weights

#: Four classes with 400, 100, 25 and 4 images: imbalanced like the real set's rare classes.
COUNTS = np.array([400, 100, 25, 4])
CLASSES = np.array([0, 5, 11, 17])
LABELS = np.repeat(CLASSES, COUNTS)
IMAGES = np.zeros((len(LABELS), 2, 2, 3), dtype=np.uint8)  # the sampler never looks at pixels
EPOCHS = 20  # 20 x 529 draws per class-share estimate


def _identity(image: np.ndarray) -> dict[str, torch.Tensor]:
    return {"image": torch.from_numpy(image)}


def _loader(cfg: TrainConfig, train: bool = True, labels: np.ndarray = LABELS,
            images: np.ndarray = IMAGES, batch_size: int = 32) -> DataLoader:
    return create_loader(images, labels, _identity, batch_size, cfg, train=train, device="cpu")


def _draws(cfg: TrainConfig, epochs: int = EPOCHS) -> np.ndarray:
    """The image indices the training loader's sampler gives over ``epochs`` epochs."""
    sampler = _loader(cfg).sampler
    return np.concatenate([np.fromiter(iter(sampler), dtype=np.int64) for _ in range(epochs)])


@pytest.mark.parametrize(("scheme", "power"), [("inverse", 1.0), ("sqrt_inverse", 0.5)])
def test_draw_frequencies_follow_the_weights(scheme: str, power: float) -> None:
    """Class c of n_c images weighted n_c ** -power is drawn in proportion to n_c ** (1 - power):
    equally often for inverse, as sqrt(n_c) for sqrt_inverse."""
    sampler = _loader(TrainConfig(sampler=scheme)).sampler
    assert isinstance(sampler, WeightedRandomSampler)
    assert sampler.replacement and sampler.num_samples == len(LABELS)
    draws = _draws(TrainConfig(sampler=scheme))
    shares = np.array([(LABELS[draws] == c).mean() for c in CLASSES])
    expected = COUNTS ** (1.0 - power) / (COUNTS ** (1.0 - power)).sum()
    # ~10,600 draws: the binomial spread of each share is below 0.005; 0.02 is 4+ sigmas.
    np.testing.assert_allclose(shares, expected, atol=0.02)
    # With replacement: in one epoch some images come up twice and others never.
    assert len(np.unique(draws[:len(LABELS)])) < len(LABELS)


def test_sample_weights_are_the_class_weight_of_each_image() -> None:
    w = sample_weights(LABELS, "inverse")
    assert w.shape == (len(LABELS),) and w.dtype == torch.float64
    per_image = np.repeat(1.0 / COUNTS, COUNTS)
    np.testing.assert_allclose(w.numpy() / w.numpy().sum(), per_image / per_image.sum(),
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="'sampler'"):
        sample_weights(LABELS, "none")


def test_same_seed_same_draws_another_seed_others() -> None:
    cfg = TrainConfig(sampler="inverse", seed=3)
    first, again = _draws(cfg, epochs=2), _draws(cfg, epochs=2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[:len(LABELS)], first[len(LABELS):])  # a new draw per epoch
    assert not np.array_equal(first, _draws(dataclasses.replace(cfg, seed=4), epochs=2))


def test_workers_get_the_same_batches_as_the_main_process() -> None:
    """The sampler runs in the main process on its own seeded generator and workers only load:
    the batches of every epoch do not depend on ``num_workers`` (a machine setting), and they
    repeat."""
    labels = np.repeat(np.arange(4), [24, 6, 1, 1])
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None].repeat(3, 3)

    def batches(workers: int) -> list[list[int]]:
        cfg = TrainConfig(sampler="sqrt_inverse", seed=1, num_workers=workers)
        loader = _loader(cfg, labels=labels, images=images, batch_size=8)
        return [x[:, 0, 0, 0].tolist() for _ in range(2) for x, _ in loader]

    in_process = batches(0)
    assert len(in_process) == 2 * (len(labels) // 8)  # len(images) draws, ragged tail dropped
    assert batches(1) == in_process


def test_default_sampler_is_the_old_shuffle_exactly() -> None:
    """sampler "none" builds the loader the code built before samplers existed: shuffle=True
    over the loader's generator seeded with cfg.seed; validation stays in order."""
    cfg = TrainConfig(seed=5)
    assert cfg.sampler == "none" and SAMPLERS[0] == "none"
    ours = _loader(cfg)
    assert isinstance(ours.sampler, RandomSampler)
    old = DataLoader(ImageArrayDataset(IMAGES, LABELS, _identity), batch_size=32, shuffle=True,
                     drop_last=True, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        assert list(ours.batch_sampler) == list(old.batch_sampler)
    for scheme in SAMPLERS:  # never for validation, whatever the config says
        val = _loader(TrainConfig(sampler=scheme), train=False)
        assert isinstance(val.sampler, SequentialSampler)


def test_joined_row_views_read_both_rows_in_order_and_only_from_one_array() -> None:
    """The training rows then the pseudo-labelled eval rows: one view on the same cache."""
    images = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    joined = RowView(images, [3, 1]).join(RowView(images, [0]))
    assert joined.shape == (3, 2, 2, 3)
    for i, row in enumerate([3, 1, 0]):
        np.testing.assert_array_equal(joined[i], images[row])
    with pytest.raises(ValueError, match="same image array"):
        RowView(images, [0]).join(RowView(images.copy(), [0]))
