"""Ensemble a study's trials into a submission: ``python -m search.ensemble``.

The recipe (``search.ensemble.nested``): rank the complete trials by out-of-fold (OOF) macro
F1, keep the ``--top`` best as the pool and drop those far below its median, choose members and
weights by forward selection (``search.ensemble.select``), then fit a decision rule for macro F1
(offsets on the log-probabilities, ``search.ensemble.decision``). Every one of those choices is
made on OOF rows, so the in-sample figure is optimistic; the figures printed first are nested
cross-fitted (the whole recipe fitted on half of the folds, scored on the other half, and
swapped), for the ensemble and for the best single trial alike. The submission is the ensemble
only when its nested estimate beats the best single trial's, and keeps offsets only when they
raise the nested estimate (``search.ensemble.choice``). ``--top 1 --size 1`` is the best single
trial alone, through the same decision-rule step.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from core.answers import ANSWERS_FILE, eval_answers, write_submission
from core.atomic import atomic_write
from core.cli import Parser, run_cli
from core.dataset import load_eval_table
from core.errors import DataError, first_line
from core.fingerprints import fingerprints
from core.metrics import macro_f1
from search import paths
from search.artifacts import open_store
from search.ensemble.choice import MIN_POOL, compare
from search.ensemble.decision import OFFSET_KINDS
from search.ensemble.nested import Recipe
from search.ensemble.select import OBJECTIVES, Selection
from search.ensemble.submission import Member, Submission
from search.ensemble.trials import (
    check_against_now,
    load_candidates,
    load_eval,
    open_study,
    rank_trials,
)

__all__ = ["StudyInputs", "build_parser", "load_inputs", "main", "run", "write_json"]


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    path = Path(path)
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


# ----------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    r, d = Recipe(), Selection()  # the flags' defaults are the recipe's
    p = Parser(
        prog="python -m search.ensemble",
        description="Choose an ensemble of a study's trials and a decision rule for macro F1 on "
                    "out-of-fold predictions, estimate the whole recipe by nested "
                    "cross-fitting, and write the submission CSV.")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--top", type=int, default=r.top,
                   help=f"pool: the K best complete trials (default {r.top}); "
                        "--top 1 --size 1 is the best single trial alone")
    p.add_argument("--size", type=int, default=d.size,
                   help=f"selection rounds (default {d.size}); the best prefix is kept")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                   help=f"selection objective (default {d.objective})")
    p.add_argument("--init", type=int, default=d.init,
                   help=f"sorted initialisation: start from the N best (default {d.init})")
    p.add_argument("--bags", type=int, default=d.bags,
                   help=f"bagged selections on random halves of the pool (default {d.bags})")
    p.add_argument("--margin", type=float, default=d.margin,
                   help=f"an addition must improve the objective by more (default {d.margin})")
    p.add_argument("--pool-margin", type=float, default=d.pool_margin,
                   help="drop trials below the pool's median F1 minus this "
                        f"(default {d.pool_margin}; negative: keep all)")
    p.add_argument("--min-pool", type=int, default=MIN_POOL,
                   help=f"with fewer complete trials than this, submit the best single trial "
                        f"(default {MIN_POOL}: a nested estimate from 2-3 trials is noise; 1 "
                        "turns the rule off)")
    p.add_argument("--offsets", choices=OFFSET_KINDS, default=r.offsets,
                   help=f"decision-rule offsets to try (default {r.offsets}); kept only when "
                        "the nested estimate says they help")
    p.add_argument("--out", help="submission CSV (default runs/<study>/submission.csv); "
                                 "a .json with members and figures is written next to it")
    p.add_argument("--storage", help="Optuna storage URL or journal file "
                                     "(default sqlite:///runs/<study>.db)")
    p.add_argument("--artifacts",
                   help="artifact store: folder or s3://bucket/prefix (default runs/artifacts)")
    p.add_argument("--data", help="data folder (default: the study's user attr data_dir)")
    p.add_argument("--no-gradcam", action="store_true",
                   help="skip the best trial's Grad-CAM grid (made on the CPU, seconds)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def recipe_of(args: argparse.Namespace) -> Recipe:
    """The CLI flags as a recipe; ``--size 1`` with ``--top 1`` is the single trial."""
    if args.top < 1 or args.size < 1 or args.min_pool < 1:
        raise DataError("--top, --size and --min-pool must be >= 1")
    margin = None if args.pool_margin is None or args.pool_margin < 0 else args.pool_margin
    sel = Selection(objective=args.objective, size=args.size, init=max(1, args.init),
                    bags=max(1, args.bags), margin=args.margin, pool_margin=margin)
    return Recipe(top=args.top, selection=sel, offsets=args.offsets)


@dataclass(frozen=True)
class StudyInputs:
    """What the ensemble reads from a finished study: its complete trials with every fold, best
    first, and the rows they were scored on (checked against the data folder as it is now)."""

    storage: str
    data_dir: Path
    table: pd.DataFrame
    folds: np.ndarray
    eval_table: pd.DataFrame
    ranked: list[optuna.trial.FrozenTrial]
    notes: list[str]  # e.g. complete trials skipped for missing folds
    fingerprints: dict[str, str]


def load_inputs(args: argparse.Namespace) -> StudyInputs:
    """The study of ``--study``/``--storage`` (``--data``: where its data lives now)."""
    # lazy: search.finished_study imports torch (~3 s); --help and flag errors need none
    from search.finished_study import study_rows

    paths.check_study_name(args.study)
    storage = args.storage or paths.default_storage_url(args.study)
    study = open_study(args.study, storage)
    ranked, notes = rank_trials(study)
    data_dir, table, folds = study_rows(study, args.data)
    eval_table = load_eval_table(data_dir)
    now = fingerprints(table, folds, eval_table)
    check_against_now(ranked, now, data_dir)
    return StudyInputs(storage, data_dir, table, folds, eval_table, ranked, notes, now)


def run(args: argparse.Namespace) -> Submission:
    """The whole command; returns what it submitted (written as the CSV and its JSON)."""
    # lazy: search.finished_study imports torch (~3 s); --help and flag errors need none
    from search.finished_study import SUBMISSION_ATTR

    recipe = recipe_of(args)
    study = load_inputs(args)
    storage, data_dir, eval_table = study.storage, study.data_dir, study.eval_table
    labels = study.table["label"].to_numpy(dtype=np.int64)
    store = open_store(args.artifacts or paths.default_artifacts_dir())
    cands = load_candidates(study.ranked, store, len(labels))
    oofs = [c.oof for c in cands]
    cmp = compare(oofs, labels, study.folds, recipe, args.min_pool)
    chosen = cmp["fitted"][cmp["uses"]]
    use_offsets = cmp["rule"][cmp["uses"]] == "offsets"
    needed = sum(cmp["fitted"][k].weights for k in ("ensemble", "best_single"))
    evals = load_eval(cands, needed, store, len(eval_table))
    submission = chosen.predict(evals, use_offsets)
    figures = _figures(cmp, cands, labels)
    answers = eval_answers(data_dir, eval_table["ImageID"].tolist())
    if answers is not None:
        for name in ("ensemble", "best_single"):
            pred = cmp["fitted"][name].predict(evals, cmp["rule"][name] == "offsets")
            figures[f"{name}_eval_f1"] = macro_f1(answers, pred)
        best = int(np.argmax(cmp["fitted"]["best_single"].weights))
        figures["best_single_argmax_eval_f1"] = macro_f1(answers, evals[best].argmax(axis=1))
        figures["submission_eval_f1"] = macro_f1(answers, submission)

    out = Path(args.out or paths.study_dir(args.study) / "submission.csv")
    oof_f1 = [macro_f1(labels, o.argmax(axis=1)) for o in oofs]
    write_submission(out, eval_table["ImageID"].tolist(), submission)
    submitted = Submission(
        members=tuple(Member(trial=c.number, weight=float(chosen.weights[i]), rank=c.rank,
                             value=c.value, oof_f1=oof_f1[i])
                      for i, c in enumerate(cands) if chosen.weights[i] > 0),
        offsets=tuple(float(x) for x in chosen.offsets) if use_offsets else None,
        uses=cmp["uses"], why=cmp["why"], rule=cmp["rule"][cmp["uses"]],
        study=args.study, storage=storage, csv=str(out), candidates=len(cands),
        recipe={"top": recipe.top, "offsets_tried": recipe.offsets, "min_pool": args.min_pool,
                **vars(recipe.selection)},
        fingerprints=study.fingerprints, figures=figures, notes=tuple(study.notes),
        answers=str(data_dir / ANSWERS_FILE) if answers is not None else None,
        gradcam=(None if args.no_gradcam
                 else _explain_best(args.study, storage, store, cands[0].number)))
    written = write_json(out.with_suffix(".json"), submitted.to_json())
    # report, predict, explain and labels find it wherever --out put it
    open_study(args.study, storage).set_user_attr(SUBMISSION_ATTR, str(Path(written).resolve()))
    _print_report(submitted)
    return submitted


def _explain_best(name: str, storage: str, store, number: int) -> str:
    """The best trial's Grad-CAM grid, so the dashboard shows where it looks; the line that
    says so. A trial that cannot be explained (its checkpoints removed, say) is a note in that
    line, never a failed ensemble."""
    # lazy: search.explain imports torch and grad-cam (~8 s), needed only for this picture
    from search.explain import explain, gradcam_name
    from search.finished_study import FinishedStudy  # lazy: it imports torch (~3 s)

    try:
        explain(FinishedStudy(name, storage, open_study(name, storage), store), number)
    except Exception as e:  # the submission is written; this picture is a bonus
        return f"no Grad-CAM for trial {number}: {first_line(e)}"
    return (f"attached {gradcam_name(number)} to trial {number} (Grad-CAM; the dashboard "
            f"lists it, python -m search.report --study {name} shows it)")


def _figures(cmp: dict, cands: list, labels: np.ndarray) -> dict:
    """The flat figures of the JSON (names kept from the first version, plus the new ones)."""
    nested, inside = cmp["nested"], cmp["in_sample"]
    return {
        "best_single_trial": cands[0].number,
        "best_single_oof_f1": inside["best_single"],
        "best_single_cross_fitted_f1": nested["best_single"],
        "ensemble_oof_f1_in_sample": inside["ensemble"],
        "ensemble_cross_fitted_f1": nested["ensemble"],
        "submission_cross_fitted_f1": nested[cmp["uses"]],
        "ensemble_rule": cmp["rule"]["ensemble"],
        "best_single_rule": cmp["rule"]["best_single"],
        "ensemble_nested_both": cmp["ensemble_nested_both"],
        "best_single_nested_both": cmp["best_single_nested_both"],
    }


def _print_report(sub: Submission) -> None:
    for note in sub.notes:
        print(f"note: {note}")
    f = sub.figures
    print("nested cross-fitted macro F1 (every choice made on the other half of the folds):")
    rows = [(f"ensemble ({f['ensemble_rule']})", f["ensemble_cross_fitted_f1"]),
            (f"best single trial ({f['best_single_rule']})", f["best_single_cross_fitted_f1"]),
            ("in-sample OOF, optimistic: ensemble", f["ensemble_oof_f1_in_sample"]),
            ("in-sample OOF, optimistic: best single", f["best_single_oof_f1"])]
    if "submission_eval_f1" in f:
        rows += [("eval answers: ensemble", f["ensemble_eval_f1"]),
                 ("eval answers: best single trial", f["best_single_eval_f1"]),
                 ("eval answers: submission", f["submission_eval_f1"])]
    for label, value in rows:
        print(f"  {label:<44} {value:.4f}")
    print(f"{'rank':>4} {'trial':>6} {'value':>8} {'oof F1':>8} {'weight':>7}")
    for m in sub.members:
        print(f"{m.rank:>4} {m.trial:>6} {m.value:>8.4f} {m.oof_f1:>8.4f} {m.weight:>7.3f}")
    print(f"submission uses {sub.what_it_uses()}, {len(sub.members)} member(s)")
    if sub.gradcam:
        print(sub.gradcam)
    print(f"wrote {sub.csv} and {Path(sub.csv).with_suffix('.json')}")
    if sub.answers:
        print(f"score it: python -m search.ensemble.score {sub.csv} {sub.answers}")
    else:
        print("score it: upload it to the competition (no eval_answers.csv beside the data)")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; expected problems print one line on stderr and return 2."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
