"""CLI: ``python -m search.labels --study NAME``: suspected label errors, per person, from a
finished study's out-of-fold probabilities, as a corrections file to review.

Why: every top team fixed label errors by hand, and a finished study already holds the evidence:
an out-of-fold (OOF) probability for every training photo from models that never saw it. Those
are the submission's members blended with the weights ``search.ensemble`` recorded in
``submission.json`` (the best complete trial when there is none yet), read through the readers
the other tools use (``search.finished_study``, ``search.ensemble.trials``).

The scoring is cleanlab's label quality on threshold-adjusted probabilities; the person
structure is ours on top:

- gender and age group: all seven photos of a person share them, so each person's photo-level
  marginals (``core.labels.factor_probs``) are averaged into one distribution per person (a mean,
  not a product: one odd photo must not outvote six), and cleanlab scores people:
  ``get_label_quality_scores(method="normalized_margin", adjust_pred_probs=True)``, where each
  class's probability is first lowered by its confident threshold (the mean confidence of the
  people given that class), so a rare class such as ">=60", predicted weakly for everyone, is
  not suspect merely for that. ``score = 1 - quality``; the suggestion is the best other class
  after the same adjustment;
- mask swap (``normal`` and ``incorrect_mask`` photos swapped): cleanlab cannot score it as a
  label of its own (every person is given "not swapped": no class to contrast), so the two
  photos' mask probabilities are adjusted the same way (thresholds from all photos' mask labels)
  and ``score`` is the posterior of "swapped" against "as given" from them.

All three scores read alike: above 0.5 the suggestion beats the given label after the
adjustment (``status`` flagged). cleanlab's ``find_label_issues`` (confident learning's pruning)
is not used: on pooled probabilities a contradicted person is about as confident as the average
person of the other class, that is, at its threshold, and it flags about half of them (in the
tests' first study a person contradicted on all seven photos scores 0.88, every other row at
most 0.13, and ``find_label_issues`` flags no one).

``suspects.csv`` is a corrections file (``target,field,value``; target the person folder, which
is unique where ids are not) with evidence columns: given, suggested, score, status (flagged, or
only ranked when ``--top`` asks for more), photos (paths relative to the data folder), highest
score first. An age suggestion is the nearest age in the
suggested group (the reviewer writes the true age when known). The study's own corrections lead
the file (status ``applied``), so that the reviewed file alone is the next study's corrections
(they apply in order). Nothing is applied here: the user deletes what they reject and passes the
file with ``--corrections`` to a new study. ``suspects.html`` beside it shows each suspect's
photos (``search.labels_page``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import atomic_write
from core.cli import Parser, run_cli
from core.dataset import (
    CORRECTION_COLUMNS,
    CORRECTION_FIELDS,
    MASK_SWAP_VALUE,
    read_corrections,
)
from core.errors import DataError
from core.fingerprints import data_fingerprint, folds_fingerprint
from core.labels import (
    AGE_GROUP_NAMES,
    GENDER_NAMES,
    MASK_NAMES,
    MIN_AGE,
    SWAPPED_STEMS,
    TRUE_OLD_FROM,
    YOUNG_BELOW,
    age_group,
    factor_probs,
)
from search import paths
from search.ensemble.trials import check_against_now, load_oof, rank_trials
from search.finished_study import FinishedStudy, add_study_flags, open_finished, study_rows
from search.labels_page import page

#: suspects.csv: a corrections file plus the evidence a reviewer reads.
CSV_COLUMNS: tuple[str, ...] = (*CORRECTION_COLUMNS, "given", "suggested", "score", "status",
                                "photos")
FLAGGED, RANKED, APPLIED = "flagged", "ranked", "applied"
#: Above this score the suggestion beats the given label after the threshold adjustment.
FLAG_ABOVE = 0.5
PHOTO_SEP = ";"


# ----------------------------------------------------------------------------- scoring


def _label_scores(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, suggested) per row by cleanlab (see the module); classes nobody carries are left
    out (a threshold needs members), a single class leaves nothing to contrast."""
    from cleanlab.rank import get_label_quality_scores  # lazy: cleanlab costs ~2 s to import

    present = np.unique(labels)
    if len(present) < 2:
        return np.zeros(len(labels)), labels.copy()
    p = np.clip(probs[:, present], 1e-12, None)
    p /= p.sum(axis=1, keepdims=True)
    lab = np.searchsorted(present, labels)
    quality = get_label_quality_scores(lab, p, method="normalized_margin",
                                       adjust_pred_probs=True)
    other = _adjusted(lab, p)
    other[np.arange(len(lab)), lab] = -np.inf
    return 1.0 - quality, present[other.argmax(axis=1)]


