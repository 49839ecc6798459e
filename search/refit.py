"""The final stage: ``python -m search.refit --study NAME --top K [--epochs N]``.

Why: a search's trials are short by design (many configurations in the hours given), so the best
configuration is never trained well. This retrains the K best complete configurations for more
epochs (default ``EPOCHS_FACTOR`` times the study's) as trials of the same study, **on the same
folds**: their out-of-fold rows line up with every other trial's, and ``search.ensemble`` takes
them like any complete trial.

Which K (``search.worker.final_choice``): the best, except that the study's warm-start recipe
goes ahead of any configuration whose out-of-fold lead over it is within the noise (paired
bootstrap over training people); the output says when it did.

How (``search.worker.stage``): each one is enqueued with the params of the trial it refits and
the user attrs ``stage="final"``, ``refit_of`` and ``refit_epochs``, and run by the study's own
objective (``search.run``'s path): checkpoints, OOF and eval artifacts, curves in the
dashboard, resume from finished folds. It is never pruned, a search worker neither claims nor
counts it (``--trials``), and no pruner compares a search trial with it.

Reruns are safe: a configuration already refitted at these epochs (complete, queued or running)
is skipped; a final trial killed mid-run is found dead (``search.worker.claims.reap``) and its retry
resumes from its finished folds; one that failed otherwise (Ctrl-C, an error) is queued again as
its retry, which resumes the same way.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from optuna.trial import TrialState

from core.cli import EXPECTED, Parser, run_cli
from core.config import ConfigError
from core.loader import default_loader_workers
from search import run_args
from search.finished_study import add_study_flags, open_finished
from search.log import log
from search.pseudo_labels import COUNT_ATTR, SHARE_ATTR, THRESHOLD_ATTR, from_submission
from search.run import Run, auto_device, next_commands, open_run, search_here
from search.space import warm_start
from search.worker.claims import claim_lock, reap
from search.worker.final_choice import choose_final
from search.worker.final_stage import EPOCHS_FACTOR, outcome, queue_final
from search.worker.stage import FINAL, final_trials
from search.worker.trial_loop import StorageUnreachable, TooManyFailures

DEFAULT_TOP = 1
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
    p.add_argument("--pseudo-labels", type=run_args.fraction, metavar="P",
                   help="opt-in (off by default): every fold also trains on the eval images "
                        "whose submitted class the submission is at least P sure of "
                        "(search.ensemble first; see search.pseudo_labels)")
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


def run(args: argparse.Namespace) -> int:
    """The whole command: refuse, queue, train, report; its exit code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C ends it cleanly
    found = open_finished(args)  # no study or complete trial: one line, nothing created yet
    pseudo = from_submission(found, args.pseudo_labels) if args.pseudo_labels else {}
    run: Run = open_run(search_run_args(args))
    study, study_epochs = run.study, run.settings.epochs
    epochs = args.refit_epochs or EPOCHS_FACTOR * study_epochs
    if epochs <= study_epochs:
        raise ConfigError(f"--epochs {epochs}: the final stage trains longer than the search's "
                          f"trials, and study {args.study!r} trains {study_epochs} epoch(s) per "
                          "fold")
    with claim_lock(run.storage, run.storage_url, study.study_name)():
        reaped = reap(study, args.max_retry)
        if reaped:
            log.warning("trial(s) %s: worker gone, marked FAIL and queued for retry", reaped)
        chosen, why = choose_final(study, found.store, args.top,
                                   warm_start(run.module, run.settings.fixed))
        lines = [*why, *queue_final(study, chosen, epochs, pseudo)]
    print(f"final stage of study {args.study!r}: the {len(chosen)} best configuration(s) at "
          f"{epochs} epochs per fold (its trials have {study_epochs}), on the same folds",
          flush=True)
    if pseudo:
        counts = ", ".join(map(str, pseudo[COUNT_ATTR]))
        print(f"pseudo-labels: {counts} eval images in folds 0..{len(pseudo[COUNT_ATTR]) - 1} "
              f"({pseudo[SHARE_ATTR]:.0%}): those the submission's blend of each fold's models "
              f"is at least {args.pseudo_labels:g} sure of, in that fold's training",
              flush=True)
    print("\n".join(lines), flush=True)
    completed = True
    if final_trials(study, (TrialState.WAITING, TrialState.RUNNING)):
        loader_workers = (args.loader_workers if args.loader_workers is not None else
                          default_loader_workers(args.device or auto_device(), 1))
        completed = search_here(run, loader_workers, stage=FINAL)
    ended = outcome(study, chosen, epochs, pseudo.get(THRESHOLD_ATTR))
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
