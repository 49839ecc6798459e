"""A study's fixed settings: what a trial means, fixed when the study is created.

The folds, data folder, epochs, corrections, ``--fix`` values, pretrained weights (their
fingerprint) and the pruner's report mode are stored as study user attrs when a study is
created; a rerun that asks for different ones is refused, since its trials would not be
comparable, and a rerun that does not ask takes the stored ones. Every check runs before the
study is created, so a refused run stores nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import optuna

from core.config import ConfigError
from core.errors import DataError
from core.weights import check_weights, fingerprint, weights_dir
from search import paths
from search.space import explore, parse_fixes
from search.worker.stage import SearchOnlyPruner
from search.worker.storage import study_names

if TYPE_CHECKING:
    from core.study_data import StudyData

#: What a reported step means to each pruner: "epoch" = ``fold * epochs + epoch``, "fold" =
#: ``fold``. "none" prunes nothing, so it reports in whichever mode the study has.
REPORT_MODE = {"median": "epoch", "hyperband": "epoch", "halving": "epoch", "wilcoxon": "fold",
               "none": None}
PRUNERS = tuple(REPORT_MODE)


def pruning_step(per_fold: bool, fold: int, epoch: int, epochs: int) -> int:
    """The step a value is reported at: ``fold`` per fold, else ``fold * epochs + epoch``
    (so step ``s`` means the same amount of training in every trial of a study)."""
    return fold if per_fold else fold * epochs + epoch


def n_steps(n_folds: int, epochs: int) -> int:
    """Steps a whole trial reports in epoch mode: what hyperband's ``max_resource`` is."""
    return n_folds * epochs

DEFAULT_PRUNER = {"epoch": "median", "fold": "wilcoxon"}
SAMPLERS = ("tpe", "random", "gp")
#: Study user attrs that fix what a trial means; a rerun may not change them. ``report_mode``
#: and ``corrections`` have no flag of their own: a rerun always takes the stored ones.
FIXED_ATTRS = ("n_folds", "fold_seed", "data_dir", "epochs", "report_mode", "corrections",
               "fixed", "weights")
