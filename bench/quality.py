"""Real-face quality: a fixed, seeded search and its ensemble, scored on held-out answers.

``python -m bench.quality [--faces DIR] [--seeds N]`` builds a real-face set under ``runs/``
from the faces folder on first use (``studies.quality``: drawn masks, true face boxes), runs
the ``quality`` study's CPU-sized space for a fixed number of trials and epochs (a time cap only
as a safety), ensembles it with ``search.ensemble``, and prints side by side per seed: what the
search told us (the best trial's out-of-fold macro F1) against what we got on the held-out eval
answers (the honesty gap), the ensemble's in-sample, cross-fitted and held-out F1, per-task and
">=60" F1, the share of face crops that hold the true face box, and each stage's wall time.
The figures go to ``runs/quality/quality.json``; the last line is for scripts. Each seed is a
fresh study (sampler seed); the data set and its folds stay the same, so seeds measure the
noise of the search and training, not of the data.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import crop_shares, last_line, median, task_f1
from bench.gauge import cached_gauge
from core.answers import ANSWERS_FILE, answers_for, read_answers
from core.bootstrap import interval, people_bootstrap
from core.cli import run_cli
from core.errors import DataError
from search.ensemble.submission import Submission

STUDY = "quality"
#: 4, not 6: six trials took 33 minutes of search on a quiet 2-core CPU, over the 30 minutes a
#: default run may take; replayed on the three 6-trial studies (``bench.ensemble_variants
#: --first 4``; the runs are deterministic), four gave the same median submission (0.2888).
TRIALS = 4
SAFETY_TIMEOUT_S = 3600  # stop starting trials after this; the protocol is TRIALS, not time


def check_weights_folder(folder: Path) -> Path:
    """The yardstick's weights folder with both backbones' files, else one line naming both
    fixes (checked before the minutes of data, faces and caches)."""
    from core.weights import WEIGHTS_ENV, check_weights
    from studies import quality

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(
            f"weights folder {str(path)!r} does not exist: pass --weights DIR (a folder of "
            f"<timm model name>.safetensors, e.g. from `python -m search.weights --study quality "
            f"--out DIR`) or set ${WEIGHTS_ENV}")
    check_weights(quality.BACKBONES, path.resolve(), STUDY)
    return path.resolve()


def weights_arg(p: argparse.ArgumentParser) -> None:
    """``--weights``: the pretrained backbones the yardstick fine-tunes (bench.quality, gauge)."""
    from core.weights import WEIGHTS_ENV, development_weights_dir

    p.add_argument("--weights", type=Path, default=development_weights_dir(),
                   help=f"folder of pretrained weights (mobilenetv2_100.safetensors, "
                        f"efficientnet_lite0.safetensors); default ${WEIGHTS_ENV} or "
                        "../shared/weights beside the checkout")


def default_data_dir() -> Path:
    """The default real-face set (built from the default faces folder on first use)."""
    from search import paths
    from studies import quality

    return quality.default_data(paths.runs_dir())


def answers_and_people(data: Path, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """True classes and eval person of ``image_ids`` (from eval_answers.csv, eval_people.csv)."""
    from core.synth_layout import EVAL_PEOPLE

    people_csv = data / EVAL_PEOPLE
    if not people_csv.is_file():
        raise DataError(f"{people_csv}: missing (a set from an older core.synth); delete "
                        f"{data} and rerun to rebuild it")
    people = pd.read_csv(people_csv, dtype={"ImageID": str}).set_index("ImageID")
    return (answers_for(data / ANSWERS_FILE, image_ids),
            people.loc[list(image_ids), "person"].to_numpy())


def protocol_parser(prog: str, description: str, search: bool = True) -> argparse.ArgumentParser:
    """The flags every real-face bench shares: faces, weights, seeds, the protocol (its search's
    trials and folds with ``search``), device."""
    from core.synth_faces import FACES_ENV, default_faces_dir
    from studies import quality

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--faces", type=Path, default=default_faces_dir(),
                   help=f"faces folder (faces.csv, photos/); default ${FACES_ENV} or "
                        "../shared/faces beside the checkout")
    weights_arg(p)
    p.add_argument("--seeds", type=int, default=1, help="repeat with this many sampler seeds")
    p.add_argument("--seed", type=int, default=0, help="first sampler seed")
    small = p.add_argument_group(
        "another protocol (tests, smoke runs, a GPU's larger run; figures not comparable)")
    if search:
        small.add_argument("--trials", type=int, default=TRIALS)
        small.add_argument("--folds", type=int, default=quality.FOLDS)
    small.add_argument("--epochs", type=int, default=quality.EPOCHS)
    small.add_argument("--people", type=int, default=quality.PEOPLE)
    small.add_argument("--eval-people", type=int, default=quality.EVAL_PEOPLE)
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:N (default cpu: the README's figures are the CPU's; "
                        "a GPU can afford a larger --trials/--epochs protocol)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = protocol_parser("python -m bench.quality", __doc__.split("\n")[0])
    p.add_argument("--no-search", action="store_true",
                   help="score the studies already in runs/quality/seedN (finished or cut "
                        "short: their complete trials) instead of searching anew")
    p.add_argument("--summarize", action="store_true",
                   help="print the table of the seeds already finished (runs/quality/seed*/"
                        "figures.json) without training, e.g. after an interrupted --seeds run")
    return p


def _timed(fn, *args, **kwargs) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def prepare(args: argparse.Namespace, runs: Path,
            label_noise: float = 0.0) -> tuple[Path, dict, pd.DataFrame]:
    """Data set and image caches (built on first use): data dir, stage seconds, crop shares;
    ``label_noise`` plants label errors in the set (``bench.labels``)."""
    from core.cache import build_cache, default_cache_root
    from studies import face_settings, quality

    progress = sys.stderr.isatty()
    data, t_data = _timed(quality.ensure_data, runs, args.faces, args.people, args.eval_people,
                          quality.DATA_SEED, progress, label_noise)
    reused = any(default_cache_root(data).glob("boxes-*.csv"))
    sizes = list(quality.IMAGE_SIZES.values())
    faces = face_settings(quality)
    first, t_faces = _timed(build_cache, data, sizes[0], faces, progress=progress)
    t_cache = sum(_timed(build_cache, data, s, faces, progress=progress)[1] for s in sizes[1:])
    stages = {"data": t_data, "faces": t_faces, "cache": t_cache, "caches_reused": reused}
    shares = crop_shares(first.index, pd.read_csv(data / "true_boxes.csv"))
    return data, stages, shares


def search_study(args: argparse.Namespace, data: Path, seed: int, out: Path,
                 extra: Sequence[str] = ()) -> None:
    """The protocol's search (``args.trials`` trials, no pruner) into ``out``/study.db; ``extra``
    flags go to ``search.run`` (``bench.labels``: ``--corrections``)."""
    from search import run as search_run

    argv = ["--study", STUDY, "--trials", str(args.trials), "--data", str(data),
            "--storage", f"sqlite:///{out / 'study.db'}", "--artifacts", str(out / "artifacts"),
            "--sampler", "tpe", "--seed", str(seed), "--pruner", "none",
            "--epochs", str(args.epochs), "--folds", str(args.folds),
            "--timeout", str(SAFETY_TIMEOUT_S), "--final", "0",  # a cap, not a user's budget
            "--device", args.device,
            "--weights", str(args.weights), *extra]
    if sys.stderr.isatty():
        argv.append("--progress")
    if search_run.main(argv) != 0:
        raise DataError(f"bench.quality: the search (seed {seed}) failed; see above")


def ensemble_study(out: Path, data: Path, csv: str = "submission.csv") -> Submission:
    """``search.ensemble`` on the study in ``out``, written to ``out/csv`` (its output kept in
    ensemble.txt, or ``ensemble_<csv stem>.txt`` for another name); the submission's record
    (the .json beside the csv)."""
    from search.ensemble import cli as ensemble

    target = out / csv
    log = out / ("ensemble.txt" if csv == "submission.csv" else f"ensemble_{target.stem}.txt")
    argv = ["--study", STUDY, "--storage", f"sqlite:///{out / 'study.db'}",
            "--artifacts", str(out / "artifacts"), "--out", str(target), "--data", str(data)]
    with contextlib.redirect_stdout(io.StringIO()) as text:
        code = ensemble.main(argv)
    log.write_text(text.getvalue())
    if code != 0:
        raise DataError(f"bench.quality: the ensemble failed (output in {log})")
    return Submission.from_json(json.loads(target.with_suffix(".json").read_text()))


def _best_trial(out: Path) -> tuple[float, int, np.ndarray, int]:
    """(OOF macro F1, number, eval probabilities) of the study's best complete trial, and how
    many trials finished (fewer than asked only when the safety time cap stopped the search)."""
    import optuna
    from optuna.trial import TrialState

    from search.artifacts import EVAL, load_array, open_store

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    best = study.best_trial
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    return (float(best.value), best.number,
            load_array(best, open_store(out / "artifacts"), EVAL), done)


def run_seed(args: argparse.Namespace, data: Path, seed: int, root: Path) -> dict:
    """One fresh search + ensemble with sampler seed ``seed``; its figures and stage times."""
    from core.dataset import load_eval_table

    out = root / f"seed{seed}"
    if args.no_search:  # score the study already there (finished or cut short)
        if not (out / "study.db").is_file():
            raise DataError(f"{out / 'study.db'}: no study to score (--no-search)")
        t_search = float("nan")
    else:
        shutil.rmtree(out, ignore_errors=True)  # a bench run measures now, never resumes
        out.mkdir(parents=True)
        _, t_search = _timed(search_study, args, data, seed, out)
    record, t_ens = _timed(ensemble_study, out, data)
    eval_table = load_eval_table(data)
    oof, number, eval_probs, done = _best_trial(out)
    if done < args.trials:
        print(f"WARNING: seed {seed}: the {SAFETY_TIMEOUT_S} s safety cap stopped the search "
              f"after {done} of {args.trials} trials; its figures are not the fixed protocol's",
              flush=True)
    sub = read_answers(out / "submission.csv")
    if sub.index.tolist() != eval_table["ImageID"].tolist():
        raise DataError(f"{out / 'submission.csv'}: rows are not in eval/info.csv order")
    gauge = cached_gauge(out / "gauge.npz", data, args.weights, args.epochs, args.device, seed)
    t_gauge = gauge["seconds"]
    answers, people = answers_and_people(data, eval_table["ImageID"])
    preds = {"heldout": eval_probs.argmax(axis=1), "submission": sub.to_numpy(),
             "gauge": gauge["eval_probs"].argmax(axis=1)}
    single, submitted, hand = (task_f1(answers, p) for p in preds.values())
    boot = people_bootstrap(answers, list(preds.values()), people)
    fig = record.figures
    result = {
        "seed": seed, "trials_finished": done, "best_trial": number, "oof": oof,
        "heldout": single["f1"], "gap": oof - single["f1"],
        "ensemble_oof_in_sample": fig.get("ensemble_oof_f1_in_sample", float("nan")),
        "ensemble_cross_fitted": fig.get("ensemble_cross_fitted_f1", float("nan")),
        "ensemble_heldout": fig.get("ensemble_eval_f1", submitted["f1"]),
        "best_single_cross_fitted": fig.get("best_single_cross_fitted_f1", float("nan")),
        "best_single_rule_heldout": fig.get("best_single_eval_f1", single["f1"]),
        "submission_heldout": submitted["f1"],
        "submission_uses": record.uses,
        "gauge_heldout": hand["f1"], "gauge_val_f1": gauge["val_f1"],
        "submission_minus_gauge": submitted["f1"] - hand["f1"],
        "intervals": {"heldout": interval(boot[:, 0]), "submission": interval(boot[:, 1]),
                      "gauge": interval(boot[:, 2]),
                      "submission_minus_gauge": interval(boot[:, 1] - boot[:, 2])},
        "best_single": single, "submission": submitted, "gauge": hand,
        "seconds": {"search": t_search, "ensemble": t_ens, "gauge": t_gauge},
    }
    result["ensemble_gain"] = result["ensemble_heldout"] - result["heldout"]  # issue 13's goal
    (out / "figures.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


ROWS = (
    ("best trial: OOF macro F1 (what the search said)", lambda r: r["oof"]),
    ("best trial: held-out macro F1 (what we got)", lambda r: r["heldout"]),
    ("best trial: gap OOF - held-out", lambda r: r["gap"]),
    ("ensemble: OOF F1 in-sample (optimistic)", lambda r: r["ensemble_oof_in_sample"]),
    ("ensemble: cross-fitted OOF F1", lambda r: r["ensemble_cross_fitted"]),
    ("ensemble: held-out macro F1", lambda r: r["ensemble_heldout"]),
    ("ensemble: gain held-out over best trial", lambda r: r["ensemble_gain"]),
    ("best trial: cross-fitted OOF F1 (its rule)", lambda r: r["best_single_cross_fitted"]),
    ("best trial: held-out F1 through its rule", lambda r: r["best_single_rule_heldout"]),
    ("submission: held-out macro F1", lambda r: r["submission_heldout"]),
    ("gauge (one hand run): held-out macro F1", lambda r: r["gauge_heldout"]),
    ("submission minus gauge (held-out)", lambda r: r["submission_minus_gauge"]),
    *((f"95% over eval people: {name}", lambda r, k=key: r["intervals"][k])
      for name, key in (("best trial", "heldout"), ("submission", "submission"),
                        ("gauge", "gauge"), ("submission - gauge", "submission_minus_gauge"))),
    *((f"held-out {task} F1: best trial / submission / gauge",
       lambda r, t=task: (r["best_single"][t], r["submission"][t], r["gauge"][t]))
      for task in ("mask", "gender", "age", "old_classes", "old_age")),
    ("trials finished", lambda r: r["trials_finished"]),
    ("wall s: search", lambda r: r["seconds"]["search"]),
    ("wall s: ensemble", lambda r: r["seconds"]["ensemble"]),
    ("wall s: gauge (training + eval prediction)", lambda r: r["seconds"]["gauge"]),
)


def _cell(label: str, v) -> str:
    if v is None:
        return ""
    if label.startswith("95%"):
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]" if "-" in label else f"[{v[0]:.3f}, {v[1]:.3f}]"
    if isinstance(v, tuple | list):
        return " / ".join(f"{x:.3f}" for x in v)
    if label.startswith("wall"):
        return f"{v:.1f}"
    if label.startswith("trials"):
        return f"{v:g}"
    return f"{v:+.4f}" if "gap" in label or "gain" in label else f"{v:.4f}"


def medians(results: list[dict]) -> dict:
    """Median over seeds of every figure the last line and the table show."""
    return _over_seeds(results, median)


def spreads(results: list[dict]) -> dict:
    """Max minus min over seeds of the same figures (the spread the README quotes)."""
    return _over_seeds(results, lambda v: float(np.nanmax(v) - np.nanmin(v)))


def _over_seeds(results: list[dict], reduce) -> dict:
    keys = ("oof", "heldout", "gap", "ensemble_oof_in_sample", "ensemble_cross_fitted",
            "ensemble_heldout", "ensemble_gain", "best_single_cross_fitted",
            "best_single_rule_heldout", "submission_heldout", "gauge_heldout",
            "submission_minus_gauge", "trials_finished")
    out = {k: reduce([r[k] for r in results]) for k in keys}
    for part in ("best_single", "submission", "gauge"):
        out[part] = {t: reduce([r[part][t] for r in results]) for t in results[0][part]}
    out["seconds"] = {k: reduce([r["seconds"][k] for r in results]) for k in results[0]["seconds"]}
    out["intervals"] = dict.fromkeys(results[0]["intervals"])  # per seed only
    return out


def print_report(results: list[dict], med: dict, stages: dict | None = None,
                 shares: pd.DataFrame | None = None) -> None:
    many = len(results) > 1
    cols = [f"seed {r['seed']}" for r in results] + (["median", "spread"] if many else [])
    table = results + ([med, spreads(results)] if many else [])
    width = max(len(label) for label, _ in ROWS) + 1
    cells = [[_cell(label, get(r)) for r in table] for label, get in ROWS]
    col = max(16, *(len(c) + 2 for row in cells for c in row))  # never run two cells together
    print(f"\n{'':<{width}}" + "".join(f"{c:>{col}}" for c in cols))
    for (label, _), row in zip(ROWS, cells, strict=True):
        print(f"{label:<{width}}" + "".join(f"{c:>{col}}" for c in row))
    uses = sorted({r["submission_uses"] for r in results})
    print(f"(submission = {', '.join(uses)}, as search.ensemble chose; '>=60': old_classes = "
          "mean F1 of the six >=60 classes, old_age = >=60 within the age task)")
    if stages is None or shares is None:
        return
    reused = " (reused from an earlier run)" if stages["caches_reused"] else ""
    print(f"wall s: data {stages['data']:.1f}, faces (MTCNN + first cache) {stages['faces']:.1f}"
          f"{reused}, cache (other sizes) {stages['cache']:.1f}")
    print("\nface crops holding >= 90% of the true face box (share, images):")
    wide = shares.pivot_table(index=["split", "mask"], columns="box_source",
                              values=["share", "images"], aggfunc="first")
    for (split, mask), row in wide.iterrows():
        cells = [f"{src} {row[('share', src)]:.3f} ({int(row[('images', src)])})"
                 for src in wide["share"].columns if pd.notna(row[("share", src)])]
        print(f"  {split:<5} {['wear', 'incorrect', 'not_worn'][int(mask)]:<9} " + ", ".join(cells))


def summarize(root: Path) -> dict:
    """The table and last line of the seeds already finished under ``root`` (their
    figures.json), without training: an interrupted ``--seeds`` run keeps its finished seeds."""
    files = sorted(root.glob("seed*/figures.json"), key=lambda f: int(f.parent.name[4:]))
    if not files:
        raise DataError(f"{root}: no finished seed (seed*/figures.json); run bench.quality first")
    results = [json.loads(f.read_text()) for f in files]
    med = medians(results)
    print_report(results, med)
    print(last_line(med), flush=True)
    return {"seeds": results, "median": med}


def run(args: argparse.Namespace) -> dict:
    from core.weights import fingerprint
    from search import paths
    from studies import quality

    if args.summarize:
        return summarize(paths.runs_dir() / STUDY)
    args.weights = check_weights_folder(args.weights)
    if args.seeds < 1 or args.trials < 1:
        raise DataError("--seeds and --trials must be >= 1")
    runs = paths.runs_dir()
    root = runs / STUDY
    data, stages, shares = prepare(args, runs)
    results = [run_seed(args, data, s, root) for s in range(args.seed, args.seed + args.seeds)]
    med = medians(results)
    protocol = ("trials", "epochs", "folds", "people", "eval_people", "seed", "seeds", "device")
    payload = {"protocol": {**{k: getattr(args, k) for k in protocol},
                            "weights": fingerprint(args.weights, quality.BACKBONES)},
               "data": data.name, "stages": stages, "seeds": results, "median": med,
               "spread": spreads(results),
               "crops": shares.to_dict(orient="records")}
    from core.atomic import atomic_write

    atomic_write(root / "quality.json",
                 lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n"))
    print_report(results, med, stages, shares)
    print(f"figures: {root / 'quality.json'}")
    print(last_line(med), flush=True)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)  # run's result (a dict) means success


if __name__ == "__main__":
    sys.exit(main())