def _adjusted(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Probabilities less each class's confident threshold, shifted and renormalised: the
    adjustment cleanlab's quality scores make (``adjust_pred_probs``)."""
    from cleanlab.count import get_confident_thresholds  # lazy: cleanlab costs ~2 s to import

    t = get_confident_thresholds(labels, probs)
    adj = probs - t + t.max()
    return adj / adj.sum(axis=1, keepdims=True)


def nearest_age(age: int, group: int) -> int:
    """The age in ``group`` nearest ``age``: the smallest change that makes the group right."""
    lo, hi = ((MIN_AGE, YOUNG_BELOW - 1), (YOUNG_BELOW, TRUE_OLD_FROM - 1),
              (TRUE_OLD_FROM, TRUE_OLD_FROM))[group]
    return int(min(max(age, lo), hi))


def _person_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, list[np.ndarray]]:
    """One row per person (folder, gender, age, group), each table row's person index, and each
    person's table rows."""
    codes, folders = pd.factorize(table["person"], sort=True)
    first = table.groupby(codes, sort=True).first()
    people = pd.DataFrame({"person": folders, "gender": first["gender"].to_numpy(np.int64),
                           "age": first["age"].to_numpy(np.int64)})
    people["group"] = age_group(people["age"].to_numpy())
    rows = pd.Series(np.arange(len(codes))).groupby(codes).indices
    return people, codes, [rows[i] for i in range(len(people))]


