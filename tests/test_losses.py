"""Losses: focal(gamma=0) is cross entropy, class weights follow their formulas, the multi-head
loss is the sum of per-head losses on the marginals; soft-F1 is 1 - macro F1 on one-hot
probabilities (scikit-learn as the reference) and weight 0 leaves the old loss exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from core.config import ConfigError, TrainConfig
from core.errors import DataError
from core.labels import NUM_CLASSES, decode, encode
from core.losses import (
    class_weights,
    create_loss,
    focal_nll,
    head_marginals,
    soft_f1_loss,
    soft_targets,
)

# A small hand-made target vector: class 0 x4, class 1 x2, class 5 x1, class 17 x1; the other
# 14 classes are absent.
TARGETS = np.array([0, 0, 0, 0, 1, 1, 5, 17])


def _expected(counts_present: dict[int, int], fn, k: int = NUM_CLASSES) -> np.ndarray:
    """Independent reference: absent classes take the rarest present count, then normalize."""
    rarest = min(counts_present.values())
    n = np.array([counts_present.get(c, rarest) for c in range(k)], dtype=float)
    w = fn(n)
    return w / w.sum() * k


COUNTS = {0: 4, 1: 2, 5: 1, 17: 1}


@pytest.mark.parametrize(
    ("scheme", "fn"),
    [
        ("inverse", lambda n: 1 / n),
        ("sqrt_inverse", lambda n: n ** -0.5),
        ("effective", lambda n: (1 - 0.9) / (1 - 0.9 ** n)),
    ],
)
def test_class_weights_match_formulas(scheme, fn):
    w = class_weights(TARGETS, scheme, beta=0.9)
    assert w.shape == (NUM_CLASSES,) and w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), _expected(COUNTS, fn), rtol=1e-6)
    assert w.sum().item() == pytest.approx(NUM_CLASSES, rel=1e-6)
    # rarer classes never weigh less; absent classes weigh like the rarest present one
    assert w[0] < w[1] < w[5] and w[5] == w[17] == w[2]


def test_class_weights_none_and_effective_limits():
    assert torch.equal(class_weights(TARGETS, "none"), torch.ones(NUM_CLASSES))
    near_uniform = class_weights(TARGETS, "effective", beta=1e-6)
    np.testing.assert_allclose(near_uniform.numpy(), np.ones(NUM_CLASSES), atol=1e-4)
    near_inverse = class_weights(TARGETS, "effective", beta=1 - 1e-7)
    np.testing.assert_allclose(near_inverse.numpy(), class_weights(TARGETS, "inverse").numpy(),
                               rtol=1e-4)


def test_class_weights_reject_bad_input():
    with pytest.raises(DataError, match="empty"):
        class_weights(np.array([], dtype=np.int64), "inverse")
    with pytest.raises(DataError, match="0..17"):
        class_weights(np.array([0, 18]), "inverse")
    with pytest.raises(ConfigError, match="class_weights"):
        class_weights(TARGETS, "balanced")


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, generator=g) * 3
    hard = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, NUM_CLASSES, generator=g), 1)
    return logits, hard, soft


@pytest.mark.parametrize("weights", ["none", "inverse"])
def test_focal_gamma_zero_is_cross_entropy_hard(weights):
    logits, hard, _ = _batch()
    cfg = TrainConfig(loss="focal", focal_gamma=0.0, class_weights=weights)
    loss = create_loss(cfg, TARGETS)
    w = class_weights(TARGETS, weights)
    torch.testing.assert_close(loss(logits, hard), F.cross_entropy(logits, hard, weight=w))


def test_focal_gamma_zero_is_cross_entropy_soft_and_smoothed():
    logits, hard, soft = _batch()
    loss = create_loss(TrainConfig(loss="focal", focal_gamma=0.0), TARGETS)
    torch.testing.assert_close(loss(logits, soft), F.cross_entropy(logits, soft))
    smooth = create_loss(TrainConfig(loss="ce", label_smoothing=0.1), TARGETS)
    torch.testing.assert_close(smooth(logits, hard),
                               F.cross_entropy(logits, hard, label_smoothing=0.1))


def test_focal_down_weights_easy_examples():
    logits, hard, _ = _batch()
    ce = create_loss(TrainConfig(loss="ce", focal_gamma=2.0), TARGETS)  # "ce" ignores gamma
    focal = create_loss(TrainConfig(loss="focal", focal_gamma=2.0), TARGETS)
    torch.testing.assert_close(ce(logits, hard), F.cross_entropy(logits, hard))
    assert 0 < focal(logits, hard) < ce(logits, hard)
    # per-example reference: -(1 - p_y)^gamma log p_y, mean
    logp = F.log_softmax(logits, 1).gather(1, hard[:, None])[:, 0]
    expected = (-(1 - logp.exp()) ** 2 * logp).mean()
    torch.testing.assert_close(focal(logits, hard), expected)


def test_multi_head_loss_is_sum_of_head_losses():
    g = torch.Generator().manual_seed(1)
    zm, zg, za = (torch.randn(8, k, generator=g) for k in (3, 2, 3))
    lm, lg, la = (F.log_softmax(z, 1) for z in (zm, zg, za))
    joint = lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]
    log_probs18 = joint.reshape(8, 18)
    hard = torch.randint(0, NUM_CLASSES, (8,), generator=g)
    m, gd, a = (torch.as_tensor(v) for v in decode(hard.numpy()))
    cfg = TrainConfig(head="multi", class_weights="inverse")
    loss = create_loss(cfg, TARGETS)
    wm, wg, wa = (class_weights(np.asarray(p), "inverse", num_classes=k)
                  for p, k in zip(decode(TARGETS), (3, 2, 3), strict=True))
    expected = (F.cross_entropy(zm, m, weight=wm) + F.cross_entropy(zg, gd, weight=wg)
                + F.cross_entropy(za, a, weight=wa))
    torch.testing.assert_close(loss(log_probs18, hard), expected)
    # soft one-hot targets give the same loss as hard ones
    torch.testing.assert_close(loss(log_probs18, F.one_hot(hard, 18).float()), expected)
    # create_loss follows the flag over cfg.head
    assert create_loss(TrainConfig(head="single"), TARGETS, multi_head=True).multi_head


def test_multi_head_weights_come_from_marginal_counts():
    # 3 wear-mask images and 1 not-worn: mask weights 1/3 vs 1, incorrect absent -> rarest (1)
    t = encode(np.array([0, 0, 0, 2]), np.array([0, 1, 1, 1]), np.array([0, 1, 2, 2]))
    loss = create_loss(TrainConfig(head="multi", class_weights="inverse"), t)
    np.testing.assert_allclose(loss.w_mask.numpy(), np.array([1 / 3, 1, 1]) / (7 / 3) * 3,
                               rtol=1e-6)
    np.testing.assert_allclose(loss.w_gender.numpy(), np.array([1, 1 / 3]) / (4 / 3) * 2,
                               rtol=1e-6)


def test_loss_backpropagates_and_accepts_bfloat16():
    logits, hard, _ = _batch()
    logits = logits.bfloat16().requires_grad_()
    loss = create_loss(TrainConfig(loss="focal", focal_gamma=1.5, class_weights="effective",
                                  label_smoothing=0.05), TARGETS)(logits, hard)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


def _every_class_batch(seed: int = 0, wrong: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with every class twice (so scikit-learn's default labels are all 18) and
    predictions equal to them except ``wrong`` random rows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat(2)[torch.randperm(2 * NUM_CLASSES, generator=g)]
    pred = y.clone()
    rows = torch.randperm(len(y), generator=g)[:wrong]
    pred[rows] = torch.randint(0, NUM_CLASSES, (wrong,), generator=g)
    return y, pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_f1_on_one_hot_probabilities_is_one_minus_macro_f1(seed):
    y, pred = _every_class_batch(seed)
    one_hot = F.one_hot(pred, NUM_CLASSES).float()
    macro = f1_score(y.numpy(), pred.numpy(), average="macro")
    assert macro < 1
    assert soft_f1_loss(one_hot, y).item() == pytest.approx(1 - macro, abs=1e-6)
    # soft one-hot target rows give the same value as hard targets
    assert soft_f1_loss(one_hot, F.one_hot(y, NUM_CLASSES).float()).item() == pytest.approx(
        1 - macro, abs=1e-6)
    # through create_loss, on logits whose softmax is one-hot to float precision
    loss = create_loss(TrainConfig(soft_f1_weight=1.0), TARGETS)
    assert loss(one_hot * 100, y).item() == pytest.approx(1 - macro, abs=1e-5)


def test_soft_f1_counts_a_class_missing_from_the_batch_as_zero():
    """A mean over all 18 classes, as scikit-learn with labels=0..17 and zero_division=0."""
    y = torch.tensor([0, 0, 1, 2, 2, 3])
    pred = torch.tensor([0, 1, 1, 2, 3, 3])
    expected = f1_score(y.numpy(), pred.numpy(), labels=range(NUM_CLASSES), average="macro",
                        zero_division=0)
    got = soft_f1_loss(F.one_hot(pred, NUM_CLASSES).float(), y).item()
    assert got == pytest.approx(1 - expected, abs=1e-6)


def test_multi_head_soft_f1_is_the_mean_of_the_three_heads():
    """On one-hot head outputs: the mean over mask, gender and age of 1 - that head's macro F1
    (scikit-learn on the decoded labels)."""
    y, pred = _every_class_batch(seed=4, wrong=20)
    heads_true, heads_pred = decode(y.numpy()), decode(pred.numpy())
    # per-head log-softmax of near one-hot logits, joined into 18 classes as the model does
    lm, lg, la = (F.log_softmax(F.one_hot(torch.as_tensor(p), k).float() * 100, 1)
                  for p, k in zip(heads_pred, (3, 2, 3), strict=True))
    log_probs = (lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]).reshape(
        len(y), NUM_CLASSES)
    expected = np.mean([1 - f1_score(t, p, average="macro")
                        for t, p in zip(heads_true, heads_pred, strict=True)])
    loss = create_loss(TrainConfig(head="multi", soft_f1_weight=1.0), TARGETS)
    assert loss(log_probs, y).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("head", ["single", "multi"])
def test_soft_f1_gradient_is_finite_and_non_zero(head):
    logits, hard, soft = _batch()
    outputs = logits if head == "single" else F.log_softmax(logits, 1)  # any 18-way log-probs
    for weight in (1.0, 0.4):
        loss = create_loss(TrainConfig(head=head, soft_f1_weight=weight, loss="focal",
                                       focal_gamma=2.0, label_smoothing=0.1), TARGETS)
        for target in (hard, soft):
            x = outputs.clone().requires_grad_()
            value = loss(x, target)
            value.backward()
            assert torch.isfinite(value) and 0 < value.item()
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("head", ["single", "multi"])
def test_soft_f1_weight_zero_is_the_old_loss_and_others_mix_linearly(head):
    logits, hard, soft = _batch()
    outputs = logits if head == "single" else F.log_softmax(logits, 1)
    kw = dict(head=head, loss="focal", focal_gamma=1.5, class_weights="inverse",
              label_smoothing=0.05)
    base = create_loss(TrainConfig(**kw), TARGETS)
    f1 = create_loss(TrainConfig(**kw, soft_f1_weight=1.0), TARGETS)
    mixed = create_loss(TrainConfig(**kw, soft_f1_weight=0.4), TARGETS)
    for target in (hard, soft):
        # the old loss, as the code computed it before soft-F1 existed
        if head == "single":
            old = focal_nll(F.log_softmax(logits, 1), target, base.weight, 1.5, 0.05)
        else:
            t = head_marginals(soft_targets(target, NUM_CLASSES), log=False)
            old = sum(focal_nll(lp, tt, w, 1.5, 0.05) for lp, tt, w in zip(
                head_marginals(outputs, log=True), t, (base.w_mask, base.w_gender, base.w_age),
                strict=True))
        assert torch.equal(base(outputs, target), old)
        torch.testing.assert_close(mixed(outputs, target),
                                   0.6 * base(outputs, target) + 0.4 * f1(outputs, target))
