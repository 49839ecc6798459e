"""Cross entropy, focal loss, label smoothing and class weights, for hard or soft targets.

Why one loss class: focal with gamma=0 *is* cross entropy, so the search's ``loss`` choice and
``focal_gamma`` share one code path and cannot drift apart. Targets may be int class indices or
soft (N, 18) rows from CutMix/MixUp. The single head gives logits; the three-head model gives
18-way log-probabilities, and its loss is the sum of the mask, gender and age losses on the
marginals (each with its own class weights from the marginal counts).

Reduction: a weighted mean, ``sum_i l_i / sum_i sum_c w_c t_ic``. For hard targets that is
exactly ``F.cross_entropy(weight=w)``; for soft targets without weights it is the plain mean.

A soft macro-F1 term can be mixed in (``soft_f1_weight`` w: ``(1 - w) * loss + w * soft-F1``):
the objective is macro F1, which cross entropy only approximates, and the rare classes count as
much in it as the common ones. Both head types share the mixing (``_MixedLoss``); w = 0 gives
the old loss exactly.

The ordinal age head (``age_head="ordinal"``, three-head model only) changes one thing: the age
term of the log-loss becomes two binary tasks on the cumulative events age >= 30 and age >= 60,
with targets read off the (possibly mixed) 3-way age targets: t(>=30) = t(30-59) + t(>=60),
t(>=60) = t(>=60). Why: a 3-way cross entropy charges "<30" for a 60-year-old no more than
"30-59"; the cumulative tasks charge it twice, so the loss knows the groups' order. Each binary
task is a 2-way part of the same ``focal_nll``, so the rest carries over unchanged and per task:
focal gamma is binary focal loss, label smoothing pulls each binary target towards 1/2, and class
weights come from each task's own counts (for ">=60": old vs not old), with the same schemes.
The soft-F1 term still scores the 3 groups (the ordinal head's are always valid), as for
"classes": macro F1 over the groups is what the objective counts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import AGE_HEAD_NEEDS_MULTI, CLASS_WEIGHTS, ConfigError, TrainConfig
from core.errors import DataError
from core.labels import NUM_AGE, NUM_CLASSES, NUM_GENDER, NUM_MASK, decode

Targets = np.ndarray | torch.Tensor | list[int]


def _checked_targets(targets: Targets, num_classes: int) -> np.ndarray:
    """Targets as a flat int array, or ``DataError`` when empty or out of range."""
    t = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets).ravel()
    if t.size == 0:
        raise DataError("loss class weights: the training targets are empty")
    if not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= num_classes:
        raise DataError(f"loss class weights: targets must be integers in 0..{num_classes - 1} "
                        f"(got dtype {t.dtype}, range {t.min()}..{t.max()})")
    return t.astype(np.int64)


def class_weights(
    targets: Targets,
    scheme: str,
    beta: float = 0.999,
    num_classes: int = NUM_CLASSES,
) -> torch.Tensor:
    """Per-class loss weights (num_classes,) float32 from the training targets' counts.

    - ``none``: ones.
    - ``inverse``: 1 / n_c; ``sqrt_inverse``: 1 / sqrt(n_c).
    - ``effective``: (1 - beta) / (1 - beta ** n_c), the effective number of samples
      (Cui et al., CVPR 2019); beta -> 0 gives uniform weights, beta -> 1 approaches inverse.

    All but ``none`` are normalized to sum to ``num_classes`` (mean weight 1, so the learning
    rate means the same with or without weights). A class absent from ``targets`` gets the
    count of the rarest present class, hence the largest weight, instead of a division by zero:
    it may appear in validation and should not be ignored.
    """
    if scheme not in CLASS_WEIGHTS:
        raise ConfigError(f"config field 'class_weights': must be one of "
                          f"{', '.join(CLASS_WEIGHTS)} (got {scheme!r})")
    t = _checked_targets(targets, num_classes)
    if scheme == "none":
        return torch.ones(num_classes, dtype=torch.float32)
    counts = np.bincount(t, minlength=num_classes).astype(np.float64)
    counts[counts == 0] = counts[counts > 0].min()
    if scheme == "inverse":
        w = 1.0 / counts
    elif scheme == "sqrt_inverse":
        w = 1.0 / np.sqrt(counts)
    else:
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"config field 'effective_beta': must be in [0, 1) (got {beta!r})")
        w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    return torch.as_tensor(w * num_classes / w.sum(), dtype=torch.float32)


def soft_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard indices (N,) or soft (N, K) -> float32 (N, K)."""
    if target.ndim == 1:
        return F.one_hot(target.long(), num_classes).float()
    if target.ndim == 2 and target.shape[1] == num_classes:
        return target.float()
    raise ValueError(f"targets must be (N,) class indices or (N, {num_classes}) soft rows; "
                     f"got shape {tuple(target.shape)}")


