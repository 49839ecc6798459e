"""CLI: ``python -m search.predict --study NAME PATH...``: the submission's model on new photos.

Each photo is face-cropped as the study's eval images were (same detector, same rule, the study
data's own fallback box for a photo with no face found), run through every fold model of every
member of the ensemble ``search.ensemble`` wrote (its weights, TTA as each trial used), and
classified by the same decision rule. One CSV row per photo, to standard output or ``--out``:
``file,class,mask,gender,age,prob,box_source,reason``. A file that cannot be read gets a row
with no class and the reason; nothing else goes to standard output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.atomic import atomic_write
from core.cli import Parser, run_cli
from core.engine import predict
from core.errors import DataError
from core.labels import AGE_GROUP_NAMES, GENDER_NAMES, MASK_NAMES, decode
from core.photos import check_any, crop_photos, data_fallback, find_photos
from search.ensemble.submission import Member
from search.finished_study import (
    FinishedStudy,
    add_study_flags,
    fold_states,
    open_finished,
    trial_config,
)

COLUMNS = ("file", "class", "mask", "gender", "age", "prob", "box_source", "reason")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.predict", description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="photo files or folders of photos (jpg, png)")
    add_study_flags(p)
    p.add_argument("--out", type=Path, help="CSV file (default: standard output)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: a GPU if there is one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars on standard error")
    return p


def member_probs(found: FinishedStudy, member: Member, crops, device: str | None,
                 progress: bool) -> np.ndarray:
    """One member's probabilities for the readable photos: the mean of its fold models, as the
    trial's own eval probabilities are."""
    trial = found.trial(member.trial)
    cfg = trial_config(trial, device)
    images = crops.stack(tuple(cfg.image_size))
    states = fold_states(trial, found.store, found.n_folds)
    total = np.zeros((len(images), 18), np.float64)
    for state in tqdm(states, desc=f"trial {trial.number}", disable=not progress, leave=False):
        total += predict(state, cfg, images)
    return (total / len(states)).astype(np.float32)


def sizes_of(found: FinishedStudy, members: Sequence[Member]) -> list[tuple[int, int]]:
    return sorted({tuple(found.trial(m.trial).user_attrs["config"]["image_size"])
                   for m in members})


def study_fallback(found: FinishedStudy) -> np.ndarray | None:
    """The study data's fallback box; the centre box, said on stderr, when the data is gone."""
    data_dir = Path(found.study.user_attrs.get("data_dir", ""))
    try:
        return data_fallback(data_dir, found.faces)
    except DataError as e:
        print(f"note: the study's data is not readable here ({e}); photos with no face found "
              "are cropped on the centre box", file=sys.stderr)
        return None


def rows(files: list[Path], crops, classes: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """The CSV: readable photos get their class and its names, the others their reason."""
    out = pd.DataFrame({"file": [str(f) for f in files]})
    ok = crops.readable
    mask, gender, age = decode(classes)
    out["class"] = pd.array([pd.NA] * len(files), dtype="Int64")
    out.loc[ok, "class"] = classes
    for col, names, codes in (("mask", MASK_NAMES, mask), ("gender", GENDER_NAMES, gender),
                              ("age", AGE_GROUP_NAMES, age)):
        out[col] = ""
        out.loc[ok, col] = [names[int(c)] for c in codes]
    out["prob"] = ""
    out.loc[ok, "prob"] = [f"{p:.4f}" for p in probs[np.arange(len(classes)), classes]]
    out["box_source"] = crops.box_source
    out["reason"] = crops.reasons
    return out[list(COLUMNS)]


def run(args: argparse.Namespace) -> pd.DataFrame:
    found = open_finished(args)
    submitted = found.submission()
    files = find_photos(args.paths)
    check_any(files, args.paths)
    members = submitted.members
    crops = crop_photos(files, sizes_of(found, members), study_fallback(found), found.faces,
                        progress=not args.quiet)
    probs, classes = submitted.classes(
        [member_probs(found, m, crops, args.device, not args.quiet) for m in members])
    table = rows(files, crops, classes, probs)
    if args.out is None:
        table.to_csv(sys.stdout, index=False)
    else:
        atomic_write(args.out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"wrote {args.out} ({len(table)} photos, {int((~crops.readable).sum())} "
              "unreadable)", file=sys.stderr)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
