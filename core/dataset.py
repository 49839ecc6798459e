"""Read the competition layout into one table of images, with label corrections.

The table is the single description of the data every later layer uses (cache, splits, engine,
ensemble). The person is the *folder*, never the id: ids repeat across people and carry
``-1``/``-2`` suffixes in the real set. Anything that would silently corrupt labels (a missing
image, a duplicate stem, an unknown gender) raises one ``DataError`` naming the file and field.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import DataError
from core.labels import (
    GENDER_CODES,
    IMAGE_STEMS,
    MASK_BY_STEM,
    MAX_AGE,
    MIN_AGE,
    SWAPPED_STEMS,
    age_group,
    encode,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
TRAIN_COLUMNS: tuple[str, ...] = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS: tuple[str, ...] = ("ImageID",)  # `ans` is blank in the competition's info.csv
CORRECTION_COLUMNS: tuple[str, ...] = ("target", "field", "value")
CORRECTION_FIELDS: tuple[str, ...] = ("gender", "age", "mask_swap")
#: The ``mask_swap`` value of a person whose ``incorrect_mask`` and ``normal`` labels are swapped.
MASK_SWAP_VALUE = ":".join(SWAPPED_STEMS)
TABLE_COLUMNS: tuple[str, ...] = (
    "person", "id", "gender", "race", "age", "mask", "stem", "file", "label",
)
#: The corrections shipped with the package (publicly reported label errors of the real set).
PUBLIC_CORRECTIONS: Path = Path(__file__).with_name("corrections") / "mask_public.csv"


class CorrectionWarning(UserWarning):
    """A correction that matched no person, with ``strict=False`` (see ``apply_corrections``)."""


def _read_csv(path: Path, required: tuple[str, ...], allow_no_rows: bool = False) -> pd.DataFrame:
    """Read a CSV as strings; row i of the frame is line i + 2 of the file (blank lines kept)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (expected columns {', '.join(required)})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(found {', '.join(df.columns)})")
    df = df.apply(lambda col: col.str.strip())
    df = df[(df != "").any(axis=1)]  # drop blank lines but keep the line numbers in the index
    if df.empty and not allow_no_rows:
        raise DataError(f"{path}: has a header but no rows")
    return df


def _line(i: int) -> int:
    """File line of frame index ``i`` (header is line 1)."""
    return int(i) + 2


def _parse_people(df: pd.DataFrame, csv: Path) -> pd.DataFrame:
    """Validate train.csv rows -> one row per person with int gender/age."""
    for i, row in df.iterrows():
        if not row["path"]:
            raise DataError(f"{csv} line {_line(i)}: empty 'path'")
        if "/" in row["path"] or "\\" in row["path"] or row["path"] in (".", ".."):
            raise DataError(f"{csv} line {_line(i)}: 'path' must be a folder name, "
                            f"got {row['path']!r}")
    dup = df["path"].duplicated(keep=False)
    if dup.any():
        lines = ", ".join(str(_line(i)) for i in df.index[dup][:6])
        raise DataError(f"{csv}: folder {df.loc[dup, 'path'].iloc[0]!r} is listed more than "
                        f"once (lines {lines}); each person folder must appear once")
    gender = df["gender"].str.lower().map(GENDER_CODES)
    bad = gender.isna()
    if bad.any():
        i = df.index[bad][0]
        raise DataError(f"{csv} line {_line(i)} (folder {df.at[i, 'path']!r}): unknown gender "
                        f"{df.at[i, 'gender']!r}; expected one of {', '.join(GENDER_CODES)}")
    age = pd.to_numeric(df["age"], errors="coerce")
    bad = age.isna() | (age.round() != age)
    if bad.any():
        i = df.index[bad][0]
        raise DataError(f"{csv} line {_line(i)} (folder {df.at[i, 'path']!r}): 'age' is not a "
                        f"whole number: {df.at[i, 'age']!r}")
    bad = (age < MIN_AGE) | (age > MAX_AGE)
    if bad.any():
        i = df.index[bad][0]
        raise DataError(f"{csv} line {_line(i)} (folder {df.at[i, 'path']!r}): 'age' "
                        f"{df.at[i, 'age']} is outside {MIN_AGE}..{MAX_AGE}")
    return pd.DataFrame({
        "person": df["path"].to_numpy(),
        "id": df["id"].to_numpy(),
        "gender": gender.astype(np.int64).to_numpy(),
        "race": df["race"].to_numpy(),
        "age": age.astype(np.int64).to_numpy(),
    })


