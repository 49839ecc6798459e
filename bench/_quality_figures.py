"""The figures ``bench.quality`` prints, from predictions, answers and crop boxes (no training).

Pure functions, so each figure can be checked against hand-made inputs: per-task F1 (mask,
gender, age: macro within each task, from the 18-way classes), the ">=60" classes' F1, and the
share of face crops that hold the true face box.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

from core.labels import AGE_GROUP_NAMES, NUM_CLASSES, decode
from core.metrics import macro_f1

#: A crop "holds the face" when it contains at least this share of the true face box's area.
HOLDS = 0.9
OLD = AGE_GROUP_NAMES.index(">=60")
OLD_CLASSES = [c for c in range(NUM_CLASSES) if int(decode(c)[2]) == OLD]


def task_f1(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro F1 of all 18 classes, of each task alone, and of the ">=60" classes.

    ``old_classes``: mean F1 of the six ">=60" classes in the 18-way problem (those present in
    truth or prediction); ``old_age``: F1 of ">=60" within the age task alone.
    """
    y_true, pred = np.asarray(y_true, np.int64), np.asarray(pred, np.int64)
    out = {"f1": macro_f1(y_true, pred)}
    for name, t, p in zip(("mask", "gender", "age"), decode(y_true), decode(pred), strict=True):
        out[name] = float(f1_score(t, p, average="macro", zero_division=0))
    present = [c for c in OLD_CLASSES if (y_true == c).any() or (pred == c).any()]
    per_class = f1_score(y_true, pred, labels=present, average=None, zero_division=0) \
        if present else np.array([])
    out["old_classes"] = float(np.mean(per_class)) if len(per_class) else float("nan")
    age_t, age_p = decode(y_true)[2], decode(pred)[2]
    out["old_age"] = float(f1_score(age_t == OLD, age_p == OLD, zero_division=0))
    return out


def containment(crops: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Share of each true box's area (x1, y1, x2, y2 rows) that lies inside its crop box."""
    c, t = np.asarray(crops, np.float64), np.asarray(truth, np.float64)
    w = np.clip(np.minimum(c[:, 2], t[:, 2]) - np.maximum(c[:, 0], t[:, 0]), 0, None)
    h = np.clip(np.minimum(c[:, 3], t[:, 3]) - np.maximum(c[:, 1], t[:, 1]), 0, None)
    area = (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])
    return w * h / np.maximum(area, 1e-9)


def crop_shares(index: pd.DataFrame, true_boxes: pd.DataFrame) -> pd.DataFrame:
    """Share of crops holding >= 90% of the true face box, per split x mask state x box_source.

    ``index``: the image cache's index (file, split, x1..y2 of the crop, box_source);
    ``true_boxes``: ``true_boxes.csv`` (file, x1..y2, mask). Returns rows split, mask,
    box_source, images, share (``box_source`` "all" sums the sources).
    """
    cols = ["x1", "y1", "x2", "y2"]
    merged = index[["file", "split", "box_source", *cols]].merge(
        true_boxes[["file", "mask", *cols]], on="file", suffixes=("", "_true"),
        validate="one_to_one")
    if len(merged) != len(index):
        missing = sorted(set(index["file"]) - set(merged["file"]))[:3]
        raise ValueError(f"true_boxes.csv has no box for {len(index) - len(merged)} cached "
                         f"image(s), e.g. {missing}")
    merged["holds"] = containment(merged[cols].to_numpy(),
                                  merged[[f"{c}_true" for c in cols]].to_numpy()) >= HOLDS
    parts = [merged, merged.assign(box_source="all")]
    out = (pd.concat(parts).groupby(["split", "mask", "box_source"])["holds"]
           .agg(images="size", share="mean").reset_index())
    return out.sort_values(["split", "mask", "box_source"], kind="stable").reset_index(drop=True)


def median(values: Sequence[float]) -> float:
    """Median that ignores NaN (a figure one seed could not compute)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def last_line(figures: Mapping[str, float]) -> str:
    """The line scripts read: the best single trial's OOF, held-out and gap; the ensemble's, the
    submission's and the gauge's held-out figures.

    ``figures`` are one seed's or the medians over seeds; the gap is its own median (as in the
    table), which over several seeds is not the median OOF minus the median held-out figure."""
    return (f"quality oof={figures['oof']:.4f} heldout={figures['heldout']:.4f} "
            f"gap={figures['gap']:+.4f} ensemble_heldout={figures['ensemble_heldout']:.4f} "
            f"submission_heldout={figures['submission_heldout']:.4f} "
            f"gauge_heldout={figures['gauge_heldout']:.4f}")


def seed_table(rows: Sequence[tuple[str, Callable[[dict], float]]], results: Sequence[dict],
               width: int = 36, col: int = 11) -> dict[str, float]:
    """Print one line per ``(label, getter)`` row: each seed's value, the median and the spread
    (max - min) over seeds; the medians by label."""
    print(f"{'':<{width}}" + "".join(f"{'seed ' + str(r['seed']):>{col}}" for r in results)
          + f"{'median':>{col}}{'spread':>{col}}")
    med = {}
    for label, get in rows:
        values = [float(get(r)) for r in results]
        med[label] = median(values)
        cells = [*values, med[label], max(values) - min(values)]
        print(f"{label:<{width}}" + "".join(f"{v:>{col}.4f}" for v in cells))
    return med
