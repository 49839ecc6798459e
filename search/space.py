"""What a study's define-by-run space can suggest, and ``--fix NAME=VALUE`` on top of it.

A define-by-run space has no list of its parameters, so it is explored by sampling: a few
hundred random trials in memory (milliseconds each) give every name it suggests, the
distributions behind it, and the configs it returns (e.g. the pretrained backbones it can still
pick once some parameters are fixed). ``--fix`` pins parameters with Optuna's
``PartialFixedSampler`` around the study's sampler; a name the space never suggests, or a value
no branch accepts, is refused before any work; a value only some branches accept (``lr`` on the
SGD branch of the mask space) stops the first trial that suggests it on another branch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from core.config import ConfigError, TrainConfig

#: Random draws used to explore a space: enough to see every branch of the studies we ship.
EXPLORE_TRIALS = 300


@dataclass
class SpaceSample:
    """What sampling a space saw: each parameter's distributions, and the configs returned."""

    distributions: dict[str, list[BaseDistribution]] = field(default_factory=dict)
    configs: list[TrainConfig] = field(default_factory=list)

    def pretrained_backbones(self) -> list[str]:
        return sorted({c.backbone for c in self.configs if c.pretrained})


def fixed_sampler(base: optuna.samplers.BaseSampler,
                  fixed: dict[str, Any]) -> optuna.samplers.BaseSampler:
    """``base`` with ``fixed`` pinned (``PartialFixedSampler``; ``base`` itself when none)."""
    if not fixed:
        return base
    with warnings.catch_warnings():  # experimental since Optuna 2.4 and stable in use since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.PartialFixedSampler(fixed, base)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """No "study created" log line per in-memory study, no warning for out-of-range fixes
    (``check_fixed`` reports those as one line)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def explore(module: ModuleType, fixed: dict[str, Any] | None = None,
            n: int = EXPLORE_TRIALS, seed: int = 0) -> SpaceSample:
    """Sample ``module.space`` ``n`` times (in memory; ``fixed`` pinned) and record what it did."""
    seen = SpaceSample()
    with _quiet_optuna():
        study = optuna.create_study(
            sampler=fixed_sampler(optuna.samplers.RandomSampler(seed=seed), fixed or {}))
        for _ in range(n):
            trial = study.ask()
            seen.configs.append(module.space(trial))
            for name, dist in trial.distributions.items():
                known = seen.distributions.setdefault(name, [])
                if dist not in known:
                    known.append(dist)
            study.tell(trial, 0.0)
    return seen


def _accepts(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "one of " + ", ".join(map(str, dist.choices))
    assert isinstance(dist, FloatDistribution | IntDistribution)
    return f"{dist.low:g}..{dist.high:g}"


def _contains(dist: BaseDistribution, value: Any) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _parse_value(name: str, text: str, dists: Sequence[BaseDistribution]) -> Any:
    """``text`` as the type the space suggests ``name`` with; refused when no branch takes it."""
    for dist in dists:
        if isinstance(dist, CategoricalDistribution):
            match = [c for c in dist.choices if str(c) == text]
            if match:
                return match[0]
            continue
        try:
            value = int(text) if isinstance(dist, IntDistribution) else float(text)
        except ValueError:
            continue
        if _contains(dist, value):
            return value
    accepts = "; or ".join(sorted({_accepts(d) for d in dists}))
    raise ConfigError(f"--fix {name}={text}: {name} accepts {accepts}")


def parse_fixes(module: ModuleType, texts: Sequence[str]) -> dict[str, Any]:
    """``["backbone=resnet18", "lr=3e-4"]`` -> typed values; one line for a bad name or value."""
    if not texts:
        return {}
    seen = explore(module)
    fixed: dict[str, Any] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--fix {text!r}: expected NAME=VALUE, e.g. backbone=resnet18")
        if name not in seen.distributions:
            raise ConfigError(f"--fix {name}: study {module.__name__.split('.')[-1]!r} never "
                              f"suggests {name!r}; it suggests: "
                              f"{', '.join(sorted(seen.distributions))}")
        fixed[name] = _parse_value(name, value.strip(), seen.distributions[name])
    return fixed


def check_fixed(trial: optuna.Trial, fixed: dict[str, Any]) -> None:
    """Stop a trial whose branch cannot take a fixed value (one line: what it accepts there)."""
    for name, value in fixed.items():
        dist = trial.distributions.get(name)
        if dist is not None and not _contains(dist, value):
            branch = ", ".join(f"{k}={v}" for k, v in trial.params.items()
                               if k != name and isinstance(v, str))
            raise ConfigError(f"--fix {name}={value}: on this branch of the space ({branch}) "
                              f"{name} accepts {_accepts(dist)}")


def override_waiting(study: optuna.Study, storage: optuna.storages.BaseStorage,
                     fixed: dict[str, Any]) -> None:
    """``--fix`` wins over enqueued trials: Optuna applies an enqueued trial's params before the
    sampler's, so the fixed values are written into every waiting trial's params."""
    if not fixed:
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        params = t.system_attrs.get("fixed_params", {})
        if any(params.get(k, v) != v for k, v in fixed.items()):
            storage.set_trial_system_attr(t._trial_id, "fixed_params",
                                                 {**params, **fixed})


def fits(module: ModuleType, params: dict[str, Any]) -> bool:
    """Whether the space takes exactly ``params`` (each one suggested, each value in range)."""
    with _quiet_optuna():
        study = optuna.create_study(
            sampler=fixed_sampler(optuna.samplers.RandomSampler(0), params))
        trial = study.ask()
        module.space(trial)
    return set(params) <= set(trial.distributions) and all(
        _contains(trial.distributions[k], v) for k, v in params.items())


def warm_start(module: ModuleType, fixed: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's known-good recipes (``WARM_START``) with ``--fix`` applied on top; a recipe the
    fixes make impossible (a value the fixed branch excludes) is left out."""
    recipes = [{**recipe, **fixed} for recipe in getattr(module, "WARM_START", ())]
    return [r for r in recipes if fits(module, r)]
