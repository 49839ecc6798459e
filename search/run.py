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
against one PostgreSQL ``--storage``. Workers claim trials through ``search.worker.claims``, so the
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
import dataclasses
import logging
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import optuna
from optuna.trial import TrialState

from core.cli import EXPECTED, run_cli
from core.errors import DataError
from core.loader import default_loader_workers
from core.study_data import load_study_data
from search import paths
from search.artifacts import open_store
from search.log import log
from search.objective import Machine, Objective
from search.run_args import build_parser
from search.space import fixed_sampler, override_waiting, warm_start
from search.study_settings import (
    StudySettings,
    create_pruner,
    create_sampler,
    fixed_settings,
    settle,
    settle_pruner,
)
from search.tracking import TrackerCallback, check_trackers, prepare_trackers
from search.worker.budget import Budget
from search.worker.claims import FINISHED, claim_lock
from search.worker.final_choice import choose_final
from search.worker.final_stage import EPOCHS_FACTOR, queue_final
from search.worker.launcher import launch, worker_envs
from search.worker.retention import CheckpointRetention
from search.worker.stage import FINAL, SEARCH, final_trials, search_trials
from search.worker.storage import open_storage
from search.worker.trial_loop import StorageUnreachable, TooManyFailures, run_worker
from studies import face_settings, get_study


def count(study: optuna.Study, states: Sequence[TrialState]) -> int:
    """Search trials in ``states``: final-stage ones (``search.refit``) are not in ``--trials``."""
    return len(search_trials(study, states))


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
    final = final_trials(study, (TrialState.COMPLETE,))
    if final:
        lines.append(f"final      {len(final)} complete final-stage trial(s) (search.refit), "
                     "not counted in --trials")
    lines.append(f"wall time  {seconds:.1f} s")
    return "\n".join([*lines, *next_commands(study.study_name, storage, artifacts)])


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


@dataclass
class Run:
    """One invocation's study, settings and clock, shared by the parent's and a worker's path."""

    args: argparse.Namespace
    module: ModuleType
    storage: Any
    storage_url: str
    study: optuna.Study
    settings: StudySettings
    weights: Path | None
    budget: Budget | None
    t0: float = field(default_factory=time.perf_counter)

    def report(self) -> str:
        return summary(self.study, time.perf_counter() - self.t0, self.args.trials,
                       self.args.storage, self.args.artifacts)


def open_run(args: argparse.Namespace) -> Run:
    """Settle the study's fixed settings (refusing changed ones before anything is stored),
    create or load it, and give it its sampler (``--fix`` pinned) and pruner."""
    name = paths.check_study_name(args.study)
    module = get_study(name)
    storage_url = args.storage or paths.default_storage_url(name)
    storage = open_storage(storage_url, heartbeat_interval=args.heartbeat_interval,
                           grace_period=args.grace_period, max_retry=args.max_retry)
    given = {k for k, flag in (("n_folds", args.folds), ("data_dir", args.data),
                               ("epochs", args.epochs), ("fixed", args.fix or None),
                               ("corrections", args.corrections)) if flag is not None}
    wanted, weights = settle(args, module, storage, name)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                load_if_exists=True)
    # Offset by the trials already there: a resumed run with the same --seed must not replay
    # the first run's suggestions (a seeded sampler in a fresh process starts over); workers
    # started together see the same count, so each also gets its own offset.
    started = len(study.get_trials(deepcopy=False)) - count(study, (TrialState.WAITING,))
    seed = None if args.seed is None else args.seed + started + 7919 * (args.worker_id or 0)
    created = "n_folds" not in study.user_attrs
    settings = fixed_settings(study, wanted, given | {"weights"})
    if created and not args.no_warm_start:  # the study's known-good recipes go first, once
        for params in warm_start(module, settings.fixed):
            study.enqueue_trial(params)
    study.sampler = fixed_sampler(create_sampler(args.sampler, seed), settings.fixed)
    override_waiting(study, storage, settings.fixed)
    if not Path(settings.data_dir).is_dir():
        raise DataError(f"data folder {settings.data_dir!r} (stored on study {name!r}) does "
                        "not exist")
    pruner = settle_pruner(name, args.pruner, settings.report_mode,
                           study.user_attrs.get("pruner"))
    study.pruner = create_pruner(pruner, settings.n_steps, settings.n_folds)
    budget = Budget.of(args.hours * 3600 if args.hours else args.timeout,
                       final_configs=args.final, final_factor=EPOCHS_FACTOR)
    return Run(args, module, storage, storage_url, study, settings, weights, budget)


def launch_workers(run: Run, argv: Sequence[str], n_workers: int, loader_workers: int) -> int:
    """The parent of ``--workers N`` / ``--gpus``: start the workers, wait, one summary."""
    args = run.args
    codes = launch([[*child_argv(argv, i, bool(args.gpus)), "--loader-workers",
                     str(loader_workers)] for i in range(n_workers)],
                   worker_envs(args.gpus, n_workers))
    print(run.report(), flush=True)
    if any(c in (130, -2) for c in codes):
        return 130
    if count(run.study, FINISHED) >= args.trials:
        return 0
    return next((c for c in codes if c > 0), 1)


