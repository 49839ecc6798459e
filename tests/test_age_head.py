"""The ordinal age head (issue 28, item 4): its group probabilities are ordered and valid for any
input, the model still returns an 18-way distribution, its loss is binary cross entropy on the
cumulative targets (checked against formulas written out here, on sigmoids of the raw logits),
training on ">=60" targets raises P(>=60), and the default 3-way head is exactly the old model.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigError, TrainConfig
from core.labels import NUM_CLASSES, decode, encode
from core.losses import create_loss
from core.models import MultiHeadNet, create_model, ordinal_age_log_probs, to_probabilities

#: Training targets for the class weights: every age group present, ">=60" the rarest.
TARGETS = encode(np.zeros(10, int), np.arange(10) % 2, np.array([0] * 5 + [1] * 4 + [2]))


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on two busy cores are several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(n: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Raw three-head logits (N, 3 + 2 + 2): mask, gender, ordinal age (>=30, >=60 | >=30)."""
    return torch.randn(n, 7, generator=torch.Generator().manual_seed(seed)) * scale


def _ordinal_net() -> MultiHeadNet:
    """The three-head model on an identity backbone: its input is the raw logits themselves."""
    return MultiHeadNet(nn.Identity(), "ordinal")


def test_ordinal_group_probabilities_are_ordered_and_valid_for_any_logits():
    grid = torch.tensor([-1e4, -60.0, -8.0, -1.0, 0.0, 0.5, 3.0, 30.0, 1e4])
    z = torch.cartesian_prod(grid, grid)  # every pair, extremes included
    z = torch.cat([z, torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * 10])
    log_p = ordinal_age_log_probs(z)
    p = log_p.exp()
    assert torch.isfinite(log_p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.ones(len(z)), atol=1e-6, rtol=0)
    ge30, ge60 = p[:, 1] + p[:, 2], p[:, 2]
    assert (ge60 <= ge30).all()
    # what the two logits mean: P(>=30) = sigmoid(z0), P(>=60) = P(>=30) sigmoid(z1)
    torch.testing.assert_close(ge30, torch.sigmoid(z[:, 0]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ge60, torch.sigmoid(z[:, 0]) * torch.sigmoid(z[:, 1]),
                               atol=1e-6, rtol=1e-5)


def test_ordinal_model_returns_an_18_way_distribution_with_ordered_age():
    torch.manual_seed(0)
    model = create_model(TrainConfig(backbone="test_resnet", head="multi",
                                     age_head="ordinal")).eval()
    assert model.backbone.get_classifier().out_features == 3 + 2 + 2
    x = torch.randn(5, 3, 32, 32) * 4
    with torch.no_grad():
        probs = to_probabilities(model, model(x))
        _, _, la = model.head_log_probs(x)
    assert probs.shape == (5, NUM_CLASSES) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    age = probs.reshape(5, 3, 2, 3).sum((1, 2))  # the age marginal of the 18 classes
    torch.testing.assert_close(age, la.exp())
    assert (age[:, 2] <= age[:, 1] + age[:, 2]).all()


def test_classes_age_head_is_the_old_model_exactly():
    """The default is the three-head model as it was: an 8-way timm classifier split 3/2/3, each
    part log-softmaxed, joined as log P(m) + log P(g) + log P(a) in class order."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    old = timm.create_model("test_resnet", num_classes=8, drop_rate=0.0).eval()
    with torch.no_grad():
        zm, zg, za = old(x).float().split((3, 2, 3), dim=1)
        joint = (F.log_softmax(zm, 1)[:, :, None, None] + F.log_softmax(zg, 1)[:, None, :, None]
                 + F.log_softmax(za, 1)[:, None, None, :])
    expected = joint.reshape(4, NUM_CLASSES)
    for cfg in (TrainConfig(backbone="test_resnet", head="multi"),
                TrainConfig(backbone="test_resnet", head="multi", age_head="classes")):
        torch.manual_seed(0)
        model = create_model(cfg).eval()
        with torch.no_grad():
            assert torch.equal(model(x), expected)


def _bce(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row binary cross entropy, written out: -(t log p + (1 - t) log(1 - p))."""
    return -(t * p.log() + (1 - t) * (1 - p).log())


def _hand_loss(z: torch.Tensor, target: torch.Tensor, w30: torch.Tensor | None = None,
               w60: torch.Tensor | None = None) -> torch.Tensor:
    """Mask and gender cross entropy plus BCE on P(>=30) = s(z5), P(>=60) = s(z5) s(z6) against
    the cumulative targets of the soft 3-way age rows; ``w30``/``w60`` are per-row weights."""
    t = target.reshape(-1, 3, 2, 3)
    tm, tg, ta = t.sum((2, 3)), t.sum((1, 3)), t.sum((1, 2))
    ce = (-(tm * F.log_softmax(z[:, :3], 1)).sum(1).mean()
          - (tg * F.log_softmax(z[:, 3:5], 1)).sum(1).mean())
    p30 = torch.sigmoid(z[:, 5])
    p60 = p30 * torch.sigmoid(z[:, 6])
    b30, b60 = _bce(p30, ta[:, 1] + ta[:, 2]), _bce(p60, ta[:, 2])
    w30 = torch.ones(len(z)) if w30 is None else w30
    w60 = torch.ones(len(z)) if w60 is None else w60
    return ce + (w30 * b30).sum() / w30.sum() + (w60 * b60).sum() / w60.sum()


def test_ordinal_loss_is_binary_cross_entropy_on_the_cumulative_targets():
    z = _logits(12, seed=2)
    hard = torch.arange(12) % NUM_CLASSES  # every age group, for mask 0 and 1
    loss = create_loss(TrainConfig(head="multi", age_head="ordinal"), TARGETS)
    out = _ordinal_net()(z)
    one_hot = F.one_hot(hard, NUM_CLASSES).float()
    expected = _hand_loss(z, one_hot)
    torch.testing.assert_close(loss(out, hard), expected)
    torch.testing.assert_close(loss(out, one_hot), expected)
    # a mixed batch (CutMix/MixUp/half CutMix): soft rows give soft cumulative targets
    soft = 0.7 * one_hot + 0.3 * one_hot.flip(0)
    torch.testing.assert_close(loss(out, soft), _hand_loss(z, soft))
    # the 3-way head's age cross entropy is a different number: the option does something
    classes = create_loss(TrainConfig(head="multi"), TARGETS)
    assert not torch.allclose(classes(out, hard), expected)


def test_ordinal_class_weights_come_from_each_cumulative_task():
    """With inverse weights each binary task weighs its rows by 1/count of their side, from the
    training targets: 5 of 10 people are >=30 and 1 of 10 is >=60."""
    z = _logits(12, seed=3)
    hard = torch.arange(12) % NUM_CLASSES
    age = torch.as_tensor(decode(hard.numpy())[2])
    loss = create_loss(TrainConfig(head="multi", age_head="ordinal", class_weights="none"),
                       TARGETS)
    weighted = create_loss(TrainConfig(head="multi", age_head="ordinal",
                                       class_weights="inverse"), TARGETS)
    out = _ordinal_net()(z)
    w30 = torch.ones(12)  # 5 below 30 and 5 at or above: equal weights
    w60 = torch.where(age >= 2, 1 / 1, 1 / 9)
    # mask weights: all training images wear a mask (the other kinds take the rarest count, the
    # same), gender 5/5: weights are uniform on both, so only the age tasks differ
    one_hot = F.one_hot(hard, NUM_CLASSES).float()
    torch.testing.assert_close(weighted(out, hard), _hand_loss(z, one_hot, w30, w60))
    torch.testing.assert_close(loss(out, hard), _hand_loss(z, one_hot))


def test_ordinal_focal_and_smoothing_apply_per_binary_task():
    """Focal gamma is binary focal loss on each cumulative task, and label smoothing pulls each
    binary target towards 1/2 (and each mask/gender target towards uniform)."""
    gamma, s = 2.0, 0.1
    z = _logits(10, seed=4)
    hard = torch.arange(10) * 7 % NUM_CLASSES
    loss = create_loss(TrainConfig(head="multi", age_head="ordinal", loss="focal",
                                   focal_gamma=gamma, label_smoothing=s), TARGETS)
    m, g, a = (torch.as_tensor(v) for v in decode(hard.numpy()))

    def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        t = F.one_hot(y, k).float() * (1 - s) + s / k
        p = logits.softmax(1)
        return -(t * (1 - p) ** gamma * p.log()).sum(1).mean()

    def binary_focal(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = y.float() * (1 - s) + s / 2
        return -(t * (1 - p) ** gamma * p.log() + (1 - t) * p ** gamma * (1 - p).log()).mean()

    p30 = torch.sigmoid(z[:, 5])
    expected = (focal(z[:, :3], m) + focal(z[:, 3:5], g) + binary_focal(p30, a >= 1)
                + binary_focal(p30 * torch.sigmoid(z[:, 6]), a >= 2))
    torch.testing.assert_close(loss(_ordinal_net()(z), hard), expected)


def test_soft_f1_scores_the_three_age_groups_for_both_age_heads():
    """The soft-F1 term looks at the 3 group probabilities, whichever head made them: at w = 1
    the loss depends on the 18-way output only, so both heads give the same value on it."""
    z = _logits(8, seed=5)
    out = _ordinal_net()(z)
    hard = torch.arange(8) * 5 % NUM_CLASSES
    a = create_loss(TrainConfig(head="multi", age_head="ordinal", soft_f1_weight=1.0), TARGETS)
    b = create_loss(TrainConfig(head="multi", soft_f1_weight=1.0), TARGETS)
    torch.testing.assert_close(a(out, hard), b(out, hard))


def test_training_on_old_targets_raises_p_ge60():
    torch.manual_seed(0)
    model = create_model(TrainConfig(backbone="test_resnet", head="multi", age_head="ordinal"))
    x = torch.randn(8, 3, 32, 32)
    y = torch.as_tensor(encode(np.arange(8) % 3, np.arange(8) % 2, np.full(8, 2)))
    criterion = create_loss(TrainConfig(head="multi", age_head="ordinal"), y.numpy())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, p60 = [], []
    for _ in range(8):
        out = model(x)
        loss = criterion(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        p60.append(out.detach().exp().reshape(8, 3, 2, 3)[..., 2].sum((1, 2)).mean().item())
    assert losses[-1] < losses[0] and p60[-1] > p60[0] + 0.1, (losses, p60)


def test_ordinal_needs_the_three_head_model():
    with pytest.raises(ConfigError, match="'age_head'.*head 'multi'"):
        TrainConfig(head="single", age_head="ordinal").validate()
    with pytest.raises(ConfigError, match="'age_head'.*head 'multi'"):
        create_loss(TrainConfig(head="multi", age_head="ordinal"), TARGETS, multi_head=False)
    with pytest.raises(ConfigError, match="'age_head': must be one of classes, ordinal"):
        TrainConfig(head="multi", age_head="regression").validate()
    TrainConfig(head="multi", age_head="ordinal").validate()
