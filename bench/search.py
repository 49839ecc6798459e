"""Pruning vs no pruning on the demo study: epochs trained and best value, side by side.

Both arms run the same seeded TPE sampler on the same data and folds; one with the median
pruner (as ``search.run --pruner median`` sets it up), one with none. Printed: total epochs
trained, best out-of-fold macro F1, wall time, and the ratios (pruned / unpruned), for each
pruner named in ``--pruners`` (median, hyperband and halving by default).

    python -m bench.search                       # 12 trials per arm on runs/demo_data
    python -m bench.search --trials 4 --people 48 --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.artifacts import open_store
from search.objective import Objective, load_study_data
from search.run import make_pruner
from studies import demo


def arm(pruner: str, data, module, trials: int, epochs: int, seed: int, tmp: Path) -> dict:
    n_folds = data.n_folds
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=make_pruner(pruner, n_folds * epochs, n_folds))
    obj = Objective(module, data, open_store(tmp / pruner), epochs=epochs)
    t0 = time.perf_counter()
    study.optimize(obj, n_trials=trials)
    seconds = time.perf_counter() - t0
    done = study.get_trials(states=(TrialState.COMPLETE,))
    return {"epochs": sum(t.user_attrs.get("epochs_trained", 0) for t in study.trials),
            "best": max(t.value for t in done) if done else float("nan"),
            "pruned": len(study.get_trials(states=(TrialState.PRUNED,))),
            "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=demo.EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="data folder (default: the demo study's runs/demo_data)")
    p.add_argument("--people", type=int, help="generate a smaller synthetic set of this size")
    p.add_argument("--pruners", default="none,median,hyperband,halving",
                   help="comma-separated arms; 'none' is the reference")
    a = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as t:
        tmp = Path(t)
        if a.people:
            from core.synth import generate

            data_dir = generate(tmp / "data", people=a.people, eval_people=max(4, a.people // 5),
                                seed=demo.SYNTH_SEED, size=demo.SYNTH_SIZE)
        else:
            from search.paths import runs_dir

            data_dir = Path(a.data) if a.data else demo.default_data(runs_dir())
        data = load_study_data(data_dir, demo.corrections(Path(data_dir)), demo.FOLDS,
                               demo.FOLD_SEED)
        for size in demo.IMAGE_SIZES.values():  # build caches outside the timed arms
            data.cache(size)
        names = ["none", *[x for x in a.pruners.split(",") if x and x != "none"]]
        res = {name: arm(name, data, demo, a.trials, a.epochs, a.seed, tmp) for name in names}
    n = res["none"]
    print(f"demo study, {a.trials} trials per arm, {demo.FOLDS} folds x {a.epochs} epochs, "
          f"TPE seed {a.seed}, {len(data.table)} training images")
    print(f"{'pruner':8} {'epochs':>7} {'best F1':>8} {'pruned':>7} {'wall s':>8}")
    for name, r in res.items():
        print(f"{name:8} {r['epochs']:7d} {r['best']:8.4f} {r['pruned']:7d} {r['seconds']:8.1f}")
    for name, m in res.items():
        if name != "none":
            print(f"{name}/none: epochs {m['epochs'] / max(n['epochs'], 1):.2f}x, best F1 "
                  f"difference {m['best'] - n['best']:+.4f}, "
                  f"wall {m['seconds'] / n['seconds']:.2f}x")


if __name__ == "__main__":
    main()
