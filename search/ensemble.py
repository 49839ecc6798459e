"""Ensemble the best trials of a study into a submission: ``python -m search.ensemble``.

Greedy forward selection with replacement (Caruana et al. 2004) on the trials' out-of-fold
(OOF) probabilities, scored by macro F1; the weights are the selection counts. Selection on
the OOF rows is optimistic about those same rows, so an honest figure is also reported: the
folds are split in two halves, members are picked on one half and scored on the other, and
the two scored halves are pooled ("cross-fitted").

Mixed data, folds or eval sets are refused, not filtered: a trial's OOF rows only line up with
another's when both ran on the same table (data fingerprint) and the same folds (folds
fingerprint), and its eval rows when both read the same eval/info.csv (eval fingerprint); those
must also equal what the data folder gives now, or the labels would not match the rows and the
submission would put probabilities on the wrong ImageIDs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import atomic_write
from core.cli import run_cli
from core.errors import DataError
from core.labels import NUM_CLASSES
from core.metrics import macro_f1

DEFAULT_TOP = 10
DEFAULT_SIZE = 20  # selection rounds; the best prefix is kept


# ----------------------------------------------------------------------------- pure parts


def _check_probs(probs: Sequence[np.ndarray], n_rows: int, what: str) -> list[np.ndarray]:
    out = []
    for i, p in enumerate(probs):
        p = np.asarray(p, dtype=np.float64)
        if p.ndim != 2 or p.shape != (n_rows, NUM_CLASSES):
            raise DataError(f"{what} #{i}: shape {p.shape}, expected ({n_rows}, {NUM_CLASSES})")
        out.append(p)
    if not out:
        raise DataError(f"{what}: no members given")
    return out


def greedy_select(
    oof_list: Sequence[np.ndarray], labels: np.ndarray, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Weights (sum 1, one per member) from greedy forward selection with replacement.

    Starts from the empty set, so round 1 picks the best single member. Each round adds the
    member whose addition gives the highest macro F1 of the averaged probabilities; ties go to
    the lowest index (pass members best-ranked first). After ``size`` rounds the shortest prefix
    with the best F1 is kept; weights are its selection counts / total.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    labels = np.asarray(labels)
    probs = _check_probs(oof_list, len(labels), "out-of-fold probabilities")
    total = np.zeros_like(probs[0])
    picks: list[int] = []
    scores: list[float] = []
    for _ in range(size):
        round_scores = [macro_f1(labels, (total + p).argmax(axis=1)) for p in probs]
        best = int(np.argmax(round_scores))  # first maximum: lowest index wins ties
        picks.append(best)
        scores.append(round_scores[best])
        total += probs[best]
    keep = int(np.argmax(scores)) + 1
    counts = np.bincount(picks[:keep], minlength=len(probs)).astype(np.float64)
    return counts / counts.sum()


def blend(probs_list: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Weighted average of probability arrays (members with weight 0 are not read)."""
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != len(probs_list):
        raise ValueError(f"{len(weights)} weights for {len(probs_list)} members")
    out = None
    for w, p in zip(weights, probs_list, strict=True):
        if w > 0:
            term = w * np.asarray(p, dtype=np.float64)
            out = term if out is None else out + term
    if out is None:
        raise ValueError("all weights are zero")
    return out / weights.sum()


def fold_halves(folds: np.ndarray) -> np.ndarray:
    """Boolean mask of half A: the even-positioned fold numbers (0, 2, 4 of 0..4)."""
    folds = np.asarray(folds)
    ids = np.unique(folds)
    if len(ids) < 2:
        raise DataError(f"cross-fitting needs at least 2 folds, the rows have {len(ids)}")
    return np.isin(folds, ids[::2])


def cross_fitted_predictions(
    oof_list: Sequence[np.ndarray], labels: np.ndarray, folds: np.ndarray,
    size: int = DEFAULT_SIZE,
) -> np.ndarray:
    """Predicted class per row, each half predicted by an ensemble selected on the other half."""
    labels, folds = np.asarray(labels), np.asarray(folds)
    probs = _check_probs(oof_list, len(labels), "out-of-fold probabilities")
    if len(folds) != len(labels):
        raise DataError(f"folds: {len(folds)} rows, labels: {len(labels)} rows")
    half_a = fold_halves(folds)
    pred = np.empty(len(labels), dtype=np.int64)
    for pick_on in (half_a, ~half_a):
        weights = greedy_select([p[pick_on] for p in probs], labels[pick_on], size)
        score_on = ~pick_on
        pred[score_on] = blend([p[score_on] for p in probs], weights).argmax(axis=1)
    return pred


