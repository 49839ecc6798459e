"""The final stage and pseudo-labels, paired on bench.quality's studies and scored held out.

``python -m bench.final [--seeds N] [--pseudo P]`` takes each study ``bench.quality`` left under
``runs/quality/seedN`` (its search and ensemble done) and runs ``search.refit`` on it twice:

- the best configuration retrained at the final stage's epochs (``search.refit --top 1``);
- the same again with the submission's confident eval predictions as pseudo-labels
  (``--pseudo-labels P``, the opt-in of ``search.pseudo_labels``), the teacher being what
  ``search.ensemble`` submitted. P is the threshold that takes ``--pseudo-share`` of the eval
  images (default 0.2, what the gauge's own 0.9 took in ``bench.options``): a blend of fold
  models is far less sure than one model, so one fixed P would take nothing on some seeds.

Both are trials of the study, on the same folds, epochs and crops, so the difference between
them is the pseudo-labels' alone; the final trial against the search trial it retrains is what
the final stage adds. Each is scored on the held-out eval answers (macro F1, ">=60" F1, a
bootstrap interval over eval people for the paired differences). Figures go to
``runs/quality/seedN/final.json`` and ``runs/quality/final.json``; the last line is for
scripts. A rerun trains nothing already done: ``search.refit`` skips a refit it has finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import seed_table, task_f1
from bench.quality import STUDY, answers_and_people, check_weights_folder, weights_arg
from core.answers import read_answers
from core.atomic import atomic_write
from core.bootstrap import interval, people_bootstrap
from core.cli import run_cli
from core.errors import DataError
from search.run_args import fraction

DEFAULT_SHARE = 0.2  # of the eval images; the gauge's own 0.9 took 15-20% (bench.options)
ARMS = ("search", "final", "pseudo", "submission")


def seeds_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags of a bench that works on ``bench.quality``'s finished studies: which seeds,
    the weights, the device."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--seeds", type=int, default=1, help="this many of bench.quality's seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed (runs/quality/seedN)")
    weights_arg(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = seeds_parser("python -m bench.final", __doc__.split("\n")[0])
    p.add_argument("--pseudo-share", type=fraction, default=DEFAULT_SHARE, metavar="S",
                   help="the second refit's pseudo-labels: the threshold that takes this share "
                        "of the eval images (default %(default)s)")
    return p


def refit(out: Path, args: argparse.Namespace, pseudo: float | None,
          epochs: int | None = None) -> float:
    """``search.refit --top 1`` on the study in ``out`` (with ``--pseudo-labels`` and
    ``--epochs`` when given); its wall seconds (near 0 when it was already done)."""
    from search import refit as search_refit

    argv = ["--study", STUDY, "--storage", f"sqlite:///{out / 'study.db'}",
            "--artifacts", str(out / "artifacts"), "--top", "1",
            "--weights", str(args.weights), "--device", args.device]
    if pseudo is not None:
        argv += ["--pseudo-labels", str(pseudo)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if sys.stderr.isatty():
        argv.append("--progress")
    t0 = time.perf_counter()
    if search_refit.main(argv) != 0:
        raise DataError(f"bench.final: search.refit failed on {out / 'study.db'}; see above")
    return time.perf_counter() - t0


def share_threshold(out: Path, share: float) -> float:
    """The pseudo-label threshold that takes ``share`` of the eval images over the folds'
    blends of the submission of the study in ``out``, rounded down to 4 decimals (so the
    refit's flag takes them)."""
    import math

    from search.artifacts import open_store
    from search.finished_study import FinishedStudy, open_study
    from search.pseudo_labels import class_confidence, fold_blends, threshold_for_share

    url = f"sqlite:///{out / 'study.db'}"
    found = FinishedStudy(STUDY, url, open_study(STUDY, url), open_store(out / "artifacts"))
    confidence = np.concatenate([class_confidence(*blend) for blend in fold_blends(found)[0]])
    return math.floor(threshold_for_share(confidence, share) * 1e4) / 1e4


def scored_trials(out: Path, pseudo: float) -> tuple[dict, dict, Path]:
    """The eval probabilities of the best search trial and of its two final trials, those
    trials' numbers and recorded facts, and the study's data folder (one read of the study)."""
    import optuna
    from optuna.trial import TrialState

    from search.artifacts import EVAL, load_array, open_store
    from search.pseudo_labels import COUNT_ATTR, SHARE_ATTR, THRESHOLD_ATTR
    from search.worker.final_stage import best_configurations
    from search.worker.stage import REFIT_OF_ATTR, final_trials

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")
    best = best_configurations(study, 1)[0]
    mine = [f for f in final_trials(study, (TrialState.COMPLETE,))
            if f.user_attrs[REFIT_OF_ATTR] == best.number]
    final = [f for f in mine if f.user_attrs.get(THRESHOLD_ATTR) is None]
    taught = [f for f in mine if f.user_attrs.get(THRESHOLD_ATTR) == pseudo]
    if not final or not taught:
        raise DataError(f"{out / 'study.db'}: no complete final trial of trial {best.number} "
                        f"{'with' if final else 'without'} pseudo-labels")
    trials = {"search": best, "final": final[0], "pseudo": taught[0]}
    store = open_store(out / "artifacts")
    probs = {arm: load_array(t, store, EVAL) for arm, t in trials.items()}
    facts = {f"{arm}_trial": t.number for arm, t in trials.items()}
    facts.update({f"{arm}_oof": float(t.value) for arm, t in trials.items()},
                 pseudo_count=taught[0].user_attrs[COUNT_ATTR],
                 pseudo_share=taught[0].user_attrs[SHARE_ATTR])
    return probs, facts, Path(study.user_attrs["data_dir"])


def run_seed(args: argparse.Namespace, seed: int, root: Path) -> dict:
    """Both refits of one seed's study, then its held-out figures (kept in its final.json)."""
    from core.dataset import load_eval_table

    out = root / f"seed{seed}"
    if not (out / "submission.csv").is_file():
        raise DataError(f"{out}: no study with a submission (run python -m bench.quality "
                        f"--seed {seed} first)")
    pseudo = share_threshold(out, args.pseudo_share)
    seconds = {"final": refit(out, args, None), "pseudo": refit(out, args, pseudo)}
    probs, facts, data = scored_trials(out, pseudo)
    eval_ids = load_eval_table(data)["ImageID"]
    answers, people = answers_and_people(data, eval_ids)
    preds = {arm: p.argmax(axis=1) for arm, p in probs.items()}
    preds["submission"] = read_answers(out / "submission.csv").loc[list(eval_ids)].to_numpy()
    scores = {arm: task_f1(answers, preds[arm]) for arm in ARMS}
    boot = people_bootstrap(answers, [preds[a] for a in ARMS], people)
    result = {"seed": seed, "pseudo_threshold": pseudo, **facts, "scores": scores,
              "final_gain": scores["final"]["f1"] - scores["search"]["f1"],
              "pseudo_gain": scores["pseudo"]["f1"] - scores["final"]["f1"],
              "pseudo_old_gain": scores["pseudo"]["old_classes"] - scores["final"]["old_classes"],
              "intervals": {"final_gain": interval(boot[:, 1] - boot[:, 0]),
                            "pseudo_gain": interval(boot[:, 2] - boot[:, 1])},
              "seconds": seconds}
    atomic_write(out / "final.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return result


def report(results: list[dict]) -> dict:
    """Print the per-seed table with the median and spread; the medians."""
    rows = [(f"held-out {task}: {arm}", lambda r, a=arm, t=task: r["scores"][a][t])
            for task in ("f1", "old_classes") for arm in ARMS]
    rows += [(key, lambda r, k=key: r[k]) for key in ("final_gain", "pseudo_gain",
                                                      "pseudo_old_gain", "pseudo_share")]
    print()
    med = seed_table(rows, results, width=34, col=12)
    for r in results:
        lo, hi = r["intervals"]["pseudo_gain"]
        print(f"seed {r['seed']}: 95% over eval people, pseudo_gain [{lo:+.3f}, {hi:+.3f}]; "
              f"wall s final {r['seconds']['final']:.0f}, pseudo {r['seconds']['pseudo']:.0f}")
    return med


def studies_root(args: argparse.Namespace) -> Path:
    """Where ``bench.quality`` leaves its seeds' studies, after checking the weights folder
    (``args.weights`` resolved) and ``--seeds``."""
    from search import paths

    args.weights = check_weights_folder(args.weights)
    if args.seeds < 1:
        raise DataError("--seeds must be >= 1")
    return paths.runs_dir() / STUDY


def run(args: argparse.Namespace) -> dict:
    root = studies_root(args)
    results = [run_seed(args, s, root) for s in range(args.seed, args.seed + args.seeds)]
    med = report(results)
    payload = {"seeds": results, "median": med}
    atomic_write(root / "final.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    print(f"final seeds={len(results)} final_gain={med['final_gain']:+.4f} "
          f"pseudo_gain={med['pseudo_gain']:+.4f} pseudo_old_gain={med['pseudo_old_gain']:+.4f}",
          flush=True)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
