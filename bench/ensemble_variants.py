"""Ensemble recipe variants replayed on finished studies, scored on their held-out answers.

``python -m bench.ensemble_variants runs/quality/seed0 runs/quality/seed1 ...`` reads each
folder ``bench.quality`` leaves (``study.db``, ``artifacts/``; the data must ship
``eval_answers.csv``), runs ``search.ensemble``'s own decision
(``search.ensemble.choice.compare``) with each recipe below, and prints per study and on
average: the ensemble's held-out macro F1 minus the best trial's plain argmax (issue 13's goal),
the submission minus the best single trial through the same rule (``--top 1 --size 1``), and
the nested estimate minus held-out. Then it splits the default ensemble's gain over the best
trial into the six ">=60" classes' share of macro F1 and the other twelve, in sample and held
out: where an in-sample gain comes from rare classes with a handful of people per fold, it is
noise. No training: seconds per study.

``--first N`` replays each study as if it had stopped after its first N search trials. The
yardstick's runs are deterministic on the CPU (a rerun gives the same trial values), so this is
what an N-trial ``bench.quality`` would have ensembled, without training it again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import OLD_CLASSES
from core.cli import run_cli
from core.errors import DataError
from core.labels import NUM_CLASSES
from core.metrics import macro_f1
from search.ensemble.nested import Recipe
from search.ensemble.select import Selection
from search.worker.stage import is_final

#: The recipes raced: the CLI's default and the variants that change one thing.
VARIANTS = {
    "default": Recipe(),
    "offsets none": Recipe(offsets="none"),
    "no bagging": Recipe(selection=Selection(bags=1)),
    "init 3": Recipe(selection=Selection(init=3)),
    "mean of best 2": Recipe(selection=Selection(size=0, init=2, bags=1)),
}


def load(folder: Path, first: int | None = None) -> dict:
    """OOF and eval probabilities of every candidate trial of ``folder``'s study (of its first
    ``first`` search trials when given), the labels, folds and eval answers (the same loading
    ``search.ensemble`` does)."""
    import optuna

    from core.answers import eval_answers
    from search.artifacts import open_store
    from search.ensemble import cli
    from search.ensemble.trials import load_candidates, load_eval

    db = folder / "study.db"
    if not db.is_file():
        raise DataError(f"{folder}: no study.db (pass folders bench.quality wrote)")
    storage = f"sqlite:///{db}"
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage)]
    if len(names) != 1:
        raise DataError(f"{db}: expected one study, found {len(names)}")
    args = cli.build_parser().parse_args(["--study", names[0], "--storage", storage,
                                          "--artifacts", str(folder / "artifacts")])
    inputs = cli.load_inputs(args)
    data_dir, table, folds, eval_table = (inputs.data_dir, inputs.table, inputs.folds,
                                          inputs.eval_table)
    ranked = inputs.ranked
    if first is not None:
        ranked = [t for t in ranked if t.number < first and not is_final(t)]
    store = open_store(folder / "artifacts")
    cands = load_candidates(ranked, store, len(table))
    answers = eval_answers(data_dir, eval_table["ImageID"].tolist())
    if answers is None:
        raise DataError(f"{data_dir}: no eval_answers.csv, so nothing can be scored held out")
    return {"oofs": [c.oof for c in cands], "labels": table["label"].to_numpy(np.int64),
            "folds": np.asarray(folds), "answers": answers,
            "evals": load_eval(cands, np.ones(len(cands)), store, len(eval_table))}


def replay(study: dict, recipe: Recipe) -> tuple[dict[str, float], dict]:
    """One recipe through ``search.ensemble.choice.compare``: its held-out figures and nested
    one, and ``compare``'s result (so the default's is not fitted again for the gain split)."""
    from search.ensemble.choice import SINGLE, compare

    oofs, y, folds, evals, ans = (study[k] for k in ("oofs", "labels", "folds", "evals",
                                                     "answers"))
    cmp = compare(oofs, y, folds, recipe)
    single = compare(oofs, y, folds, Recipe(top=1, selection=SINGLE.selection,
                                            offsets=recipe.offsets))

    def heldout(c: dict, name: str) -> float:
        return macro_f1(ans, c["fitted"][name].predict(evals, c["rule"][name] == "offsets"))

    best = int(np.argmax(cmp["fitted"]["best_single"].weights))
    ensemble = heldout(cmp, "ensemble")
    submission = heldout(cmp, cmp["uses"])
    return {"submission": submission,
            "ensemble - best": ensemble - macro_f1(ans, evals[best].argmax(axis=1)),
            "submission - single": submission - heldout(single, single["uses"]),
            "nested - held-out": cmp["nested"]["ensemble"] - ensemble}, cmp


def old_share(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Macro F1 as (the six ">=60" classes' part, the other classes' part); they sum to it."""
    from sklearn.metrics import f1_score

    f1 = f1_score(y, pred, labels=np.arange(NUM_CLASSES), average=None, zero_division=0)
    present = np.isin(np.arange(NUM_CLASSES), np.union1d(y, pred))
    old = np.isin(np.arange(NUM_CLASSES), OLD_CLASSES)
    return (float(f1[present & old].sum() / present.sum()),
            float(f1[present & ~old].sum() / present.sum()))


def gain_by_part(study: dict, cmp: dict) -> list[float]:
    """Ensemble minus best trial of ``compare``'s result ``cmp`` (plain argmax both): >=60 and
    rest, in sample then held out."""
    out = []
    for probs, truth in ((study["oofs"], study["labels"]), (study["evals"], study["answers"])):
        ens = old_share(truth, cmp["fitted"]["ensemble"].predict(probs, False))
        one = old_share(truth, cmp["fitted"]["best_single"].predict(probs, False))
        out += [ens[0] - one[0], ens[1] - one[1]]
    return out


def run(folders: Sequence[Path], first: int | None = None) -> dict:
    studies = {f: load(f, first) for f in folders}
    replays = {name: [replay(s, r) for s in studies.values()] for name, r in VARIANTS.items()}
    table = {name: [figures for figures, _ in rows] for name, rows in replays.items()}
    names = [f.name for f in folders]
    print(f"{len(folders)} studies: " + ", ".join(
        f"{n} ({len(s['oofs'])} trials)" for n, s in zip(names, studies.values(), strict=True)))
    for figure in ("submission", "ensemble - best", "submission - single", "nested - held-out"):
        print(f"\n{figure + ' (held-out macro F1)':<40}" + "".join(f"{n:>9}" for n in names)
              + f"{'mean':>9}{'min':>9}")
        for name, rows in table.items():
            v = np.array([r[figure] for r in rows])
            sign = "" if figure == "submission" else "+"
            print(f"  {name:<38}" + "".join(f"{x:{sign}9.4f}" for x in [*v, v.mean(), v.min()]))
    parts = np.array([gain_by_part(s, cmp) for s, (_, cmp) in
                      zip(studies.values(), replays["default"], strict=True)]).mean(axis=0)
    print(f"\ndefault ensemble minus best trial, mean: in sample >=60 {parts[0]:+.4f} rest "
          f"{parts[1]:+.4f}; held out >=60 {parts[2]:+.4f} rest {parts[3]:+.4f}")
    return {"variants": table, "parts": parts.tolist()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ensemble_variants",
                                description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path,
                   help="bench.quality seed folders (runs/quality/seedN)")
    p.add_argument("--first", type=int, metavar="N",
                   help="replay each study as of its first N search trials")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        run(args.folders, args.first)
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