def cross_fitted_f1(
    oof_list: Sequence[np.ndarray], labels: np.ndarray, folds: np.ndarray,
    size: int = DEFAULT_SIZE,
) -> float:
    """Macro F1 of ``cross_fitted_predictions`` over all rows (both scored halves pooled).

    ``size=1`` gives the honest figure of "pick the best single member", for comparison.
    """
    return macro_f1(np.asarray(labels), cross_fitted_predictions(oof_list, labels, folds, size))


def write_submission(path: str | Path, image_ids: Sequence[str], classes: np.ndarray) -> Path:
    """Write ``ImageID,ans`` in the given (info.csv) order, atomically; ans are ints 0..17."""
    path = Path(path)
    classes = np.asarray(classes)
    if len(classes) != len(image_ids):
        raise DataError(f"{path}: {len(classes)} predictions for {len(image_ids)} eval images")
    if not np.issubdtype(classes.dtype, np.integer) or (
        len(classes) and (classes.min() < 0 or classes.max() >= NUM_CLASSES)
    ):
        raise DataError(f"{path}: predictions must be integer classes 0..{NUM_CLASSES - 1}")
    frame = pd.DataFrame({"ImageID": list(image_ids), "ans": classes.astype(np.int64)})
    atomic_write(path, lambda tmp: tmp.write_text(frame.to_csv(index=False), newline=""))
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    path = Path(path)
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


# ----------------------------------------------------------------------------- the study side


@dataclass
class Candidate:
    """One trial in the pool, best-ranked first."""

    rank: int
    number: int
    value: float
    oof: np.ndarray = field(repr=False)
    eval: np.ndarray = field(repr=False)


def _open_study(name: str, url: str):
    """Load study ``name`` without creating anything: a missing SQLite file is an error."""
    import optuna

    from search.storage import open_existing_storage, study_names

    storage = open_existing_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = ", ".join(study_names(storage)) or "none"
        raise DataError(f"storage {url}: no study named {name!r} (studies: {known})") from None


def rank_trials(study, top: int) -> tuple[list, list[str]]:
    """Complete trials with every fold, best first (ties: lower trial number), at most ``top``.

    Returns (trials, notes). Refuses (``DataError``) when none qualifies or when the chosen
    pool mixes data or fold fingerprints, naming the trials on each side.
    """
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None]
    if not complete:
        raise DataError(f"study {study.study_name!r} has no complete trial to ensemble")
    n_folds = study.user_attrs.get("n_folds")
    notes = []
    if n_folds is not None:
        full = [t for t in complete if len(t.user_attrs.get("fold_f1", [])) == int(n_folds)]
        if len(full) < len(complete):
            notes.append(f"skipped {len(complete) - len(full)} complete trial(s) without all "
                         f"{n_folds} folds")
        if not full:
            raise DataError(f"study {study.study_name!r}: no complete trial finished all "
                            f"{n_folds} folds")
        complete = full
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    pool = sorted(complete, key=lambda t: (sign * t.value, t.number))[:top]
    what_of = {"data_fingerprint": "data", "folds_fingerprint": "folds",
               "eval_fingerprint": "eval images"}
    for attr, what in what_of.items():
        groups: dict[str, list[int]] = {}
        for t in pool:
            groups.setdefault(str(t.user_attrs.get(attr)), []).append(t.number)
        if len(groups) > 1:
            sides = "; ".join(f"{fp}: trials {', '.join(map(str, nums))}"
                              for fp, nums in groups.items())
            raise DataError(f"study {study.study_name!r}: the top {len(pool)} trials ran on "
                            f"different {what} ({attr} {sides}); their predictions do not line "
                            "up - lower --top or ensemble one study per data set")
    return pool, notes


