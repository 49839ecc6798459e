"""CLI: create or resume a study and run trials until it has N finished ones.

``python -m search.run --study demo --trials 20``. ``--trials N`` is the total the study ends
with (complete + pruned), not "N more": rerunning after a crash or Ctrl-C continues to N and
never repeats finished work. The folds, data folder, epochs and corrections are fixed when the
study is created (stored as study user attrs); a rerun that asks for different ones is refused,
since its trials would not be comparable. Expected problems print one line and exit 2 (``--debug``
shows the traceback); Ctrl-C marks the running trial FAIL (Optuna does that), prints the
summary and exits 130.

Many workers: ``--workers N`` starts N processes on the CPU (cores shared equally), ``--gpus
0,1,2,3`` one process per GPU (``CUDA_VISIBLE_DEVICES``); several machines run the same command
against one PostgreSQL ``--storage``. Workers claim trials through ``search.workers``, so the
study still ends with exactly ``--trials`` finished trials, and a dead worker's trial is failed
and retried from its finished folds.

The pruner's report mode is fixed too (``report_mode``: per epoch for median, hyperband and
halving; per fold for wilcoxon): a rerun without ``--pruner`` uses the study's pruner, and a
``--pruner`` that reads steps the other way is refused. A trial that raises (say CUDA out of
memory in one config) is logged, marked FAIL, and the search goes on; five failed trials in a
row stop the worker, and a config or data error stops it at once.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import optuna
from optuna.trial import TrialState

from core.cli import EXPECTED, run_cli
from core.config import ConfigError
from core.engine import default_loader_workers
from core.errors import DataError
from core.weights import WEIGHTS_ENV, check_weights, fingerprint, weights_dir
from search import paths
from search.artifacts import open_store
from search.budget import Budget
from search.objective import (
    DEFAULT_KEEP_CHECKPOINTS,
    CheckpointRetention,
    Objective,
    load_study_data,
)
from search.space import explore, fixed_sampler, override_waiting, parse_fixes, warm_start
from search.storage import (
    DEFAULT_GRACE_S,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_RETRY,
    open_storage,
    study_names,
)
from search.workers import (
    FINISHED,
    TooManyFailures,
    claim_lock,
    launch,
    log,
    run_worker,
    worker_envs,
)
from studies import STUDIES, get_study

#: What a reported step means to each pruner: "epoch" = ``fold * epochs + epoch``, "fold" =
#: ``fold``. "none" prunes nothing, so it reports in whichever mode the study has.
REPORT_MODE = {"median": "epoch", "hyperband": "epoch", "halving": "epoch", "wilcoxon": "fold",
               "none": None}
PRUNERS = tuple(REPORT_MODE)
DEFAULT_PRUNER = {"epoch": "median", "fold": "wilcoxon"}
SAMPLERS = ("tpe", "random", "gp")
#: Study user attrs that fix what a trial means; a rerun may not change them. ``report_mode``
#: and ``corrections`` have no flag of their own: a rerun always takes the stored ones.
FIXED_ATTRS = ("n_folds", "fold_seed", "data_dir", "epochs", "report_mode", "corrections",
               "fixed", "weights")
#: The flag that sets each fixed study attr, for the refusal message.
FLAGS = {"n_folds": "--folds", "data_dir": "--data", "epochs": "--epochs", "fixed": "--fix",
         "corrections": "--corrections", "weights": "--weights"}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = positive_int(text) if text.strip() != "0" else 0
    return value


def gpu_list(text: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(
            f"expected distinct GPU numbers like 0,1,2,3, got {text!r}")
    return gpus


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.run", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help=f"study name, one of: {', '.join(STUDIES)}")
    p.add_argument("--trials", type=positive_int, required=True,
                   help="finished (complete + pruned) trials the study should end with")
    p.add_argument("--data", help="data folder (default: the study's; mask: $MASK_DATA)")
    p.add_argument("--storage", help="sqlite:///FILE, postgresql://..., or FILE.log (journal); "
                                     "default sqlite:///runs/<study>.db")
    p.add_argument("--artifacts", help="artifact folder or s3://bucket/prefix "
                                       "(default runs/artifacts)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=positive_float,
                        help="time budget: no trial starts that the study's record says cannot "
                             "finish in time, and at the deadline the running trial stops at "
                             "its next epoch (FAIL 'time budget', resumed by a rerun)")
    budget.add_argument("--timeout", type=positive_float, help="the same budget in seconds")
    p.add_argument("--pruner", choices=PRUNERS,
                   help="default: median for a new study; on a rerun, the study's own pruner "
                        "(its report mode is fixed when it is created: wilcoxon reports per "
                        "fold, the others per epoch)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--seed", type=int, help="sampler seed (default: random)")
    p.add_argument("--folds", type=positive_int,
                   help="folds (fixed when the study is created; default the study's)")
    p.add_argument("--epochs", type=positive_int,
                   help="epochs per fold (fixed when the study is created; default the study's)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--weights", help=f"folder of pretrained weights named by timm model name "
                                     f"(DIR/resnet34.safetensors; from python -m search.weights); "
                                     f"default ${WEIGHTS_ENV}, else the Hugging Face cache")
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a parameter of the study's space and search the rest (repeatable; "
                        "fixed when the study is created)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="do not enqueue the study's known-good recipes as its first trials")
    p.add_argument("--corrections", metavar="FILE|none",
                   help="label corrections CSV, or none (fixed when the study is created; "
                        "default the study's: mask uses the shipped public list)")
    p.add_argument("--loader-workers", type=non_negative_int,
                   help="DataLoader worker processes per training process (default: on CUDA "
                        "(cores / processes) - 1, at most 12; on the CPU 0)")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=DEFAULT_KEEP_CHECKPOINTS,
                   help="keep fold checkpoints of the best K complete trials (default %(default)s)")
    many = p.add_mutually_exclusive_group()
    many.add_argument("--workers", type=positive_int, default=1,
                      help="worker processes on the CPU, sharing its cores (default 1)")
    many.add_argument("--gpus", type=gpu_list,
                      help="one worker process per GPU, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--heartbeat-interval", type=positive_int, default=DEFAULT_HEARTBEAT_S,
                   help="SQLite/PostgreSQL: seconds between a running trial's heartbeats "
                        "(default %(default)s)")
    p.add_argument("--grace-period", type=positive_int, default=DEFAULT_GRACE_S,
                   help="seconds without a heartbeat before a trial counts as dead, is marked "
                        "FAIL and retried (default %(default)s)")
    p.add_argument("--max-retry", type=non_negative_int, default=DEFAULT_MAX_RETRY,
                   help="retries of a trial whose worker died (default %(default)s)")
    p.add_argument("--worker-id", type=non_negative_int, help=argparse.SUPPRESS)
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, n_steps: int, n_folds: int,
                n_startup_trials: int = 3) -> optuna.pruners.BasePruner:
    """``n_steps`` = folds * epochs: the last step any trial reports (epoch mode)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_steps,
                                              reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "wilcoxon":
        return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=min(2, n_folds))
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


