"""CLI: ``python -m search.explain --study NAME [--trial N]``: where a trial's models look.

A grid of Grad-CAM heat maps (the ``grad-cam`` package, on timm's last feature stage) over the
trial's validation images: a few per mask state, worst first (lowest out-of-fold probability
of the true class, so the mistakes lead), each through the fold model that did not train on it,
with its true and predicted class. Saved as ``gradcam_trial<N>.png``, attached to the trial so
the dashboard lists it; the best trial gets one when ``search.ensemble`` writes a submission.
Optuna refuses to change a finished trial, so the record sits on the study
(``search.artifacts.attach_to_finished``), where optuna-dashboard looks for such files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any thread
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from core.augment import eval_transform
from core.cache import build_cache
from core.cli import Parser, run_cli
from core.config import TrainConfig
from core.labels import MASK_NAMES, class_name, decode
from core.models import create_model
from search.artifacts import OOF, attach_to_finished, load_array
from search.finished_study import (
    FinishedStudy,
    add_study_flags,
    fold_states,
    open_finished,
    study_rows,
    trial_config,
)

PER_STATE = 4  # images per mask state in the grid


def gradcam_name(number: int) -> str:
    return f"gradcam_trial{number}.png"


def cam_layer(model: nn.Module) -> nn.Module:
    """timm's last feature stage (``feature_info``), under our three-head wrapper or not."""
    net = getattr(model, "backbone", model)
    return net.get_submodule(net.feature_info[-1]["module"])


def pick_rows(labels: np.ndarray, oof: np.ndarray, per_state: int) -> list[np.ndarray]:
    """Per mask state, the ``per_state`` rows whose true class got the lowest OOF probability."""
    p_true = oof[np.arange(len(labels)), labels]
    mask = decode(labels)[0]
    return [rows[np.argsort(p_true[rows], kind="stable")[:per_state]]
            for rows in (np.flatnonzero(mask == m) for m in range(len(MASK_NAMES)))]


def heat_maps(cfg: TrainConfig, state: dict, images: np.ndarray, classes: np.ndarray
              ) -> np.ndarray:
    """Grad-CAM of ``classes`` on uint8 ``images`` through one fold model: (N, h, w) in [0, 1]."""
    model = create_model(cfg)
    model.load_state_dict(state)
    model.eval()
    tf = eval_transform(cfg)
    x = torch.stack([tf(image=img)["image"] for img in images])
    with GradCAM(model=model, target_layers=[cam_layer(model)]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


def gradcam_grid(found: FinishedStudy, number: int, out: Path, per_state: int = PER_STATE,
                 device: str | None = None) -> Path:
    """Draw the trial's grid into ``out`` (PNG)."""
    trial = found.trial(number)
    cfg = trial_config(trial, device or "cpu")
    data_dir, table, folds = study_rows(found.study)
    labels = table["label"].to_numpy(np.int64)
    oof = load_array(trial, found.store, OOF)
    chosen = pick_rows(labels, oof, per_state)
    images = build_cache(data_dir, tuple(cfg.image_size), found.faces, progress=False).view(
        table["file"].tolist())
    states = fold_states(trial, found.store, found.n_folds)
    rows = np.concatenate(chosen).astype(np.int64)
    crops = np.stack([np.asarray(images[int(r)]) for r in rows])
    preds = oof[rows].argmax(axis=1)
    cams = np.zeros(crops.shape[:3], np.float32)
    for k in np.unique(folds[rows]):  # one model per fold, all of its images in one pass
        at = folds[rows] == k
        cams[at] = heat_maps(cfg, states[int(k)], crops[at], preds[at])
    at_row = {int(r): i for i, r in enumerate(rows)}
    fig = Figure(figsize=(2.2 * per_state, 2.9 * len(chosen)))
    axes = fig.subplots(len(chosen), per_state, squeeze=False)
    for m, state_rows in enumerate(chosen):
        for j, ax in enumerate(axes[m]):
            ax.axis("off")
            if j >= len(state_rows):
                continue
            r = int(state_rows[j])
            i = at_row[r]
            pred = int(preds[i])
            ax.imshow(show_cam_on_image(crops[i].astype(np.float32) / 255, cams[i],
                                        use_rgb=True))
            wrong = pred != labels[r]
            ax.set_title(f"true {class_name(labels[r])}\npred {class_name(pred)} "
                         f"{oof[r, pred]:.2f}", fontsize=7, color="tab:red" if wrong else "black")
    fig.suptitle(f"Grad-CAM, trial {number} (validation images, worst first; red: mistaken)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def explain(found: FinishedStudy, number: int, device: str | None = None) -> str:
    """Make and attach the trial's Grad-CAM grid; returns the artifact id."""
    with tempfile.TemporaryDirectory(prefix="mask_search_gradcam_") as tmp:
        png = gradcam_grid(found, number, Path(tmp) / gradcam_name(number), device=device)
        return attach_to_finished(found.study, found.trial(number), found.store, png)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.explain", description=__doc__.split("\n")[0])
    add_study_flags(p)
    p.add_argument("--trial", type=int, help="trial number (default: the best trial)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1 ...")
    return p


def run(args: argparse.Namespace) -> str:
    found = open_finished(args)
    number = found.complete()[0].number if args.trial is None else args.trial
    aid = explain(found, number, args.device)
    print(f"attached {gradcam_name(number)} to trial {number} (artifact {aid}); the dashboard "
          f"lists it under the trial")
    return aid


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