def load_candidates(pool: list, store, n_train: int, n_eval: int) -> list[Candidate]:
    """OOF and eval probabilities of each trial; refuses on a missing or mis-shaped one."""
    from search.artifacts import attr_name, load_array
    from search.objective import EVAL, OOF

    out = []
    for rank, t in enumerate(pool, start=1):
        arrays = {}
        for name, rows, what in ((OOF, n_train, "out-of-fold"), (EVAL, n_eval, "eval")):
            if not t.user_attrs.get(attr_name(name)):
                raise DataError(f"trial {t.number} has no {what} probabilities (user attr "
                                f"{attr_name(name)!r}); it cannot be ensembled (lower --top to "
                                "leave it out)")
            a = load_array(t, store, name)
            if a.shape != (rows, NUM_CLASSES):
                raise DataError(f"trial {t.number}: {what} probabilities have shape {a.shape}, "
                                f"the data gives ({rows}, {NUM_CLASSES})")
            arrays[name] = a
        out.append(Candidate(rank, t.number, float(t.value), arrays[OOF], arrays[EVAL]))
    return out


def _eval_answers(data_dir: Path, image_ids: Sequence[str]) -> np.ndarray | None:
    """True eval classes in ``image_ids`` order when ``eval_answers.csv`` ships (synthetic)."""
    path = data_dir / "eval_answers.csv"
    if not path.is_file():
        return None
    df = pd.read_csv(path, dtype={"ImageID": str})
    if not {"ImageID", "ans"} <= set(df.columns):
        raise DataError(f"{path}: needs columns ImageID,ans")
    answers = df.set_index("ImageID")["ans"]
    missing = [i for i in image_ids if i not in answers.index]
    if missing:
        raise DataError(f"{path}: no answer for ImageID {missing[0]!r} ({len(missing)} missing)")
    return answers.loc[list(image_ids)].to_numpy(dtype=np.int64)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m search.ensemble",
        description="Pick an ensemble of a study's best trials on out-of-fold macro F1 "
                    "(greedy selection with replacement) and write the submission CSV.")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--top", type=int, default=DEFAULT_TOP,
                   help=f"candidate pool: the K best complete trials (default {DEFAULT_TOP})")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"selection rounds = most members counted with repeats "
                        f"(default {DEFAULT_SIZE}); the best prefix is kept")
    p.add_argument("--out", help="submission CSV (default runs/<study>/submission.csv); "
                                 "a .json with members and figures is written next to it")
    p.add_argument("--storage", help="Optuna storage URL or journal file "
                                     "(default sqlite:///runs/<study>.db)")
    p.add_argument("--artifacts",
                   help="artifact store: folder or s3://bucket/prefix (default runs/artifacts)")
    p.add_argument("--data", help="data folder (default: the study's user attr data_dir)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run(args: argparse.Namespace) -> dict:
    """The whole command; returns the JSON payload it wrote."""
    from core.dataset import data_fingerprint, load_eval_table, load_train_table
    from core.splits import folds_fingerprint, person_folds
    from search import paths
    from search.artifacts import open_store
    from search.objective import eval_fingerprint  # imports torch: only when the CLI runs

    if args.top < 1 or args.size < 1:
        raise DataError("--top and --size must be >= 1")
    paths.check_study_name(args.study)
    storage = args.storage or paths.default_storage_url(args.study)
    study = _open_study(args.study, storage)
    pool, notes = rank_trials(study, args.top)

    attrs = study.user_attrs
    data_dir = args.data or attrs.get("data_dir")
    if not data_dir:
        raise DataError(f"study {args.study!r} has no user attr 'data_dir'; pass --data")
    data_dir = Path(data_dir)
    for key in ("n_folds", "fold_seed"):
        if key not in attrs:
            raise DataError(f"study {args.study!r} has no user attr {key!r} (not made by "
                            "search.run?)")
    table = load_train_table(data_dir, corrections=attrs.get("corrections"))
    folds = person_folds(table, int(attrs["n_folds"]), seed=int(attrs["fold_seed"]))
    eval_table = load_eval_table(data_dir)
    now = {"data_fingerprint": data_fingerprint(table),
           "folds_fingerprint": folds_fingerprint(folds),
           "eval_fingerprint": eval_fingerprint(eval_table)}
    numbers = ", ".join(str(t.number) for t in pool)
    for key, fp in now.items():
        ran_on = pool[0].user_attrs.get(key)
        if ran_on == fp:
            continue
        if key == "eval_fingerprint":
            raise DataError(f"trials {numbers} ran with eval_fingerprint {ran_on}, but "
                            f"{data_dir / 'eval' / 'info.csv'} now gives {fp} (eval images "
                            "edited, added or reordered since the trials); their eval "
                            "probabilities would land on the wrong ImageIDs - rerun the trials")
        raise DataError(f"trials {numbers} ran with {key} {ran_on}, but {data_dir} now gives "
                        f"{fp} (data, corrections or fold settings changed); their rows would "
                        "not match the labels")
    labels = table["label"].to_numpy(dtype=np.int64)
    store = open_store(args.artifacts or paths.default_artifacts_dir())
    cands = load_candidates(pool, store, len(table), len(eval_table))

    oofs = [c.oof for c in cands]
    weights = greedy_select(oofs, labels, args.size)
    oof_f1 = [macro_f1(labels, c.oof.argmax(axis=1)) for c in cands]
    ens_oof = blend(oofs, weights)
    figures = {
        "best_single_trial": cands[0].number,
        "best_single_oof_f1": oof_f1[0],
        "best_single_cross_fitted_f1": cross_fitted_f1(oofs, labels, folds, size=1),
        "ensemble_oof_f1_in_sample": macro_f1(labels, ens_oof.argmax(axis=1)),
        "ensemble_cross_fitted_f1": cross_fitted_f1(oofs, labels, folds, size=args.size),
    }
    submission = blend([c.eval for c in cands], weights).argmax(axis=1)
    answers = _eval_answers(data_dir, eval_table["ImageID"].tolist())
    if answers is not None:
        figures["ensemble_eval_f1"] = macro_f1(answers, submission)
        figures["best_single_eval_f1"] = macro_f1(answers, cands[0].eval.argmax(axis=1))

    out = Path(args.out or paths.study_dir(args.study) / "submission.csv")
    payload = {
        "study": args.study,
        "storage": storage,
        "submission": str(out),
        "candidates": len(cands),
        "rounds": args.size,
        "data_fingerprint": now["data_fingerprint"],
        "folds_fingerprint": now["folds_fingerprint"],
        "eval_fingerprint": now["eval_fingerprint"],
        "members": [{"trial": c.number, "rank": c.rank, "value": c.value,
                     "oof_f1": oof_f1[i], "weight": float(weights[i])}
                    for i, c in enumerate(cands) if weights[i] > 0],
        "figures": figures,
        "notes": notes,
    }
    write_submission(out, eval_table["ImageID"].tolist(), submission)
    write_json(out.with_suffix(".json"), payload)
    _print_report(payload, cands, oof_f1, weights)
    return payload


def _print_report(payload: dict, cands: list[Candidate], oof_f1: list[float],
                  weights: np.ndarray) -> None:
    for note in payload["notes"]:
        print(f"note: {note}")
    print(f"{'rank':>4} {'trial':>6} {'value':>8} {'oof F1':>8} {'weight':>7}")
    for i, c in enumerate(cands):
        w = f"{weights[i]:.3f}" if weights[i] > 0 else "-"
        print(f"{c.rank:>4} {c.number:>6} {c.value:>8.4f} {oof_f1[i]:>8.4f} {w:>7}")
    f = payload["figures"]
    rows = [("best single trial, OOF F1", f["best_single_oof_f1"]),
            ("best single, cross-fitted", f["best_single_cross_fitted_f1"]),
            ("ensemble, OOF F1 (in-sample, optimistic)", f["ensemble_oof_f1_in_sample"]),
            ("ensemble, cross-fitted OOF F1", f["ensemble_cross_fitted_f1"])]
    if "ensemble_eval_f1" in f:
        rows += [("best single trial, F1 on eval answers", f["best_single_eval_f1"]),
                 ("ensemble, F1 on eval answers", f["ensemble_eval_f1"])]
    for label, value in rows:
        print(f"{label:<42} {value:.4f}")
    print(f"wrote {payload['submission']} ({len(payload['members'])} member(s))")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; expected problems print one line on stderr and return 2."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
