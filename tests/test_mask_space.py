"""Every configuration the ``mask`` study can sample validates and builds.

Why: the mask space is define-by-run with conditional branches (focal gamma, effective-number
beta, mix probability, SGD's learning-rate range, warmup outside one-cycle). A typo on a rarely
taken branch would otherwise surface on a user's GPU hours into a search. So this draws 300
configurations with the random sampler (every branch, uniformly) and 50 with TPE (which, once it
models, concentrates on other corners and edges of the ranges), and for each one validates the
config and builds what a trial builds: the loss, the optimizer, the scheduler (walked over a
whole run) and the model, forwarded on one tiny batch.

Models are built once per (backbone, head, age head) and reused: ``drop_rate`` does not change
shapes, and building convnext_tiny ~350 times would cost minutes. The input is 64x48, the
smallest 4:3 size every backbone of the space accepts (convnext downsamples by 32 with 2x2
kernels).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import optuna
import pytest
import torch

# The builders a trial uses, imported in one place: a restructuring that renames them changes
# only these lines.
from core.augment import create_mixup, mix_batch
from core.config import TrainConfig
from core.labels import NUM_CLASSES
from core.losses import create_loss
from core.models import create_model
from core.optim import create_optimizer, create_scheduler
from studies import mask

RANDOM_DRAWS = 300
TPE_DRAWS = 50
INPUT_SHAPE = (2, 3, 64, 48)  # (batch, channels, height, width)
STEPS_PER_EPOCH = 3  # enough for warmup, one-cycle phases and step decay to show in the walk
#: Training targets for the class weights: every class present, imbalanced like the real set.
TARGETS = np.repeat(np.arange(NUM_CLASSES), np.arange(1, NUM_CLASSES + 1))

Space = Callable[[optuna.Trial], TrainConfig]


class ModelCache:
    """One model and its tiny-batch output per (backbone, head, age head), built on first use."""

    def __init__(self) -> None:
        self.models: dict[tuple[str, str, str], torch.nn.Module] = {}
        self.outputs: dict[tuple[str, str, str], torch.Tensor] = {}

    def get(self, cfg: TrainConfig) -> tuple[torch.nn.Module, torch.Tensor]:
        """The model for ``cfg`` (without pretrained weights: tests never download) and its
        output on a fixed batch, checked for shape and finiteness once."""
        key = (cfg.backbone, cfg.head, cfg.age_head)
        if key not in self.models:
            model = create_model(dataclasses.replace(cfg, pretrained=False)).eval()
            with torch.no_grad():
                out = model(torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(0)))
            assert out.shape == (INPUT_SHAPE[0], NUM_CLASSES), (key, tuple(out.shape))
            assert torch.isfinite(out).all(), key
            self.models[key], self.outputs[key] = model, out
        return self.models[key], self.outputs[key]


def check_loss(cfg: TrainConfig, outputs: torch.Tensor) -> None:
    """The config's loss on the model's outputs, with hard targets and after its CutMix/MixUp,
    is finite and gives finite gradients."""
    criterion = create_loss(cfg, TARGETS)
    y = torch.tensor([0, NUM_CLASSES - 1])
    x = torch.zeros(2, 3, 8, 6)  # only the targets matter here; a small image mixes faster
    _, soft = mix_batch(x, y, create_mixup(dataclasses.replace(cfg, mix_prob=1.0)))
    for target in (y, soft):
        logits = outputs.clone().requires_grad_(True)
        loss = criterion(logits, target)
        loss.backward()
        assert torch.isfinite(loss), (cfg, loss)
        assert torch.isfinite(logits.grad).all(), cfg


def check_schedule(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """The optimizer builds on the real model's parameters, and the scheduler walks the whole run
    (``epochs * STEPS_PER_EPOCH`` steps) with finite learning rates in [0, lr].

    The walk uses an optimizer over one spare parameter: stepping Adam on a ResNet-50 350 times
    would dominate the test, and the schedule does not depend on which parameters it drives.
    """
    create_optimizer(cfg, model.parameters())
    spare = torch.nn.Parameter(torch.zeros(1))
    optimizer = create_optimizer(cfg, [spare])
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=STEPS_PER_EPOCH)
    lrs = []
    for _ in range(cfg.epochs * STEPS_PER_EPOCH):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(math.isfinite(v) and 0 <= v <= cfg.lr * (1 + 1e-9) for v in lrs), (cfg, lrs)
    assert max(lrs) > 0, cfg


def check_fields_follow_params(cfg: TrainConfig, params: dict[str, Any]) -> None:
    """A sampled parameter named like a config field reaches that field unchanged: a branch that
    suggests ``focal_gamma`` but passes another value would search a knob that does nothing."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, value in params.items():
        if name in fields and not isinstance(getattr(cfg, name), tuple):
            assert getattr(cfg, name) == value, (name, value, getattr(cfg, name))


