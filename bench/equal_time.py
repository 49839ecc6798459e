"""The search against the hand recipe given the same minutes, scored held out.

``python -m bench.equal_time [--seeds N]`` takes each study ``bench.quality`` left under
``runs/quality/seedN`` and compares, on the held-out eval answers:

- **search alone**: what ``search.ensemble`` submitted from the search trials (bench.quality's);
- **search + final stage**: ``search.refit --top 1`` (the best configuration at twice the
  epochs, what ``search.run --hours`` ends with), then ``search.ensemble`` again over search and
  final trials (``submission_final.csv``);
- **the one-run gauge**: the recipe trained once on 90% of the people (bench.quality's);
- **the equal-time gauge**: what a competitor with the search's minutes does with the recipe
  alone. It trains the recipe as a fold ensemble on the same folds at the study's epochs, then
  again at double the epochs while the minutes the search + final stage took are not spent
  (6, 12, 24 epochs: the whole ladder costs about what they cost), and submits the rung its
  out-of-fold F1 prefers (never the held-out answers). The ladder is one study of its own
  (``runs/quality/equal_time``), trained once for every seed: the recipe is the search's trial 0
  and trains the same on the same folds whatever the sampler seed.

Minutes are Optuna's own record of each trial (start to complete), on both sides: the search
trials and the final trial against the ladder's rungs. Figures go to
``runs/quality/equal_time.json``; the last line is for scripts. A rerun trains nothing already
done (``search.run`` and ``search.refit`` skip finished work).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import seed_table, task_f1
from bench.final import refit, seeds_parser, studies_root
from bench.quality import (
    STUDY,
    answers_and_people,
    ensemble_study,
    search_study,
)
from core.answers import read_answers
from core.atomic import atomic_write
from core.bootstrap import interval, people_bootstrap
from core.cli import run_cli
from core.errors import DataError

#: Epochs of the ladder's rungs, as multiples of the study's: each rung doubles the last.
LADDER = (1, 2, 4)
ARMS = ("search", "final", "gauge", "equal_gauge")
GAUGE_DIR = "equal_time"


def build_parser() -> argparse.ArgumentParser:
    return seeds_parser("python -m bench.equal_time", __doc__.split("\n")[0])


def _study(out: Path):
    import optuna

    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{out / 'study.db'}")


def trial_seconds(trial) -> float:
    """Wall seconds Optuna recorded for a finished trial."""
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def ladder(args: argparse.Namespace, root: Path, template: Path) -> list[dict]:
    """The recipe's fold ensemble at each rung of ``LADDER`` (trained once, in
    ``root/equal_time``, with ``template``'s data and protocol): per rung its epochs, OOF F1,
    seconds, and eval probabilities."""
    from optuna.trial import TrialState

    from search.artifacts import EVAL, load_array, open_store
    from search.worker.final_choice import is_recipe
    from search.worker.stage import EPOCHS_ATTR, final_trials
    from studies import quality

    base = _study(template)
    settings = argparse.Namespace(trials=1, epochs=int(base.user_attrs["epochs"]),
                                  folds=int(base.user_attrs["n_folds"]), device=args.device,
                                  weights=args.weights)
    out = root / GAUGE_DIR
    out.mkdir(parents=True, exist_ok=True)
    search_study(settings, Path(base.user_attrs["data_dir"]), 0, out)  # trial 0: the recipe
    for factor in LADDER[1:]:
        refit(out, args, None, epochs=factor * settings.epochs)
    study, store = _study(out), open_store(out / "artifacts")
    recipe = study.trials[0]
    if recipe.state != TrialState.COMPLETE or not is_recipe(recipe, [quality.GAUGE]):
        raise DataError(f"{out / 'study.db'}: trial 0 is not the study's finished warm-start "
                        "recipe; delete the folder and rerun")
    finals = {int(f.user_attrs[EPOCHS_ATTR]): f
              for f in final_trials(study, (TrialState.COMPLETE,))}
    rungs = [recipe, *(finals[factor * settings.epochs] for factor in LADDER[1:])]
    return [{"epochs": factor * settings.epochs, "trial": t.number, "oof": float(t.value),
             "seconds": trial_seconds(t), "eval_probs": load_array(t, store, EVAL)}
            for factor, t in zip(LADDER, rungs, strict=True)]


def choose_rung(rungs: Sequence[dict], budget_s: float) -> tuple[dict, float]:
    """The competitor's pick in ``budget_s``: every rung started before the budget ran out
    (a run once started finishes, so the gauge may overspend by part of its last rung: that
    favours the gauge), the best out-of-fold F1 among them; and the seconds they took."""
    spent, climbed = 0.0, []
    for rung in rungs:
        if spent >= budget_s:
            break
        spent += rung["seconds"]
        climbed.append(rung)
    return max(climbed, key=lambda r: r["oof"]), spent


def search_side(out: Path, args: argparse.Namespace) -> tuple[dict, float, float, Path]:
    """The final stage on one seed's study and the ensemble over search + final trials: their
    submissions' eval predictions, the seconds of the search trials and of the final trial, and
    the study's data folder (the study read once, after the refit)."""
    from optuna.trial import TrialState

    from search.pseudo_labels import THRESHOLD_ATTR
    from search.worker.stage import final_trials, search_trials

    refit(out, args, None)
    study = _study(out)
    data = Path(study.user_attrs["data_dir"])
    ensemble_study(out, data, "submission_final.csv")
    search_s = sum(trial_seconds(t) for t in search_trials(study, (TrialState.COMPLETE,)))
    plain = [f for f in final_trials(study, (TrialState.COMPLETE,))
             if f.user_attrs.get(THRESHOLD_ATTR) is None]
    final_s = trial_seconds(min(plain, key=lambda f: f.number))
    preds = {arm: read_answers(out / name).to_numpy()
             for arm, name in (("search", "submission.csv"), ("final", "submission_final.csv"))}
    return preds, search_s, final_s, data


