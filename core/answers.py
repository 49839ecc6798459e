"""The ``ImageID,ans`` CSV: the competition's submission format, and the true answers a
synthetic set ships in the same format beside its data (``eval_answers.csv``).

Why one module: the ensemble writes it; ``search.ensemble.score``, the ensemble's held-out
figures and the benches read it. One reader gives one set of checks (columns, repeated or
missing ImageIDs, classes out of range), each a line naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.atomic import atomic_write
from core.errors import DataError
from core.labels import NUM_CLASSES

#: The true eval classes of a synthetic set, beside ``train/`` and ``eval/``.
ANSWERS_FILE = "eval_answers.csv"
COLUMNS = ("ImageID", "ans")


def read_answers(path: str | Path) -> pd.Series:
    """Classes by ImageID (int64, in the file's order)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    df = pd.read_csv(path, dtype={"ImageID": str})
    if not set(COLUMNS) <= set(df.columns):
        raise DataError(f"{path}: needs columns {','.join(COLUMNS)}")
    repeated = df["ImageID"][df["ImageID"].duplicated()]
    if len(repeated):
        raise DataError(f"{path}: ImageID {repeated.iloc[0]!r} occurs twice")
    ans = pd.to_numeric(df["ans"], errors="coerce")
    bad = ans.isna() | (ans % 1 != 0) | (ans < 0) | (ans >= NUM_CLASSES)
    if bad.any():
        raise DataError(f"{path}: ans {df['ans'][bad].iloc[0]!r} for ImageID "
                        f"{df['ImageID'][bad].iloc[0]!r} is not a class 0..{NUM_CLASSES - 1}")
    return pd.Series(ans.to_numpy(np.int64), index=df["ImageID"], name="ans")


def answers_for(path: str | Path, image_ids: Sequence[str]) -> np.ndarray:
    """The classes of ``image_ids``, in that order; one line when any is missing."""
    answers = read_answers(path)
    missing = pd.Index(list(image_ids)).difference(answers.index)
    if len(missing):
        raise DataError(f"{path}: no row for ImageID {missing[0]!r} ({len(missing)} missing)")
    return answers.loc[list(image_ids)].to_numpy(np.int64)


def eval_answers(data_dir: Path, image_ids: Sequence[str]) -> np.ndarray | None:
    """True eval classes in ``image_ids`` order when the set ships them (synthetic), else None."""
    path = Path(data_dir) / ANSWERS_FILE
    return answers_for(path, image_ids) if path.is_file() else None


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