def fake_value(params: dict[str, Any]) -> float:
    """A deterministic objective for TPE to model: prefers some choices and low numbers."""
    score = sum(float(v) for v in params.values() if isinstance(v, int | float))
    score += sum(len(str(v)) for v in params.values() if isinstance(v, str))
    return -score


def draw(space: Space, sampler: optuna.samplers.BaseSampler, n: int, models: ModelCache,
         tell: bool) -> list[optuna.trial.FrozenTrial]:
    """``n`` configurations of ``space``, each validated and built; the trials that made them."""
    study = optuna.create_study(sampler=sampler)
    for _ in range(n):
        trial = study.ask()
        cfg = space(trial).validate()
        check_fields_follow_params(cfg, trial.params)
        model, outputs = models.get(cfg)
        check_loss(cfg, outputs)
        check_schedule(cfg, model)
        study.tell(trial, fake_value(trial.params) if tell else 0.0)
    return study.trials


@pytest.fixture(scope="module")
def models() -> ModelCache:
    """Shared by both draws, so each (backbone, head) is built once in the whole module."""
    return ModelCache()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """Two threads on two busy cores are several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def quiet_optuna() -> None:
    """One INFO line per told trial would bury a failure in the captured log."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


@pytest.mark.slow
def test_random_draws_validate_build_and_cover_the_space(models: ModelCache) -> None:
    trials = draw(mask.space, optuna.samplers.RandomSampler(seed=0), RANDOM_DRAWS, models,
                  tell=False)
    seen: dict[str, set] = defaultdict(set)
    choices: dict[str, tuple] = {}
    for t in trials:
        for name, value in t.params.items():
            seen[name].add(value)
            dist = t.distributions[name]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                choices[name] = dist.choices
            elif isinstance(dist, optuna.distributions.IntDistribution):
                choices[name] = tuple(range(dist.low, dist.high + 1, dist.step))
    # An independent check that the draws reached every branch: each choice of every
    # categorical (and integer) parameter came up at least once.
    for name, allowed in choices.items():
        assert seen[name] == set(allowed), (name, set(allowed) - seen[name])
    assert seen["backbone"] == set(mask.BACKBONES)
    assert {tuple(mask.IMAGE_SIZES[s]) for s in seen["image_size"]} == set(
        mask.IMAGE_SIZES.values())


def test_tpe_draws_validate_and_build(models: ModelCache) -> None:
    trials = draw(mask.space, optuna.samplers.TPESampler(seed=0, n_startup_trials=10),
                  TPE_DRAWS, models, tell=True)
    assert len(trials) == TPE_DRAWS
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_a_broken_rare_branch_is_caught(models: ModelCache) -> None:
    """The checks above would catch a typo on a branch only some draws take: here the
    effective-number branch passes a beta of 1 (no weights at all), which validate refuses."""

    def broken(trial: optuna.Trial) -> TrainConfig:
        cfg = mask.space(trial)
        if cfg.class_weights == "effective" and cfg.loss == "focal":
            return dataclasses.replace(cfg, effective_beta=1.0)
        return cfg

    with pytest.raises(ValueError, match="effective_beta"):
        draw(broken, optuna.samplers.RandomSampler(seed=1), RANDOM_DRAWS, models, tell=False)