def _scan_person(folder: Path, person: str) -> tuple[dict[str, str], int]:
    """Stem -> file name of the 7 images in one person folder, and the count of skipped names.

    Hidden files (macOS ``._*``, ``.DS_Store``), non-image suffixes and image files whose stem
    is not one of the 7 are skipped: the real set holds such junk, and it carries no label.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: person folder listed in train.csv (path {person!r}) "
                        f"does not exist")
    found: dict[str, str] = {}
    skipped = 0
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        if name.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES or stem not in MASK_BY_STEM:
            skipped += 1
            continue
        if stem in found:
            raise DataError(f"{folder}: two files for image {stem!r} ({found[stem]} and {name}); "
                            f"keep one")
        found[stem] = name
    missing = [s for s in IMAGE_STEMS if s not in found]
    if missing:
        raise DataError(f"{folder}: missing image(s) {', '.join(missing)} "
                        f"(each person folder needs {', '.join(IMAGE_STEMS)})")
    return found, skipped


@dataclass(frozen=True)
class Correction:
    """One line of a corrections file."""

    target: str
    field: str
    value: str
    line: int


def read_corrections(path: str | Path) -> list[Correction]:
    """Parse and validate a corrections CSV (``target,field,value``), in file order.

    ``field`` is ``gender`` (value male/female), ``age`` (a whole number) or ``mask_swap``
    (value ``stemA:stemB``, e.g. ``incorrect_mask:normal``: those two images swap mask kinds).
    """
    path = Path(path)
    df = _read_csv(path, CORRECTION_COLUMNS, allow_no_rows=True)  # header only: no fixes
    out = []
    for i, row in df.iterrows():
        where = f"{path} line {_line(i)}"
        target, fld, value = row["target"], row["field"], row["value"]
        if not target:
            raise DataError(f"{where}: empty 'target'")
        if fld not in CORRECTION_FIELDS:
            raise DataError(f"{where}: unknown field {fld!r}; expected one of "
                            f"{', '.join(CORRECTION_FIELDS)}")
        if fld == "gender" and value.lower() not in GENDER_CODES:
            raise DataError(f"{where}: gender value {value!r} is not one of "
                            f"{', '.join(GENDER_CODES)}")
        if fld == "age" and not (value.isdigit() and MIN_AGE <= int(value) <= MAX_AGE):
            raise DataError(f"{where}: age value {value!r} is not a whole number in "
                            f"{MIN_AGE}..{MAX_AGE}")
        if fld == "mask_swap":
            stems = value.split(":")
            if len(stems) != 2 or stems[0] == stems[1] or not set(stems) <= set(IMAGE_STEMS):
                raise DataError(f"{where}: mask_swap value {value!r} must be two different "
                                f"image stems as 'a:b' (stems: {', '.join(IMAGE_STEMS)})")
        out.append(Correction(target, fld, value, _line(i)))
    return out


def apply_corrections(
    table: pd.DataFrame, corrections: str | Path, strict: bool = True
) -> pd.DataFrame:
    """Return a copy of the image table with the corrections file applied, labels recomputed.

    ``target`` matches a person folder exactly, else the one folder whose ``id`` equals it
    (the real set's ids, e.g. ``006359`` or ``001498-1``); an id that several folders share is a
    ``DataError`` naming them (the real set has one id used by two people). A target matching
    nothing is a ``DataError`` naming the file and line when ``strict`` (the default: a typo must
    not silently leave a label wrong); with ``strict=False`` it is a ``CorrectionWarning`` and
    skipped, so a corrections file written for another copy of the data (e.g. the shipped
    public one on synthetic data) can still be used. Lines apply in order.
    """
    path = Path(corrections)
    fixes = read_corrections(path)
    t = table.copy()
    applied = 0
    unmatched: list[Correction] = []
    for c in fixes:
        rows = t["person"] == c.target
        if not rows.any():
            rows = t["id"] == c.target
            folders = sorted(t.loc[rows, "person"].unique())
            if len(folders) > 1:  # ids repeat across people: which one is wrong is unknowable
                raise DataError(f"{path} line {c.line}: target {c.target!r} is the id of "
                                f"{len(folders)} person folders ({', '.join(folders)}); "
                                "target one folder name instead")
        if not rows.any():
            if strict:
                raise DataError(f"{path} line {c.line}: target {c.target!r} matches no person "
                                f"folder or id (pass strict=False to skip such lines)")
            unmatched.append(c)
            continue
        if c.field == "gender":
            t.loc[rows, "gender"] = GENDER_CODES[c.value.lower()]
        elif c.field == "age":
            t.loc[rows, "age"] = int(c.value)
        else:  # mask_swap
            a, b = c.value.split(":")
            in_a, in_b = rows & (t["stem"] == a), rows & (t["stem"] == b)
            mask_a = t.loc[in_a, "mask"].to_numpy()
            t.loc[in_a, "mask"] = t.loc[in_b, "mask"].to_numpy()
            t.loc[in_b, "mask"] = mask_a
        applied += 1
    if unmatched:
        lines = ", ".join(f"{c.line} ({c.target})" for c in unmatched)
        warnings.warn(f"{path}: {len(unmatched)} of {len(fixes)} correction(s) match no person "
                      f"folder or id and were skipped: line {lines}", CorrectionWarning,
                      stacklevel=2)
    t["label"] = _true_labels(t)
    t.attrs["corrections_applied"] = applied
    return t


def _true_labels(t: pd.DataFrame) -> np.ndarray:
    return np.asarray(encode(t["mask"], t["gender"], age_group(t["age"].to_numpy())), np.int64)


def load_train_table(
    data_dir: str | Path, corrections: str | Path | None = None, strict: bool = True
) -> pd.DataFrame:
    """One row per training image, sorted by (person, file), index 0..N-1.

    Columns: person, id, gender (0/1), race, age (int), mask (0/1/2), stem, file (posix path
    relative to ``data_dir``), label (true class, threshold 60). ``corrections`` is applied as
    in ``apply_corrections`` (``strict`` is passed on). ``table.attrs`` records
    ``skipped_files`` (junk names ignored) and ``corrections_applied``.
    """
    data_dir = Path(data_dir)
    csv = data_dir / "train" / "train.csv"
    people = _parse_people(_read_csv(csv, TRAIN_COLUMNS), csv)
    images_dir = data_dir / "train" / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found (train.csv lists person folders there)")
    rows = []
    skipped = 0
    for p in people.itertuples(index=False):
        found, n_skipped = _scan_person(images_dir / p.person, p.person)
        skipped += n_skipped
        for stem, name in found.items():
            rows.append((p.person, p.id, p.gender, p.race, p.age, MASK_BY_STEM[stem], stem,
                         f"train/images/{p.person}/{name}"))
    t = pd.DataFrame(rows, columns=list(TABLE_COLUMNS[:-1]))
    t = t.astype({"gender": np.int64, "age": np.int64, "mask": np.int64})
    t = t.sort_values(["person", "file"], kind="stable").reset_index(drop=True)
    t["label"] = _true_labels(t)
    if skipped:
        log.info("%s: skipped %d non-image or unknown file(s)", images_dir, skipped)
    if corrections is not None:
        t = apply_corrections(t, corrections, strict=strict)
    else:
        t.attrs["corrections_applied"] = 0
    t.attrs["skipped_files"] = skipped
    return t


def load_eval_table(data_dir: str | Path) -> pd.DataFrame:
    """Eval images in ``eval/info.csv`` order: columns ImageID, file (``eval/images/<ImageID>``).

    Every listed image must exist: a submission with a row for a missing file cannot be scored.
    """
    data_dir = Path(data_dir)
    csv = data_dir / "eval" / "info.csv"
    df = _read_csv(csv, EVAL_COLUMNS)
    ids = df["ImageID"]
    if (ids == "").any():
        raise DataError(f"{csv} line {_line(ids.index[ids == ''][0])}: empty 'ImageID'")
    dup = ids.duplicated()
    if dup.any():
        first = ids[dup].iloc[0]
        lines = ", ".join(str(_line(i)) for i in ids.index[ids == first][:6])
        raise DataError(f"{csv}: ImageID {first!r} is listed more than once (lines {lines}); "
                        f"the submission needs each image once")
    images_dir = data_dir / "eval" / "images"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: folder not found ({csv} lists {len(ids)} images there)")
    present = set(os.listdir(images_dir))
    absent = ~ids.isin(present)
    if absent.any():
        shown = ", ".join(f"{name!r} (line {_line(i)})" for i, name in ids[absent][:5].items())
        more = f" and {int(absent.sum()) - 5} more" if absent.sum() > 5 else ""
        raise DataError(f"{csv}: {int(absent.sum())} of {len(ids)} listed image(s) are not in "
                        f"{images_dir}: {shown}{more}")
    return pd.DataFrame({"ImageID": ids.to_numpy(),
                         "file": ("eval/images/" + ids).to_numpy()})


def training_targets(table: pd.DataFrame, age_threshold: int) -> np.ndarray:
    """Training class per row with ages >= ``age_threshold`` counted as the oldest group.

    Only the targets the model is trained on change; ``table["label"]`` (threshold 60) stays the
    truth used for validation and the objective, so trials with different thresholds are scored
    on the same task.
    """
    grp = age_group(table["age"].to_numpy(), threshold=age_threshold)
    return np.asarray(encode(table["mask"].to_numpy(), table["gender"].to_numpy(), grp), np.int64)