def _fixed_settings(study: optuna.Study, wanted: dict, given: set[str]) -> dict:
    """Store the study's fixed settings on creation; on resume, refuse changed ones.

    Settings the user did not pass on the command line are taken from the study, so
    ``--trials 30`` alone resumes a study created with ``--folds 3 --data X``.
    """
    stored = study.user_attrs
    if "n_folds" not in stored:
        for key, value in wanted.items():
            study.set_user_attr(key, value)
        return dict(wanted)
    settled = dict(wanted)
    for key in FIXED_ATTRS:
        if key not in stored:  # a study from before the key existed: it is fixed from now on
            study.set_user_attr(key, wanted[key])
            continue
        if key in given and stored[key] != wanted[key]:
            if key == "weights":
                raise ConfigError(
                    f"study {study.study_name!r} was created with other pretrained weights "
                    f"({_weights_text(stored[key])}); these are {_weights_text(wanted[key])}: "
                    "pass --weights with the study's files (or use a new --study name)")
            raise ConfigError(
                f"study {study.study_name!r} was created with {key}={stored[key]!r}; "
                f"{FLAGS.get(key, key)} {wanted[key]!r} would make its trials incomparable "
                "(use a new --study name, or drop the flag)")
        settled[key] = stored[key]
    return settled


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


