"""What a complete trial leaves for people to look at: its confusion matrix and per-class F1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, f1_score

from core.atomic import atomic_write
from core.labels import CLASS_NAMES, NUM_CLASSES


def confusion_png(labels: np.ndarray, pred: np.ndarray, path: Path, title: str) -> None:
    """Row-normalized 18x18 confusion matrix (true rows, predicted columns) as a PNG."""
    # lazy: matplotlib costs ~1 s to import, and a trial draws only when complete; no pyplot:
    # no GUI backend, safe in any thread
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 8), dpi=80)
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(
        labels, pred, labels=list(range(NUM_CLASSES)), display_labels=list(CLASS_NAMES),
        normalize="true", cmap="Blues", ax=ax, xticks_rotation="vertical", values_format=".2f",
        im_kw={"vmin": 0, "vmax": 1}, text_kw={"fontsize": 5})
    ax.tick_params(labelsize=7)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def class_f1(labels: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    """F1 per class name; None for a class absent from both truth and predictions."""
    present = set(np.unique(labels)) | set(np.unique(pred))
    scores = f1_score(labels, pred, labels=list(range(NUM_CLASSES)), average=None,
                      zero_division=0)
    return {name: (float(scores[c]) if c in present else None)
            for c, name in enumerate(CLASS_NAMES)}