def run_seed(args: argparse.Namespace, seed: int, root: Path, rungs: list[dict]) -> dict:
    """One seed's four arms, held out, with the paired interval of search + final minus the
    equal-time gauge."""
    from core.dataset import load_eval_table

    out = root / f"seed{seed}"
    figures = out / "figures.json"
    if not figures.is_file():
        raise DataError(f"{out}: no finished bench.quality seed (run python -m bench.quality "
                        f"--seed {seed} first)")
    preds, search_s, final_s, data = search_side(out, args)
    chosen, gauge_s = choose_rung(rungs, search_s + final_s)
    eval_ids = load_eval_table(data)["ImageID"]
    with np.load(out / "gauge.npz", allow_pickle=False) as z:
        preds["gauge"] = z["eval_probs"].argmax(axis=1)
    preds["equal_gauge"] = chosen["eval_probs"].argmax(axis=1)
    answers, people = answers_and_people(data, eval_ids)
    scores = {arm: task_f1(answers, preds[arm]) for arm in ARMS}
    boot = people_bootstrap(answers, [preds[a] for a in ARMS], people)
    return {"seed": seed, "scores": scores,
            "final_minus_equal_gauge": scores["final"]["f1"] - scores["equal_gauge"]["f1"],
            "search_minus_equal_gauge": scores["search"]["f1"] - scores["equal_gauge"]["f1"],
            "interval_final_minus_equal_gauge": interval(boot[:, 1] - boot[:, 3]),
            "equal_gauge_epochs": chosen["epochs"],
            "seconds": {"search": search_s, "final": final_s, "equal_gauge": gauge_s}}


def report(results: list[dict], rungs: list[dict]) -> dict:
    """Print the per-seed table with the median and spread; the medians."""
    rows = [(f"held-out {task}: {arm}", lambda r, a=arm, t=task: r["scores"][a][t])
            for task in ("f1", "old_classes") for arm in ARMS]
    rows += [(key, lambda r, k=key: r[k])
             for key in ("final_minus_equal_gauge", "search_minus_equal_gauge",
                         "equal_gauge_epochs")]
    rows += [(f"wall s: {k}", lambda r, k=k: r["seconds"][k])
             for k in ("search", "final", "equal_gauge")]
    print("\nthe recipe's ladder: " + "; ".join(
        f"{r['epochs']} epochs OOF {r['oof']:.4f} in {r['seconds']:.0f} s" for r in rungs))
    med = seed_table(rows, results)
    for r in results:
        lo, hi = r["interval_final_minus_equal_gauge"]
        print(f"seed {r['seed']}: 95% over eval people, search + final - equal-time gauge "
              f"[{lo:+.3f}, {hi:+.3f}]")
    return med


def run(args: argparse.Namespace) -> dict:
    root = studies_root(args)
    seeds = range(args.seed, args.seed + args.seeds)
    rungs = ladder(args, root, root / f"seed{args.seed}")
    results = [run_seed(args, s, root, rungs) for s in seeds]
    med = report(results, rungs)
    ladder_record = [{k: v for k, v in r.items() if k != "eval_probs"} for r in rungs]
    payload = {"ladder": ladder_record, "seeds": results, "median": med}
    atomic_write(root / "equal_time.json",
                 lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    print(f"equal_time seeds={len(results)} "
          f"search={med['held-out f1: search']:.4f} final={med['held-out f1: final']:.4f} "
          f"gauge={med['held-out f1: gauge']:.4f} "
          f"equal_gauge={med['held-out f1: equal_gauge']:.4f} "
          f"final_minus_equal_gauge={med['final_minus_equal_gauge']:+.4f}", flush=True)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