#: The flag that sets each fixed study attr, for the refusal message.
FLAGS = {"n_folds": "--folds", "data_dir": "--data", "epochs": "--epochs", "fixed": "--fix",
         "corrections": "--corrections", "weights": "--weights"}


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What a trial of the study means, fixed when the study is created and stored on it as
    user attrs (``FIXED_ATTRS``, plus the pruner it was made with and its module): read by
    field, never by string key."""

    n_folds: int
    fold_seed: int
    data_dir: str
    epochs: int
    report_mode: str
    corrections: str | None
    fixed: dict[str, Any]
    weights: dict | None
    pruner: str = "median"
    study_module: str = ""

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StudySettings:
        """From a study's user attrs (or ``to_attrs``' dict)."""
        return cls(n_folds=int(attrs["n_folds"]), fold_seed=int(attrs["fold_seed"]),
                   data_dir=str(attrs["data_dir"]), epochs=int(attrs["epochs"]),
                   report_mode=str(attrs.get("report_mode") or "epoch"),
                   corrections=attrs.get("corrections"), fixed=dict(attrs.get("fixed") or {}),
                   weights=attrs.get("weights"), pruner=str(attrs.get("pruner") or "median"),
                   study_module=str(attrs.get("study_module") or ""))

    @classmethod
    def of(cls, data: StudyData, epochs: int, *, per_fold: bool = False,
           fixed: dict[str, Any] | None = None, fold_seed: int = 0) -> StudySettings:
        """Settings of a study made in code over ``data`` (benches, tests), not by search.run;
        ``fold_seed`` is only recorded (``data``'s folds are already drawn)."""
        return cls(n_folds=data.n_folds, fold_seed=fold_seed, data_dir=str(data.data_dir),
                   epochs=int(epochs), report_mode="fold" if per_fold else "epoch",
                   corrections=None, fixed=dict(fixed or {}), weights=None)

    def to_attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def per_fold(self) -> bool:
        """Whether the pruner reads one value per fold (else one per epoch of each fold)."""
        return self.report_mode == "fold"

    def step(self, fold: int, epoch: int) -> int:
        """The pruning step of ``epoch`` of ``fold`` (``pruning_step``)."""
        return pruning_step(self.per_fold, fold, epoch, self.epochs)

    @property
    def n_steps(self) -> int:
        return n_steps(self.n_folds, self.epochs)


def create_sampler(name: str, seed: int | None,
                   group: bool = False) -> optuna.samplers.BaseSampler:
    """``group``: TPE samples each set of parameters that occur together jointly (measured in
    bench.search's ``+group`` arms; off by default, see the README)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if not group:
        return optuna.samplers.TPESampler(seed=seed)  # Optuna 5: multivariate by default
    with warnings.catch_warnings():  # group is experimental in Optuna 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, group=True)


def create_pruner(name: str, n_steps: int, n_folds: int,
                n_startup_trials: int = 3) -> optuna.pruners.BasePruner:
    """``n_steps`` = folds * epochs: the last step any trial reports (epoch mode).

    Median and wilcoxon read other trials' values, so they see search trials only
    (``SearchOnlyPruner``); halving and hyperband compare only trials they were asked about, which
    final-stage trials never are (hyperband also stays itself: Optuna's samplers look for it).
    """
    if name == "median":
        return SearchOnlyPruner(optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials,
                                                            n_warmup_steps=1))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_steps,
                                              reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "wilcoxon":
        with warnings.catch_warnings():  # experimental since Optuna 3.6; the k-fold pruner
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return SearchOnlyPruner(optuna.pruners.WilcoxonPruner(
                p_threshold=0.1, n_startup_steps=min(2, n_folds)))
    return optuna.pruners.NopPruner()


def pruner_mode(name: str | None) -> str:
    """The report mode a new study created with pruner ``name`` gets."""
    return REPORT_MODE.get(name or "median") or "epoch"


def settle_pruner(study_name: str, asked: str | None, mode: str, created_with: str | None) -> str:
    """The pruner this run uses: ``asked`` if it reads steps the study's way, else refuse.

    Without ``--pruner``: the pruner the study was created with, or the mode's default.
    """
    if asked is None:
        return created_with if created_with in PRUNERS and \
            REPORT_MODE[created_with] in (None, mode) else DEFAULT_PRUNER[mode]
    if REPORT_MODE[asked] not in (None, mode):
        compatible = ", ".join(p for p, m in REPORT_MODE.items() if m in (None, mode))
        raise ConfigError(
            f"study {study_name!r} reports one value per {mode} (report_mode={mode!r}); "
            f"--pruner {asked} reads steps per {REPORT_MODE[asked]}, which would mix step "
            f"meanings (use one of {compatible}, or a new --study name)")
    return asked


def fixed_settings(study: optuna.Study, wanted: StudySettings,
                   given: set[str]) -> StudySettings:
    """Store the study's fixed settings on creation; on resume, refuse changed ones.

    Settings the user did not pass on the command line are taken from the study, so
    ``--trials 30`` alone resumes a study created with ``--folds 3 --data X``.
    """
    stored, asked = study.user_attrs, wanted.to_attrs()
    if "n_folds" not in stored:
        for key, value in asked.items():
            study.set_user_attr(key, value)
        return wanted
    settled = dict(asked)
    for key in FIXED_ATTRS:
        if key not in stored:  # a study from before the key existed: it is fixed from now on
            study.set_user_attr(key, asked[key])
            continue
        if key in given and stored[key] != asked[key]:
            if key == "weights":
                raise ConfigError(
                    f"study {study.study_name!r} was created with other pretrained weights "
                    f"({_weights_text(stored[key])}); these are {_weights_text(asked[key])}: "
                    "pass --weights with the study's files (or use a new --study name)")
            raise ConfigError(
                f"study {study.study_name!r} was created with {key}={stored[key]!r}; "
                f"{FLAGS.get(key, key)} {asked[key]!r} would make its trials incomparable "
                "(use a new --study name, or drop the flag)")
        settled[key] = stored[key]
    return StudySettings.from_attrs(settled)


def _weights_text(fingerprint: dict | None) -> str:
    if not fingerprint:
        return "the Hugging Face cache"
    return ", ".join(f"{n} sha256 {v['sha256'][:12]}" for n, v in sorted(fingerprint.items()))


def resolve_corrections(module: ModuleType, data_dir: Path, given: str | None) -> Path | None:
    """``--corrections FILE|none``, else the study's default for this data folder."""
    if given is None:
        return module.corrections(data_dir)
    if given.lower() == "none":
        return None
    path = Path(given).expanduser()
    if not path.is_file():
        raise DataError(f"corrections file {given!r} does not exist (--corrections FILE|none)")
    return path.resolve()


def resolve_data(module: ModuleType, data: str | None) -> Path:
    path = Path(data) if data else module.default_data(paths.runs_dir())
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist")
    return path.resolve()


def settle(args: argparse.Namespace, module: ModuleType, storage,
           name: str) -> tuple[StudySettings, Path | None]:
    """This run's fixed settings and its local weights folder: the stored settings on a rerun
    (changed ones refused), the asked ones for a new study. Every check runs before the study
    is created, so a refused run stores nothing and the suggested rerun is not refused as
    "different settings"."""
    stored = (optuna.load_study(study_name=name, storage=storage).user_attrs
              if name in study_names(storage) else {})
    if "data_dir" in stored and args.data is None:
        data_dir = Path(stored["data_dir"])
    else:
        data_dir = resolve_data(module, args.data)
    fixed = parse_fixes(module, args.fix) if args.fix else stored.get("fixed") or {}
    corrections = resolve_corrections(module, data_dir, args.corrections)
    folder = weights_dir(args.weights)
    backbones = explore(module, fixed).pretrained_backbones()
    if args.worker_id is None:  # a missing download fails now, not after the cache is built
        check_weights(backbones, folder, name)
    return StudySettings(
        report_mode=pruner_mode(args.pruner), pruner=args.pruner or "median",
        n_folds=args.folds or module.FOLDS, fold_seed=module.FOLD_SEED,
        data_dir=str(data_dir), epochs=args.epochs or module.EPOCHS,
        corrections=str(corrections) if corrections else None, fixed=fixed,
        weights=fingerprint(folder, backbones) if folder else None,
        study_module=module.__name__), folder