def count(study: optuna.Study, states: Sequence[TrialState]) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def next_commands(study_name: str, storage: str | None, artifacts: str | None) -> list[str]:
    """The two commands a user runs after a search, with the storage and artifact flags this run
    used when they were not the defaults (so they open the same study)."""
    flags = "".join(f" {flag} {shlex.quote(value)}" for flag, value in
                    (("--storage", storage), ("--artifacts", artifacts)) if value)
    return [f"look at it  python -m search.dashboard --study {study_name}{flags}",
            f"submission  python -m search.ensemble --study {study_name}{flags}"]


def summary(study: optuna.Study, seconds: float, trials_asked: int,
            storage: str | None = None, artifacts: str | None = None) -> str:
    """The short table printed at the end (also after Ctrl-C), ending with what to run next."""
    n = {s: count(study, (s,)) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                         TrialState.FAIL)}
    lines = [f"study      {study.study_name}",
             f"trials     {n[TrialState.COMPLETE]} complete, {n[TrialState.PRUNED]} pruned, "
             f"{n[TrialState.FAIL]} failed ({n[TrialState.COMPLETE] + n[TrialState.PRUNED]} "
             f"finished of {trials_asked} asked)"]
    if n[TrialState.COMPLETE]:
        best = study.best_trial
        lines.append(f"best       trial {best.number}: macro F1 {best.value:.4f}")
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in best.params.items())
        lines.append(f"params     {params}")
    else:
        lines.append("best       none yet (no complete trial)")
    lines.append(f"wall time  {seconds:.1f} s")
    return "\n".join([*lines, *next_commands(study.study_name, storage, artifacts)])


def resolve_data(module: ModuleType, data: str | None) -> Path:
    path = Path(data) if data else module.default_data(paths.runs_dir())
    if not path.is_dir():
        raise DataError(f"data folder {str(path)!r} does not exist")
    return path.resolve()


def child_argv(argv: Sequence[str], worker_id: int, gpu: bool) -> list[str]:
    """A worker's command line: the parent's, without --workers/--gpus, plus its id."""
    out: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in ("--workers", "--gpus"):
            skip = True
            continue
        if token.startswith(("--workers=", "--gpus=")):
            continue
        out.append(token)
    return [*out, "--worker-id", str(worker_id), *(["--device", "cuda"] if gpu else [])]