def focal_nll(
    log_probs: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    gamma: float = 0.0,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """Weighted focal loss on log-probabilities (N, K) with hard or soft targets.

    ``-sum_c w_c t_c (1 - p_c)^gamma log p_c`` per row, weighted mean over rows. gamma=0 and
    no weights is cross entropy; ``smoothing`` mixes the target with the uniform distribution.
    """
    k = log_probs.shape[1]
    t = soft_targets(target, k).to(log_probs.device)
    if smoothing > 0:
        t = t * (1.0 - smoothing) + smoothing / k
    w = torch.ones(k, device=log_probs.device) if weight is None else weight.to(log_probs.device)
    per_class = t * w * log_probs
    if gamma > 0:
        per_class = per_class * (1.0 - log_probs.exp()).clamp_min(0).pow(gamma)
    return -per_class.sum() / (t * w).sum()


def soft_f1_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - mean over the K classes of ``2 sum_i p_ic t_ic / (sum_i p_ic + sum_i t_ic)``.

    A differentiable macro F1 on the batch: with one-hot ``probs`` it is exactly 1 - macro F1
    of the argmax over all K classes (a class neither predicted nor present scores 0, as
    scikit-learn's ``labels=range(K), zero_division=0``). ``probs`` (N, K) rows sum to 1;
    ``target`` is hard (N,) or soft (N, K), e.g. mixed by CutMix/MixUp.
    """
    t = soft_targets(target, probs.shape[1]).to(probs.device)
    tp = (probs * t).sum(0)
    f1 = 2 * tp / (probs.sum(0) + t.sum(0)).clamp_min(eps)
    return 1 - f1.mean()


#: One head's part of a loss: its log-probabilities (N, K), soft targets (N, K), class weights.
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _MixedLoss(nn.Module):
    """``(1 - w) * sum of the parts' focal losses + w * mean of their soft-F1 losses``.

    Written once for both head types: a subclass only says what its parts are (the 18-way
    output, or the mask, gender and age marginals) and, in ``nll_parts``, which of them the
    focal term scores (the ordinal age head swaps its age part for two cumulative tasks). With
    w = 0 the soft-F1 term is not computed and the value is the old loss exactly; likewise the
    focal term with w = 1. The soft-F1 term uses the unsmoothed targets: smoothing keeps
    log-loss from chasing infinite logits, a bounded F1 needs no such brake, and smoothed
    targets would cap it below 1.
    """

    multi_head: bool

    def __init__(self, gamma: float, smoothing: float, soft_f1_weight: float) -> None:
        super().__init__()
        self.gamma, self.smoothing = float(gamma), float(smoothing)
        self.soft_f1_weight = float(soft_f1_weight)

    def parts(self, outputs: torch.Tensor, target: torch.Tensor) -> list[Part]:
        raise NotImplementedError

    def nll_parts(self, parts: list[Part]) -> list[Part]:
        """The parts the focal/CE term scores; by default the same as the soft-F1 term's."""
        return parts

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = self.parts(outputs, target)
        w = self.soft_f1_weight
        loss = torch.zeros((), device=outputs.device)
        if w < 1:
            focal = sum(focal_nll(lp, t, cw, self.gamma, self.smoothing)
                        for lp, t, cw in self.nll_parts(parts))
            loss = focal if w == 0 else (1 - w) * focal
        if w > 0:
            f1 = sum(soft_f1_loss(lp.exp(), t) for lp, t, _ in parts) / len(parts)
            loss = loss + w * f1
        return loss


class ClassificationLoss(_MixedLoss):
    """The 18-way loss for the single head: ``outputs`` are logits."""

    multi_head = False

    def __init__(self, weight: torch.Tensor, gamma: float = 0.0, smoothing: float = 0.0,
                 soft_f1_weight: float = 0.0) -> None:
        super().__init__(gamma, smoothing, soft_f1_weight)
        self.register_buffer("weight", weight.float())

    def parts(self, outputs: torch.Tensor, target: torch.Tensor) -> list[Part]:
        return [(F.log_softmax(outputs.float(), dim=1), target, self.weight)]


def head_marginals(values18: torch.Tensor, log: bool) -> tuple[torch.Tensor, ...]:
    """(N, 18) -> mask (N, 3), gender (N, 2), age (N, 3) marginals.

    ``log=True``: log-probabilities, marginalized with logsumexp; else probabilities, summed.
    For the three-head model's output the log marginals are exactly its per-head log-softmaxes.
    """
    v = values18.reshape(-1, NUM_MASK, NUM_GENDER, NUM_AGE)
    reduce = torch.logsumexp if log else torch.sum
    return reduce(v, dim=(2, 3)), reduce(v, dim=(1, 3)), reduce(v, dim=(1, 2))


#: The cumulative age tasks of the ordinal head: the first group of each "age >= ..." event.
AGE_CUTS = tuple(range(1, NUM_AGE))  # (1, 2): age >= 30, age >= 60


def cumulative_age_parts(log_age: torch.Tensor, t_age: torch.Tensor,
                         weights: tuple[torch.Tensor, ...]) -> list[Part]:
    """The age part (log-probs (N, 3), soft targets (N, 3)) as one 2-way part per ``AGE_CUTS``.

    For cut k the part is (log P(group < k), log P(group >= k)) with targets (t(< k), t(>= k))
    summed from the 3-way rows, so soft (mixed) targets give soft cumulative targets, and
    ``weights[j]`` (2,) are that task's class weights. Marginalized with logsumexp: stable.
    """
    return [(torch.stack([torch.logsumexp(log_age[:, :k], 1),
                          torch.logsumexp(log_age[:, k:], 1)], 1),
             torch.stack([t_age[:, :k].sum(1), t_age[:, k:].sum(1)], 1), w)
            for k, w in zip(AGE_CUTS, weights, strict=True)]


class MultiHeadLoss(_MixedLoss):
    """Sum of the mask, gender and age losses for 18-way log-probability ``outputs``; its
    soft-F1 term is the mean of the three heads' soft macro F1 losses on the marginals.

    With ``cumulative_weights`` (the ordinal age head; one (2,) weight tensor per ``AGE_CUTS``)
    the age loss is the sum of the cumulative binary tasks' losses (module docstring).
    """

    multi_head = True

    def __init__(self, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 gamma: float = 0.0, smoothing: float = 0.0, soft_f1_weight: float = 0.0,
                 cumulative_weights: tuple[torch.Tensor, ...] | None = None) -> None:
        super().__init__(gamma, smoothing, soft_f1_weight)
        for name, w in zip(("w_mask", "w_gender", "w_age"), weights, strict=True):
            self.register_buffer(name, w.float())
        self.ordinal = cumulative_weights is not None
        if cumulative_weights is not None:
            for k, w in zip(AGE_CUTS, cumulative_weights, strict=True):
                self.register_buffer(f"w_age_cut{k}", w.float())

    def parts(self, outputs: torch.Tensor, target: torch.Tensor) -> list[Part]:
        heads = head_marginals(outputs.float(), log=True)
        t = head_marginals(soft_targets(target, NUM_CLASSES).to(outputs.device), log=False)
        weights = (self.w_mask, self.w_gender, self.w_age)
        return list(zip(heads, t, weights, strict=True))

    def nll_parts(self, parts: list[Part]) -> list[Part]:
        if not self.ordinal:
            return parts
        (log_age, t_age, _), cuts = parts[2], [getattr(self, f"w_age_cut{k}") for k in AGE_CUTS]
        return parts[:2] + cumulative_age_parts(log_age, t_age, tuple(cuts))


def create_loss(
    cfg: TrainConfig,
    targets: np.ndarray | torch.Tensor,
    multi_head: bool | None = None,
) -> nn.Module:
    """The training loss for ``cfg``; class weights come from ``targets`` (training classes).

    ``multi_head`` defaults to ``cfg.head == "multi"``; pass ``is_multi_head(model)`` to follow
    the model instead. ``cfg.loss == "ce"`` ignores ``focal_gamma``. Move it to the device with
    ``.to(device)`` (weights are buffers); forward takes (outputs, hard or soft targets).
    ``cfg.soft_f1_weight`` mixes in the soft macro-F1 loss, ``cfg.age_head="ordinal"`` scores
    the age head on its cumulative tasks (see the module docstring; three heads only).
    """
    if multi_head is None:
        multi_head = cfg.head == "multi"
    if not multi_head and cfg.age_head != "classes":
        raise ConfigError(f"config field 'age_head': {AGE_HEAD_NEEDS_MULTI} "
                          f"(got {cfg.age_head!r})")
    gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
    t = _checked_targets(targets, NUM_CLASSES)
    if not multi_head:
        w = class_weights(t, cfg.class_weights, cfg.effective_beta, NUM_CLASSES)
        return ClassificationLoss(w, gamma, cfg.label_smoothing, cfg.soft_f1_weight)
    weights = tuple(
        class_weights(np.asarray(p), cfg.class_weights, cfg.effective_beta, k)
        for p, k in zip(decode(t), (NUM_MASK, NUM_GENDER, NUM_AGE), strict=True)
    )
    cumulative = None
    if cfg.age_head == "ordinal":
        age = decode(t)[2]
        cumulative = tuple(class_weights((age >= k).astype(np.int64), cfg.class_weights,
                                         cfg.effective_beta, 2) for k in AGE_CUTS)
    return MultiHeadLoss(weights, gamma, cfg.label_smoothing, cfg.soft_f1_weight, cumulative)
