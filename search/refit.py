"""The final stage: ``python -m search.refit --study NAME --top K [--epochs N]``.

Why: a search's trials are short by design (many configurations in the hours given), so the best
configuration is never trained well. This retrains the K best complete configurations for more
epochs (default ``EPOCHS_FACTOR`` times the study's) as trials of the same study, **on the same
folds**: their out-of-fold rows line up with every other trial's, and ``search.ensemble`` takes
them like any complete trial.

How (``search.stage``): each one is enqueued with the params of the trial it refits and the user
attrs ``stage="final"``, ``refit_of`` and ``refit_epochs``, and run by the study's own objective
(``search.run``'s path): checkpoints, OOF and eval artifacts, curves in the dashboard, resume from
finished folds. It is never pruned, a search worker neither claims nor counts it (``--trials``),
and no pruner compares a search trial with it.

Reruns are safe: a configuration already refitted at these epochs (complete, queued or running)
is skipped; a final trial killed mid-run is found dead (``search.claims.reap``) and its retry
resumes from its finished folds; one that failed otherwise (Ctrl-C, an error) is queued again as
its retry, which resumes the same way.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from core.cli import EXPECTED, Parser, run_cli
from core.config import ConfigError
from core.errors import DataError
from core.loader import default_loader_workers
from search import run_args
from search.claims import claim_lock, log, reap, retry_callback
from search.finished_study import add_study_flags, open_finished
from search.run import Run, auto_device, next_commands, open_run, search_here
from search.stage import (
    EPOCHS_ATTR,
    FINAL,
    REFIT_OF_ATTR,
    final_attrs,
    final_trials,
    search_trials,
)
from search.trial_loop import ERROR_ATTR, StorageUnreachable, TooManyFailures

DEFAULT_TOP = 1
#: Default epochs of a final trial: this many times the study's (its trials' length).
EPOCHS_FACTOR = 2
DESCRIPTION = ("Retrain a study's best configurations for more epochs on the same folds, as "
               "final-stage trials its ensemble can use.")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.refit", description=DESCRIPTION)
    add_study_flags(p)
    p.add_argument("--top", type=run_args.positive_int, default=DEFAULT_TOP, metavar="K",
                   help="refit the K best complete configurations (default %(default)s)")
    p.add_argument("--epochs", dest="refit_epochs", type=run_args.positive_int, metavar="N",
                   help=f"epochs per fold of a final trial; more than the study's (default "
                        f"{EPOCHS_FACTOR} x the study's)")
    run_args.add_data_flag(p)
    run_args.add_machine_flags(p)
    run_args.add_loader_flags(p)
    run_args.add_liveness_flags(p)
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    return p


def search_run_args(args: argparse.Namespace) -> argparse.Namespace:
    """``search.run``'s flags for this study as it stands: its own defaults (from its parser),
    with the flags both commands share taken from ``args``; nothing that changes a fixed
    setting, no budget, no warm start."""
    ns = run_args.build_parser().parse_args(["--study", args.study, "--trials", "1"])
    for key, value in vars(args).items():
        if hasattr(ns, key):
            setattr(ns, key, value)
    ns.no_warm_start = True
    return ns


def _config_key(params: dict, epochs: int) -> str:
    return json.dumps([params, int(epochs)], sort_keys=True, default=str)


def best_configurations(study: optuna.Study, top: int) -> list[FrozenTrial]:
    """The ``top`` best complete search trials with every fold, one per configuration (params),
    best first (ties: lower number)."""
    n_folds = int(study.user_attrs.get("n_folds", 0))
    done = [t for t in search_trials(study, (TrialState.COMPLETE,))
            if t.value is not None and len(t.user_attrs.get("fold_f1", [])) == n_folds]
    chosen: dict[str, FrozenTrial] = {}
    for t in sorted(done, key=lambda t: (-float(t.value or 0.0), t.number)):
        chosen.setdefault(_config_key(t.params, 0), t)
        if len(chosen) == top:
            break
    return list(chosen.values())


def queue_final(study: optuna.Study, top: int,
                epochs: int) -> tuple[list[FrozenTrial], list[str]]:
    """Queue a final trial for each of the ``top`` best configurations that has none at
    ``epochs`` yet: (those configurations' search trials, one line each saying what was done).
    Call it under the claim lock, after ``reap``, so a dead worker's final trial already has its
    retry queued."""
    chosen = best_configurations(study, top)
    if not chosen:
        raise DataError(f"study {study.study_name!r}: no complete trial with all "
                        f"{study.user_attrs.get('n_folds')} folds to refit")
    trials = study.get_trials(deepcopy=False)
    by_key: dict[str, list[FrozenTrial]] = {}
    for f in final_trials(study):
        origin = trials[int(f.user_attrs[REFIT_OF_ATTR])]
        by_key.setdefault(_config_key(origin.params, f.user_attrs[EPOCHS_ATTR]), []).append(f)
    lines = []
    for t in chosen:
        mine = by_key.get(_config_key(t.params, epochs), [])
        head = f"  trial {t.number} (macro F1 {t.value:.4f}): "
        done = [f for f in mine if f.state == TrialState.COMPLETE]
        live = [f for f in mine if f.state in (TrialState.WAITING, TrialState.RUNNING)]
        failed = [f for f in mine if f.state == TrialState.FAIL]
        if done:
            lines.append(f"{head}already refitted by trial {done[0].number} "
                         f"(macro F1 {done[0].value:.4f}); skipped")
        elif live:
            lines.append(f"{head}already queued (trial {live[0].number}, "
                         f"{live[0].state.name.lower()})")
        elif failed:
            last = max(failed, key=lambda f: f.number)
            retry_callback(None)(study, last)
            lines.append(f"{head}its final trial {last.number} failed "
                         f"({last.user_attrs.get(ERROR_ATTR, 'interrupted')}); queued again as "
                         "its retry, which reuses its finished folds")
        else:
            study.enqueue_trial(t.params, user_attrs=final_attrs(t.number, epochs))
            lines.append(f"{head}queued")
    return chosen, lines


def outcome(study: optuna.Study, chosen: Sequence[FrozenTrial],
            epochs: int) -> list[tuple[str, bool]]:
    """Per refitted configuration: a line on its latest final trial, and whether one is done."""
    trials = study.get_trials(deepcopy=False)
    out = []
    for t in chosen:
        mine = [f for f in final_trials(study) if
                _config_key(trials[int(f.user_attrs[REFIT_OF_ATTR])].params,
                            f.user_attrs[EPOCHS_ATTR]) == _config_key(t.params, epochs)]
        done = [f for f in mine if f.state == TrialState.COMPLETE]
        if not mine:  # queued by this run, so only a hand-edited study gets here
            out.append((f"  trial {t.number}: no final trial", False))
            continue
        f = done[0] if done else max(mine, key=lambda f: f.number)
        what = (f"macro F1 {f.value:.4f} (at the study's epochs: {t.value:.4f})" if done else
                f.state.name + (f" ({f.user_attrs[ERROR_ATTR]})" if ERROR_ATTR in f.user_attrs
                                else ""))
        out.append((f"  trial {f.number} refits trial {t.number} at {epochs} epochs: {what}",
                    bool(done)))
    return out


def run(args: argparse.Namespace) -> int:
    """The whole command: refuse, queue, train, report; its exit code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C ends it cleanly
    open_finished(args)  # no study, no complete trial: one line, before anything is created
    run: Run = open_run(search_run_args(args))
    study, study_epochs = run.study, int(run.fixed["epochs"])
    epochs = args.refit_epochs or EPOCHS_FACTOR * study_epochs
    if epochs <= study_epochs:
        raise ConfigError(f"--epochs {epochs}: the final stage trains longer than the search's "
                          f"trials, and study {args.study!r} trains {study_epochs} epoch(s) per "
                          "fold")
    with claim_lock(run.storage, run.storage_url, study.study_name)():
        reaped = reap(study, args.max_retry)
        if reaped:
            log.warning("trial(s) %s: worker gone, marked FAIL and queued for retry", reaped)
        chosen, lines = queue_final(study, args.top, epochs)
    print(f"final stage of study {args.study!r}: the {len(chosen)} best configuration(s) at "
          f"{epochs} epochs per fold (its trials have {study_epochs}), on the same folds",
          flush=True)
    print("\n".join(lines), flush=True)
    completed = True
    if final_trials(study, (TrialState.WAITING, TrialState.RUNNING)):
        loader_workers = (args.loader_workers if args.loader_workers is not None else
                          default_loader_workers(args.device or auto_device(), 1))
        completed = search_here(run, loader_workers, stage=FINAL)
    ended = outcome(study, chosen, epochs)
    print("\n".join(["final-stage trials:", *(line for line, _ in ended),
                     *next_commands(args.study, args.storage, args.artifacts)]), flush=True)
    if not completed:
        print("\ninterrupted: the running final trial is marked FAIL; rerun the same command "
              "to continue from its finished folds", file=sys.stderr)
        return 130
    return 0 if all(done for _, done in ended) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug,
                   expected=(*EXPECTED, TooManyFailures, StorageUnreachable))


if __name__ == "__main__":
    sys.exit(main())