def search_here(run: Run, loader_workers: int, stage: str = SEARCH) -> bool:
    """Run trials in this process until the study has enough (``stage`` ``final``: until the
    final-stage queue is empty, ``search.refit``); False when Ctrl-C ended it."""
    args, settings = run.args, run.settings
    data = load_study_data(settings.data_dir, settings.corrections, settings.n_folds,
                           settings.fold_seed, faces=face_settings(run.module),
                           progress=args.progress)
    store = open_store(args.artifacts or paths.default_artifacts_dir())
    machine = Machine(device=args.device, loader_workers=loader_workers, weights=run.weights,
                      progress=args.progress, budget=run.budget)
    objective = Objective(run.module, data, store, settings, machine)
    try:
        lock = claim_lock(run.storage, run.storage_url, run.study.study_name)
        run_worker(run.study, objective, args.trials, lock=lock,
                   callbacks=[CheckpointRetention(store, keep=args.keep_checkpoints, lock=lock),
                              *([TrackerCallback(args.log_to, store)] if args.log_to else [])],
                   budget=run.budget, max_retry=args.max_retry,
                   poll_s=min(2.0, float(args.heartbeat_interval)), stage=stage)
    except KeyboardInterrupt:
        return False
    return True


def final_stage_in_budget(run: Run, loader_workers: int) -> bool:
    """``--hours`` with ``--final K``: after the search's share, the K best configurations
    retrained (``search.refit``'s final stage) in the time kept for them, then more search
    trials in whatever is left. Nothing when there is no budget, no final stage, no time for a
    final trial or no complete trial to refit. False when Ctrl-C ended it."""
    budget, study = run.budget, run.study
    if budget is None or not budget.final_configs or not budget.can_start(study, FINAL):
        return True
    epochs = EPOCHS_FACTOR * run.settings.epochs
    with claim_lock(run.storage, run.storage_url, study.study_name)():
        try:
            store = open_store(run.args.artifacts or paths.default_artifacts_dir())
            chosen, why = choose_final(study, store, budget.final_configs,
                                       warm_start(run.module, run.settings.fixed))
            lines = [*why, *queue_final(study, chosen, epochs)]
        except DataError as e:  # nothing to refit (all pruned or failed), or its OOF unreadable
            print(f"final stage skipped: {e}", flush=True)
            return True
    print(f"final stage: the {len(chosen)} best configuration(s) at {epochs} epochs per fold, "
          f"{budget.left() / 60:.1f} min left", flush=True)
    print("\n".join(lines), flush=True)
    if not search_here(run, loader_workers, stage=FINAL):
        return False
    rest = dataclasses.replace(run, budget=dataclasses.replace(budget, final_configs=0))
    return search_here(rest, loader_workers)


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """The parent's path (prints, launches workers or searches itself) or a worker's (quiet)."""
    worker = args.worker_id is not None
    # SIGINT always ends the search cleanly: a shell without job control starts background
    # commands ignoring it (``cmd &``), and a worker gets it forwarded by its parent
    signal.signal(signal.SIGINT, signal.default_int_handler)
    check_trackers(args.log_to)  # before the study is opened: nothing stored on a typo'd setup
    run = open_run(args)
    if not worker:
        prepare_trackers(args.log_to, args.study)
    finished = count(run.study, FINISHED)
    n_workers = len(args.gpus) if args.gpus else args.workers
    loader_workers = (args.loader_workers if args.loader_workers is not None else
                      default_loader_workers(args.device or auto_device(), n_workers))
    if worker:
        return 0 if finished >= args.trials or search_here(run, loader_workers) else 130
    if finished >= args.trials:
        print(f"study {args.study!r} already has {finished} finished trials (asked "
              f"{args.trials}); nothing to do\n{run.report()}")
        return 0
    print(f"study {args.study!r}: {finished} finished, running until {args.trials} "
          f"({run.storage_url}{f', {n_workers} workers' if n_workers > 1 else ''})", flush=True)
    if n_workers > 1:
        code = launch_workers(run, argv, n_workers, loader_workers)
        if code == 0 and not final_stage_in_budget(run, loader_workers):
            code = 130
        return code
    try:
        completed = search_here(run, loader_workers) and \
            final_stage_in_budget(run, loader_workers)
    except TooManyFailures:
        print(run.report(), flush=True)
        raise
    if not completed:
        print("\ninterrupted: the running trial is marked FAIL; rerun the same command to "
              "continue", file=sys.stderr)
    elif run.budget is not None and count(run.study, FINISHED) < args.trials:
        print("time budget reached: no trial left that can finish in time; rerun with more "
              "--hours to continue (a stopped trial resumes from its finished folds)", flush=True)
    print(run.report(), flush=True)
    return 0 if completed else 130


def auto_device() -> str:
    """cuda when torch sees a GPU, else cpu (what a trial without --device trains on)."""
    import torch  # lazy: torch costs ~3 s to import; only a run without --device asks

    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.debug:  # failed trials' tracebacks (logged at debug level)
        log.setLevel(logging.DEBUG)
    return run_cli(lambda: run(args, argv), args.debug,
                   expected=(*EXPECTED, TooManyFailures, StorageUnreachable))


if __name__ == "__main__":
    sys.exit(main())