def _pooled(per_photo: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    total = np.zeros((n, per_photo.shape[1]))
    np.add.at(total, codes, per_photo)
    return total / np.bincount(codes, minlength=n)[:, None]


def find_suspects(table: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """Every (person, field) candidate, highest score first.

    ``table`` is the study's train table, ``probs`` its OOF probabilities (rows alike). Columns:
    ``CSV_COLUMNS`` (photos joined later) plus ``rows`` (table rows of the photos shown) and
    ``notes`` (per photo, the model's word on it) for the review page.
    """
    if probs.shape[0] != len(table):
        raise DataError(f"{probs.shape[0]} OOF rows for {len(table)} training images")
    mask_p, gender_p, age_p = factor_probs(probs)
    people, codes, rows_of = _person_rows(table)
    out = []
    for field, given, per_photo, names in (
            ("gender", people["gender"].to_numpy(), gender_p, GENDER_NAMES),
            ("age", people["group"].to_numpy(), age_p, AGE_GROUP_NAMES)):
        score, suggested = _label_scores(given, _pooled(per_photo, codes, len(people)))
        for i, person in enumerate(people.itertuples(index=False)):
            if suggested[i] == given[i]:
                continue
            s, g = int(suggested[i]), int(given[i])
            if field == "gender":
                value, given_text = GENDER_NAMES[s], GENDER_NAMES[g]
            else:
                value, given_text = str(nearest_age(person.age, s)), f"{names[g]} ({person.age})"
            rows = rows_of[i]
            out.append({"target": person.person, "field": field, "value": value,
                        "given": given_text, "suggested": names[s], "score": float(score[i]),
                        "status": FLAGGED if score[i] > FLAG_ABOVE else RANKED, "rows": rows,
                        "notes": [f"p({names[s]}) {per_photo[r, s]:.2f}" for r in rows]})
    out += _swap_suspects(table, mask_p, people["person"], rows_of)
    frame = pd.DataFrame(out, columns=[*CSV_COLUMNS[:-1], "rows", "notes"])
    frame = frame.sort_values(["score", "target", "field"], ascending=[False, True, True],
                              kind="stable")
    return frame.reset_index(drop=True)


def _swap_suspects(table: pd.DataFrame, mask_p: np.ndarray, folders: pd.Series,
                   rows_of: list[np.ndarray]) -> list[dict]:
    """A candidate per person: ``normal`` and ``incorrect_mask`` swapped (see the module)."""
    given = table["mask"].to_numpy(np.int64)
    adj = _adjusted(given, mask_p)
    stems = table["stem"].to_numpy()
    out = []
    for person, mine in zip(folders, rows_of, strict=True):
        pair = [mine[stems[mine] == s] for s in SWAPPED_STEMS]
        if any(len(r) != 1 for r in pair):
            continue
        a, b = (int(r[0]) for r in pair)
        ka, kb = given[a], given[b]
        if ka == kb:
            continue
        as_given, swapped = adj[a, ka] * adj[b, kb], adj[a, kb] * adj[b, ka]
        q = float(swapped / (swapped + as_given))
        out.append({
            "target": person, "field": "mask_swap", "value": MASK_SWAP_VALUE,
            "given": f"{stems[a]}: {MASK_NAMES[ka]}, {stems[b]}: {MASK_NAMES[kb]}",
            "suggested": f"{stems[a]}: {MASK_NAMES[kb]}, {stems[b]}: {MASK_NAMES[ka]}",
            "score": q, "status": FLAGGED if q > FLAG_ABOVE else RANKED,
            "rows": np.array([a, b]),
            "notes": [f"given {MASK_NAMES[k]}; p({MASK_NAMES[o]}) {mask_p[r, o]:.2f}"
                      for r, k, o in ((a, ka, kb), (b, kb, ka))]})
    return out


# ----------------------------------------------------------------------------- the study side


def oof_probabilities(found: FinishedStudy, table: pd.DataFrame, folds: np.ndarray,
                      data_dir: Path) -> tuple[np.ndarray, str]:
    """(OOF probabilities, where they came from): the submission's members blended with its
    weights when ``submission.json`` exists, else the best complete trial with every fold.
    Refused (one line) when the trials ran on other data or folds than the folder gives now."""
    now = {"data_fingerprint": data_fingerprint(table),
           "folds_fingerprint": folds_fingerprint(folds)}
    if found.submission_path.is_file():
        submitted = found.submission()
        trials = [found.trial(m.trial) for m in submitted.members]
        check_against_now(trials, now, data_dir)
        probs = submitted.classes([load_oof(t, found.store, len(table)) for t in trials])[0]
        numbers = ", ".join(str(t.number) for t in trials)
        return probs, (f"the submission's {len(trials)} member(s) (trial {numbers}) blended "
                       f"with its weights")
    best = rank_trials(found.study)[0][0]
    check_against_now([best], now, data_dir)
    return (load_oof(best, found.store, len(table)).astype(np.float64),
            f"trial {best.number}, the best complete trial (no {found.submission_path.name}: "
            f"run search.ensemble to use the ensemble)")


def study_corrections(found: FinishedStudy) -> pd.DataFrame:
    """The study's own corrections as leading rows (status ``applied``); none when it had none."""
    path = found.study.user_attrs.get("corrections")
    fixes = read_corrections(path) if path else []
    return pd.DataFrame([{"target": c.target, "field": c.field, "value": c.value,
                          "given": "", "suggested": "", "score": "", "status": APPLIED,
                          "photos": ""} for c in fixes], columns=list(CSV_COLUMNS))


def suspects_csv(suspects: pd.DataFrame, table: pd.DataFrame, applied: pd.DataFrame) -> str:
    """The file's text: the study's corrections, then the suspects with their photos' paths."""
    files = table["file"].to_numpy()
    rows = suspects.assign(photos=[PHOTO_SEP.join(files[r]) for r in suspects["rows"]],
                           score=suspects["score"].round(4))[list(CSV_COLUMNS)]
    return (applied.to_csv(index=False, lineterminator="\n")
            + rows.to_csv(index=False, header=False, lineterminator="\n"))


# ----------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.labels",
               description="Rank suspected label errors per person (gender, age group, normal/"
                           "incorrect_mask swap) from a finished study's out-of-fold "
                           "probabilities; write suspects.csv, a corrections file to review, "
                           "and suspects.html beside it. Nothing is applied.")
    add_study_flags(p)
    p.add_argument("--top", type=int,
                   help="write the N best-scored suspects, flagged or not (default: every "
                        "flagged one, score above 0.5)")
    p.add_argument("--out", type=Path, help="suspects CSV (default runs/<study>/suspects.csv); "
                                            "the review page goes beside it (.html)")
    p.add_argument("--data", help="data folder (default: the study's user attr data_dir)")
    return p


def run(args: argparse.Namespace) -> Path:
    if args.top is not None and args.top < 1:
        raise DataError("--top must be >= 1")
    found = open_finished(args)
    data_dir, table, folds = study_rows(found.study, args.data)
    probs, source = oof_probabilities(found, table, folds, data_dir)
    ranked = find_suspects(table, probs)
    chosen = (ranked.head(args.top) if args.top is not None
              else ranked[ranked["status"] == FLAGGED]).reset_index(drop=True)
    out = Path(args.out or paths.study_dir(args.study) / "suspects.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    applied = study_corrections(found)
    text = suspects_csv(chosen, table, applied)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    html_path = out.with_suffix(".html")
    doc = page(found.name, chosen, table, data_dir, source)
    atomic_write(html_path, lambda tmp: tmp.write_text(doc, encoding="utf-8"))
    kinds = chosen["field"].value_counts()
    counts = ", ".join(f"{kinds.get(f, 0)} {f}" for f in CORRECTION_FIELDS)
    print(f"{len(chosen)} suspect(s) ({counts}) among {table['person'].nunique()} people, "
          f"from {source}")
    if len(applied):
        print(f"the study's {len(applied)} correction(s) lead the file (status {APPLIED}): "
              "keep them")
    print(f"wrote {out} and {html_path}")
    print(f"review: delete the rows you reject from {out.name}, then python -m search.run "
          f"--study NEW --corrections {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; expected problems print one line on stderr and return 2."""
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
