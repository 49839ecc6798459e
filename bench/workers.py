"""Trials per hour with 1 vs N worker processes (``search.run --workers``) on a reduced demo.

Run: ``python -m bench.workers [--workers 2 --people 32 --trials 4 --repeats 3]``.
Each configuration runs the real CLI on a fresh study (same data, same prebuilt image cache,
the same fixed fast trial enqueued ``--trials`` times, so every trial is the same work) and is
repeated; the table shows medians. Three figures per configuration:

- wall: the whole command (process start, imports, data load, trials): what a user waits,
  and the headline (last line ``workers wall_speedup=.. trials_per_hour=..``);
- trials/h: ``--trials`` over the span from the first trial's start to the last one's end;
- trial s: median seconds of one trial (slower per trial when workers share cores).

On a machine with C cores, N workers get C/N torch threads each. A third row, one worker
with C/N threads, separates the two effects: running trials side by side, and running each
trial on fewer threads (on a small, busy machine torch's threads mostly wait for each other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

FAST = {"backbone": "test_resnet", "image_size": "48x32", "loss": "ce", "lr": 3e-3,
        "class_weights": "none", "age_threshold": 60}
ROOT = Path(__file__).resolve().parents[1]


def one_run(root: Path, data: Path, workers: int, threads: int | None, trials: int, folds: int,
            epochs: int, tag: str) -> dict[str, float]:
    url = f"sqlite:///{root / f'{tag}.db'}"
    study = optuna.create_study(study_name="demo", storage=url, direction="maximize")
    for _ in range(trials):
        study.enqueue_trial(FAST)
    argv = [sys.executable, "-m", "search.run", "--study", "demo", "--storage", url,
            "--artifacts", str(root / f"{tag}_art"), "--data", str(data), "--trials", str(trials),
            "--folds", str(folds), "--epochs", str(epochs), "--pruner", "none",
            "--keep-checkpoints", "0", "--workers", str(workers)]
    t0 = time.perf_counter()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({tag}):\n{proc.stderr[-3000:]}")
    done = [t for t in optuna.load_study(study_name="demo", storage=url).trials
            if t.state == TrialState.COMPLETE]
    assert len(done) == trials, f"{tag}: {len(done)} complete trials, asked {trials}"
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    per = statistics.median((t.datetime_complete - t.datetime_start).total_seconds()
                            for t in done)
    return {"wall": wall, "per_hour": trials / span * 3600, "trial_s": per}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="compared with 1 (default 2)")
    p.add_argument("--people", type=int, default=32, help="synthetic people (default 32)")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per configuration, medians shown (default 1: keeps it ~2 min)")
    a = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from core.cache import build_cache
    from core.synth import generate

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        root = Path(tmp)
        data = Path(generate(root / "data", people=a.people, eval_people=8, seed=0,
                             size=(48, 36)))
        build_cache(data, (48, 32), workers=1, progress=False)
        share = max(1, (os.cpu_count() or 1) // a.workers)
        configs = {"1 worker": (1, None), f"1 worker, {share} thr": (1, share),
                   f"{a.workers} workers": (a.workers, None)}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
        order = list(enumerate(configs.items()))
        for r in range(a.repeats):  # interleaved, rotating: drift in machine load hits all
            for i, (name, (w, threads)) in order[r % 3:] + order[:r % 3]:
                results[name].append(one_run(root, data, w, threads, a.trials, a.folds,
                                             a.epochs, f"c{i}_r{r}"))
    med = {name: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
           for name, runs in results.items()}
    print(f"{os.cpu_count()} CPU cores; demo space fixed to {FAST['backbone']} "
          f"{FAST['image_size']}, {a.people} people, {a.trials} trials x {a.folds} folds x "
          f"{a.epochs} epochs; medians of {a.repeats} runs each")
    print(f"{'':<20} {'wall s':>8} {'trials/h':>9} {'trial s':>8}")
    for name, m in med.items():
        print(f"{name:<20} {m['wall']:>8.1f} {m['per_hour']:>9.0f} {m['trial_s']:>8.1f}")
    names = list(med)
    one, thin, many = (med[n] for n in names)
    for base_name, base in ((names[0], one), (names[1], thin)):
        print(f"{names[2]} vs {base_name}: trials/h x{many['per_hour'] / base['per_hour']:.2f}, "
              f"wall time x{many['wall'] / base['wall']:.2f}, "
              f"time per trial x{many['trial_s'] / base['trial_s']:.2f}")
    # the headline is what a user waits for: the whole command, start-up included
    print(f"workers wall_speedup={one['wall'] / many['wall']:.2f}x "
          f"trials_per_hour={many['per_hour'] / one['per_hour']:.2f}x workers={a.workers}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
