"""Pruners vs no pruning on the demo study (or real faces): epochs and best value, a fair race.

Every arm runs the same number of trials with the same seeded TPE sampler on the same data and
folds, for each of ``--seeds`` sampler seeds; arms are interleaved (seed 0: none, median, ...;
seed 1: ...) so a machine that slows down mid-run slows every arm alike. Per seed, an arm's
epochs are divided by no pruning's and its best out-of-fold macro F1 is compared with no
pruning's; printed are the medians over seeds with their spread (min..max). ``wilcoxon`` reports
once per fold (the per-fold step scheme), the others once per epoch. An arm ``NAME+group``
is pruner NAME with TPE's ``group=True`` (conditional parameters sampled jointly); TPE draws
its first 10 trials at random, so such an arm differs from NAME only beyond 10 trials.

    python -m bench.search                        # 10 trials x 3 seeds per arm, runs/demo_data
    python -m bench.search --trials 4 --seeds 1 --people 48 --epochs 2   # a quick look
    python -m bench.search --faces                # the real-face set (studies.quality)
    python -m bench.search --trials 20 --arms median,median+group   # TPE's group=True

    python -m bench.search --seconds 150 --arms median   # equal wall time per arm, not trials

Last line, for scripts (the default pruner, medians over seeds):
``search epochs_ratio=0.xx best_gap=+0.xxxx arm=median seeds=N``; with ``--seconds S``
``search seconds=S trials_ratio=x.xx best_gap=+0.xxxx arm=median seeds=N`` (trials evaluated,
complete or pruned, over no pruning's in the same time: what a user's hours buy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import check_weights_folder, weights_arg
from core.study_data import load_study_data
from search.artifacts import open_store
from search.objective import Machine, Objective
from search.study_settings import (
    DEFAULT_PRUNER,
    REPORT_MODE,
    StudySettings,
    create_pruner,
    create_sampler,
)
from search.worker.budget import Budget, TimeBudgetExceeded
from studies import demo, face_settings, quality

ARMS = ("none", "median", "hyperband", "halving", "wilcoxon")


def parse_arm(name: str) -> tuple[str, bool]:
    """``PRUNER`` or ``PRUNER+group`` -> (pruner, TPE group)."""
    pruner, _, option = name.partition("+")
    if pruner not in REPORT_MODE or option not in ("", "group"):
        raise SystemExit(f"--arms: {name!r} is not PRUNER or PRUNER+group "
                         f"(pruners: {', '.join(REPORT_MODE)})")
    return pruner, option == "group"


def arm(name: str, study_module, data, trials: int | None, epochs: int, seed: int, tmp: Path,
        weights: Path | None = None, seconds: float | None = None) -> dict:
    """One search with arm ``name`` (``PRUNER[+group]``), TPE seed ``seed``: ``trials`` trials,
    or as many as ``seconds`` of wall time allow (the trial running at the deadline stops at its
    next epoch boundary and counts as not evaluated, as ``search.run --timeout`` does it)."""
    pruner, group = parse_arm(name)
    n_folds = data.n_folds
    study = optuna.create_study(direction="maximize",
                                sampler=create_sampler("tpe", seed, group=group),
                                pruner=create_pruner(pruner, n_folds * epochs, n_folds))
    obj = Objective(study_module, data, open_store(tmp / f"{name}-{seed}"),
                    StudySettings.of(data, epochs, per_fold=REPORT_MODE[pruner] == "fold"),
                    Machine(weights=weights, budget=Budget.of(seconds)))
    t0 = time.perf_counter()
    if seconds is None:
        study.optimize(obj, n_trials=trials)
    else:
        study.optimize(obj, timeout=seconds, catch=(TimeBudgetExceeded,))
    done = study.get_trials(states=(TrialState.COMPLETE,))
    pruned = len(study.get_trials(states=(TrialState.PRUNED,)))
    return {"epochs": sum(t.user_attrs.get("epochs_trained", 0) for t in study.trials),
            "best": max(t.value for t in done) if done else float("nan"),
            "pruned": pruned, "evaluated": len(done) + pruned,
            "seconds": time.perf_counter() - t0}


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def report(runs: dict[tuple[str, int], dict], arms: list[str], seeds: list[int],
           equal_time: bool = False) -> list[str]:
    """Per arm: medians over seeds of the ratios to no pruning, with their spread (at equal
    time: trials evaluated, not epochs, over no pruning's)."""
    what, key = ("trials/none", "evaluated") if equal_time else ("epochs/none", "epochs")
    lines = [f"{'arm':15} {what:>22} {'best - none':>28} {'pruned':>7} {'wall s':>7}"]
    for name in arms:
        ratio = [runs[name, s][key] / max(runs["none", s][key], 1) for s in seeds]
        gap = [runs[name, s]["best"] - runs["none", s]["best"] for s in seeds]
        pruned = statistics.median(runs[name, s]["pruned"] for s in seeds)
        wall = statistics.median(runs[name, s]["seconds"] for s in seeds)
        lines.append(f"{name:15} {spread(ratio, '.2f'):>22} {spread(gap, '+.4f'):>28} "
                     f"{pruned:7.0f} {wall:7.0f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10, help="trials per arm and seed")
    p.add_argument("--seconds", type=float,
                   help="race at equal wall time instead: each arm and seed searches this long "
                        "(--trials is ignored); the last line compares trials evaluated")
    p.add_argument("--seeds", type=int, default=3, help="TPE seeds per arm (0..N-1)")
    p.add_argument("--epochs", type=int,
                   help=f"default: the study's (demo {demo.EPOCHS}, quality {quality.EPOCHS})")
    p.add_argument("--faces", action="store_true",
                   help="race on the real-face set and space of studies.quality instead of the "
                        "demo (its data is built from ../shared/faces on first use)")
    p.add_argument("--data", help="data folder (default: the study's own under runs/)")
    p.add_argument("--people", type=int, help="demo only: generate a smaller synthetic set")
    weights_arg(p)
    p.add_argument("--arms", default=",".join(ARMS),
                   help="comma-separated PRUNER or PRUNER+group; 'none' is added")
    a = p.parse_args(argv)
    if a.faces and a.people:
        p.error("--people makes a synthetic set; it does not go with --faces")
    study_module = quality if a.faces else demo
    if a.faces:
        a.weights = check_weights_folder(a.weights)
    a.epochs = a.epochs or study_module.EPOCHS
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    arms = ["none", *[x for x in a.arms.split(",") if x and x != "none"]]
    for name in arms:
        parse_arm(name)
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory(prefix="bench_search_") as t:
        tmp = Path(t)
        if a.people:
            from core.synth import generate

            data_dir = generate(tmp / "data", people=a.people, eval_people=max(4, a.people // 5),
                                seed=demo.SYNTH_SEED, size=demo.SYNTH_SIZE)
        else:
            from search.paths import runs_dir

            data_dir = Path(a.data) if a.data else study_module.default_data(runs_dir())
        data = load_study_data(data_dir, study_module.corrections(Path(data_dir)),
                               study_module.FOLDS, study_module.FOLD_SEED,
                               faces=face_settings(study_module))
        for size in study_module.IMAGE_SIZES.values():  # caches built outside the timed arms
            data.cache(size)
        runs = {}
        for seed in seeds:  # interleaved: every arm once per seed, in turn
            for name in arms:
                runs[name, seed] = arm(name, study_module, data, a.trials, a.epochs, seed, tmp,
                                       a.weights if a.faces else None, a.seconds)
                r = runs[name, seed]
                print(f"seed {seed} {name:15} epochs {r['epochs']:4d} best {r['best']:.4f} "
                      f"evaluated {r['evaluated']:2d} pruned {r['pruned']:2d} "
                      f"wall {r['seconds']:.0f} s", flush=True)
    each = f"{a.seconds:.0f} s" if a.seconds else f"{a.trials} trials"
    print(f"{study_module.__name__.split('.')[-1]} study, {each} per arm and seed, "
          f"seeds {seeds}, {study_module.FOLDS} folds "
          f"x {a.epochs} epochs, {len(data.table)} training images; medians (min..max)")
    print("\n".join(report(runs, arms, seeds, equal_time=a.seconds is not None)))
    default = DEFAULT_PRUNER["epoch"]
    if default in arms:
        key = "evaluated" if a.seconds else "epochs"
        ratio = statistics.median(runs[default, s][key] / max(runs["none", s][key], 1)
                                  for s in seeds)
        gap = statistics.median(runs[default, s]["best"] - runs["none", s]["best"] for s in seeds)
        head = f"seconds={a.seconds:.0f} trials_ratio" if a.seconds else "epochs_ratio"
        print(f"search {head}={ratio:.2f} best_gap={gap:+.4f} arm={default} "
              f"seeds={len(seeds)}")


if __name__ == "__main__":
    main()