def _settle(args: argparse.Namespace, module: ModuleType, storage, name: str) -> dict:
    """This run's fixed settings: the stored ones on a rerun (changed ones refused), the asked
    ones for a new study. Every check runs before the study is created, so a refused run
    stores nothing and the suggested rerun is not refused as "different settings"."""
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
    return {
        "report_mode": pruner_mode(args.pruner),
        "pruner": args.pruner or "median",
        "n_folds": args.folds or module.FOLDS,
        "fold_seed": module.FOLD_SEED,
        "data_dir": str(data_dir),
        "epochs": args.epochs or module.EPOCHS,
        "corrections": str(corrections) if corrections else None,
        "fixed": fixed,
        "weights": fingerprint(folder, backbones) if folder else None,
        "study_module": module.__name__,
        "_weights_dir": folder,
    }


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    name = paths.check_study_name(args.study)
    module = get_study(name)
    storage_url = args.storage or paths.default_storage_url(name)
    storage = open_storage(storage_url, heartbeat_interval=args.heartbeat_interval,
                           grace_period=args.grace_period, max_retry=args.max_retry)
    worker = args.worker_id is not None
    if worker:  # Ctrl-C arrives forwarded by the parent; a shell may have started us ignoring it
        signal.signal(signal.SIGINT, signal.default_int_handler)
    given = {k for k, flag in (("n_folds", args.folds), ("data_dir", args.data),
                               ("epochs", args.epochs), ("fixed", args.fix or None),
                               ("corrections", args.corrections)) if flag is not None}
    wanted = _settle(args, module, storage, name)
    folder = wanted.pop("_weights_dir")
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                load_if_exists=True)
    # Offset by the trials already there: a resumed run with the same --seed must not replay
    # the first run's suggestions (a seeded sampler in a fresh process starts over); workers
    # started together see the same count, so each also gets its own offset.
    started = len(study.get_trials(deepcopy=False)) - count(study, (TrialState.WAITING,))
    seed = (None if args.seed is None
            else args.seed + started + 7919 * (args.worker_id or 0))
    created = "n_folds" not in study.user_attrs
    fixed = _fixed_settings(study, wanted, given | {"weights"})
    if created and not args.no_warm_start:  # the study's known-good recipes go first, once
        for params in warm_start(module, fixed["fixed"]):
            study.enqueue_trial(params)
    study.sampler = fixed_sampler(make_sampler(args.sampler, seed), fixed["fixed"])
    override_waiting(study, storage, fixed["fixed"])
    data_dir = Path(fixed["data_dir"])
    if not data_dir.is_dir():
        raise DataError(f"data folder {str(data_dir)!r} (stored on study {name!r}) does not exist")
    n_folds, epochs = int(fixed["n_folds"]), int(fixed["epochs"])
    mode = str(fixed["report_mode"])
    pruner = settle_pruner(name, args.pruner, mode, study.user_attrs.get("pruner"))
    study.pruner = make_pruner(pruner, n_folds * epochs, n_folds)

    t0 = time.perf_counter()
    budget_s = args.hours * 3600 if args.hours else args.timeout
    budget = Budget.of(budget_s)

    def report() -> str:
        return summary(study, time.perf_counter() - t0, args.trials, args.storage, args.artifacts)

    finished = count(study, FINISHED)
    if finished >= args.trials:
        if not worker:
            print(f"study {name!r} already has {finished} finished trials (asked {args.trials}); "
                  "nothing to do")
            print(report())
        return 0
    n_workers = len(args.gpus) if args.gpus else args.workers
    loader_workers = (args.loader_workers if args.loader_workers is not None else
                      default_loader_workers(args.device or _auto_device(), n_workers))
    if not worker:
        print(f"study {name!r}: {finished} finished, running until {args.trials} "
              f"({storage_url}{f', {n_workers} workers' if n_workers > 1 else ''})", flush=True)
    if n_workers > 1 and not worker:
        codes = launch([[*child_argv(argv, i, bool(args.gpus)), "--loader-workers",
                         str(loader_workers)] for i in range(n_workers)],
                       worker_envs(args.gpus, n_workers))
        print(report(), flush=True)
        if any(c in (130, -2) for c in codes):
            return 130
        if count(study, FINISHED) >= args.trials:
            return 0
        return next((c for c in codes if c > 0), 1)
    data = load_study_data(data_dir, fixed["corrections"], n_folds, int(fixed["fold_seed"]),
                           faces=getattr(module, "FACES", None), progress=args.progress)
    store = open_store(args.artifacts or paths.default_artifacts_dir())
    objective = Objective(module, data, store, epochs=epochs, device=args.device,
                          per_fold=mode == "fold", progress=args.progress, weights=folder,
                          loader_workers=loader_workers, fixed=fixed["fixed"], budget=budget)
    callbacks = [CheckpointRetention(store, keep=args.keep_checkpoints)]
    interrupted = False
    try:
        run_worker(study, objective, args.trials, lock=claim_lock(storage, storage_url, name),
                   callbacks=callbacks, budget=budget, max_retry=args.max_retry,
                   poll_s=min(2.0, float(args.heartbeat_interval)))
    except TooManyFailures:
        if not worker:
            print(report(), flush=True)
        raise
    except KeyboardInterrupt:
        interrupted = True
        if not worker:
            print("\ninterrupted: the running trial is marked FAIL; rerun the same command to "
                  "continue", file=sys.stderr)
    if not worker and budget is not None and count(study, FINISHED) < args.trials:
        print(f"time budget reached ({budget_s / 3600:.2f} h): no trial left that can finish in "
              "time; rerun with more --hours to continue (a stopped trial resumes from its "
              "finished folds)", flush=True)
    if not worker:
        print(report(), flush=True)
    return 130 if interrupted else 0


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.debug:  # failed trials' tracebacks (logged at debug level)
        log.setLevel(logging.DEBUG)
    return run_cli(lambda: run(args, argv), args.debug, expected=(*EXPECTED, TooManyFailures))


if __name__ == "__main__":
    sys.exit(main())
