"""Disk use of a demo-like study's ``runs/`` folder, by kind, as trials accumulate.

Runs ``search.run --study demo`` one more trial at a time (the CLI continues a study to N
finished trials) in a private runs folder and, after each trial, prints the bytes of each kind:
checkpoints, probabilities (OOF and eval .npy), plots (confusion PNG, class-F1 JSON), the
SQLite study database, the image cache and the synthetic photos. Side by side with the
checkpoints kept, it prints what no retention would keep (every complete trial's folds) and
the limit ``--keep-checkpoints K`` promises (K trials x folds x the largest backbone's state
dict). At the end it extrapolates the per-trial figures to the real demo study (120 people,
3 folds, 20 trials).

    python -m bench.disk                       # 10 trials, 24 people, 2 folds, 1 epoch, K=2
    python -m bench.disk --trials 10 --keep-checkpoints 3 --runs /tmp/r   # keep the folder
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import TrainConfig
from core.models import create_model
from core.synth import generate
from search import artifacts, paths
from search import run as search_run
from studies import demo

KINDS = ("checkpoints", "probabilities", "plots", "unreferenced", "db", "cache", "photos")


def kind_of(name: str) -> str:
    """Artifact name (``checkpoint_fold0``, ``oof``, ``eval_fold1``, ...) -> kind."""
    if name.startswith("checkpoint_fold"):
        return "checkpoints"
    if name.startswith(("oof", "eval")):
        return "probabilities"
    return "plots"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def measure(runs: Path, data: Path, study: optuna.Study) -> dict:
    """Bytes per kind, plus how many trials still hold checkpoints."""
    art = paths.default_artifacts_dir()
    owner: dict[str, tuple[str, int]] = {}  # artifact id -> (kind, trial number)
    for t in study.get_trials(deepcopy=False):
        for key, aid in t.user_attrs.items():
            if key.startswith(artifacts.ATTR_PREFIX) and aid:
                owner[str(aid)] = (kind_of(key[len(artifacts.ATTR_PREFIX):]), t.number)
    sizes = dict.fromkeys(KINDS, 0)
    with_ckpt: set[int] = set()
    for f in art.iterdir() if art.is_dir() else []:
        kind, number = owner.get(f.name, ("unreferenced", -1))
        sizes[kind] += f.stat().st_size
        if kind == "checkpoints":
            with_ckpt.add(number)
    sizes["db"] = sum(f.stat().st_size for f in runs.glob("*.db*"))
    cache = data / ".mask_search_cache"
    sizes["cache"] = folder_bytes(cache) if cache.is_dir() else 0
    sizes["photos"] = folder_bytes(data) - sizes["cache"]
    sizes["trials_with_checkpoints"] = len(with_ckpt)
    return sizes


def state_bytes(backbone: str, image_size: tuple[int, int]) -> int:
    """Bytes of one fold checkpoint (``torch.save`` of the state dict) for a demo backbone."""
    cfg = TrainConfig(backbone=backbone, pretrained=False, image_size=image_size)
    buf = io.BytesIO()
    torch.save(create_model(cfg).state_dict(), buf)
    return buf.tell()


def mb(n: float) -> str:
    return f"{n / 2**20:8.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disk", description=__doc__.split("\n")[0])
    p.add_argument("--people", type=int, default=24)
    p.add_argument("--eval-people", type=int, default=6)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--runs", help="runs folder to fill and keep (default: a temporary one)")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench_disk_") as tmp:
        runs = Path(args.runs or tmp).resolve()
        os.environ[paths.RUNS_ENV] = str(runs)
        data = runs / "demo_data"
        if not (data / "train" / "train.csv").is_file():
            generate(data, people=args.people, eval_people=args.eval_people, seed=0,
                     size=demo.SYNTH_SIZE)
        per_ckpt = {b: state_bytes(b, demo.IMAGE_SIZES["64x48"]) for b in demo.BACKBONES}
        limit = args.keep_checkpoints * args.folds * max(per_ckpt.values())
        print("fold checkpoint size per demo backbone: "
              + ", ".join(f"{b} {mb(n).strip()} MB" for b, n in per_ckpt.items()))
        print(f"{args.people} people, {args.folds} folds, {args.epochs} epoch(s), "
              f"--keep-checkpoints {args.keep_checkpoints}; sizes in MB")
        head = (f"{'trials':>6} {'done':>4} {'prun':>4} {'ckpt@':>5} {'ckpt':>8} {'no-keep':>8} "
                f"{'limit':>8} {'probs':>8} {'plots':>8} {'db':>8} {'cache':>8} {'photos':>8} "
                f"{'total':>8} {'s':>5}")
        print(head)
        rows = []
        for n in range(1, args.trials + 1):
            t0 = time.perf_counter()
            argv_run = ["--study", "demo", "--trials", str(n), "--data", str(data),
                        "--folds", str(args.folds), "--epochs", str(args.epochs),
                        "--keep-checkpoints", str(args.keep_checkpoints),
                        "--seed", str(args.seed), "--device", "cpu"]
            with redirect_stdout(io.StringIO()):
                code = search_run.main(argv_run)
            if code != 0:
                print(f"search.run exited {code}")
                return code
            study = optuna.load_study(study_name="demo",
                                      storage=paths.default_storage_url("demo"))
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            no_keep = sum(args.folds * per_ckpt[t.params["backbone"]] for t in complete)
            s = measure(runs, data, study)
            row = {**s, "n": n, "complete": len(complete), "no_keep": no_keep,
                   "pruned": len(study.get_trials(deepcopy=False,
                                                  states=(TrialState.PRUNED,)))}
            rows.append(row)
            total = sum(s[k] for k in KINDS)
            print(f"{n:>6} {row['complete']:>4} {row['pruned']:>4} "
                  f"{s['trials_with_checkpoints']:>5} {mb(s['checkpoints'])} {mb(no_keep)} "
                  f"{mb(limit)} {mb(s['probabilities'])} {mb(s['plots'])} {mb(s['db'])} "
                  f"{mb(s['cache'])} {mb(s['photos'])} {mb(total)} "
                  f"{time.perf_counter() - t0:5.0f}", flush=True)
            assert s["trials_with_checkpoints"] <= args.keep_checkpoints
            assert s["checkpoints"] <= limit

        last = rows[-1]
        kept = last["checkpoints"]
        print(f"after {last['n']} trials: checkpoints kept / no retention "
              f"{kept / max(last['no_keep'], 1):.2f}, kept / limit {kept / limit:.2f}")
        report_estimate(rows, args, per_ckpt, runs)
    return 0


def report_estimate(rows: list[dict], args: argparse.Namespace, per_ckpt: dict[str, int],
                    runs: Path) -> None:
    """Scale the measured per-trial bytes to the demo study (demo's people, folds, 20 trials).

    Probabilities scale with rows: each complete trial stores OOF twice (per fold + whole) and
    eval probabilities (folds + 1) times; plots and database rows per trial stay about the same.
    """
    done = [r for r in rows if r["complete"]]
    if not done:
        print("no complete trial: nothing to extrapolate")
        return
    last = rows[-1]
    n_train, n_eval = args.people * 7, npy_rows(runs)
    probs_per = last["probabilities"] / last["complete"]
    plots_per = last["plots"] / last["complete"]
    db_per = (statistics.median(b["db"] - a["db"] for a, b in zip(rows[:-1], rows[1:],
                                                                   strict=True))
              if len(rows) > 1 else last["db"])
    f, t, k = demo.FOLDS, 20, 10  # the demo study and search.run's default --keep-checkpoints
    d_train = demo.PEOPLE * 7
    d_eval = n_eval * demo.EVAL_PEOPLE / max(args.eval_people, 1)
    unit = probs_per / (2 * n_train + (args.folds + 1) * n_eval)  # bytes per stored row
    probs20 = t * unit * (2 * d_train + (f + 1) * d_eval)
    ckpt_mean = statistics.mean(per_ckpt.values()) * f
    ckpt_max = max(per_ckpt.values()) * f
    print(f"per complete trial here: probabilities {mb(probs_per).strip()} MB, plots "
          f"{mb(plots_per).strip()} MB; database {mb(db_per).strip()} MB per trial (median)")
    print(f"estimate, demo study ({demo.PEOPLE} people, {f} folds, {t} trials, all complete, "
          f"--keep-checkpoints {k}): checkpoints ~{mb(k * ckpt_mean).strip()} MB "
          f"(at most {mb(k * ckpt_max).strip()} MB; no retention ~{mb(t * ckpt_mean).strip()} "
          f"MB), probabilities "
          f"~{mb(probs20).strip()} MB, plots ~{mb(t * plots_per).strip()} MB, "
          f"database ~{mb(last['db'] + (t - last['n']) * db_per).strip()} MB")


def npy_rows(runs: Path) -> int:
    """Eval rows of the generated data (one per line of info.csv)."""
    info = runs / "demo_data" / "eval" / "info.csv"
    return max(len(info.read_text().splitlines()) - 1, 0)


if __name__ == "__main__":
    raise SystemExit(main())
