"""The gauge: the seed author's recipe trained once by hand, as a competitor would.

``python -m bench.gauge [--epochs N] [--image-size 96x72]`` trains ``studies.quality.GAUGE``
(the quality study's warm-start recipe) once on 90% of the training people of the real-face
set, validates on the other 10% (split by person, stratified like the study's folds), predicts
the eval images and scores them against the held-out answers. ``bench.quality`` runs it beside
the search on the same data: the search exists to beat this number.

Why these choices: one run on 90% of the people is what a hand run does (no k-fold); its epoch
count is the study's (``studies.quality.EPOCHS``, from the pilot), so gauge and trials train
alike and differ only in what the search adds (choice of recipe, folds, ensemble); the model
kept is the last epoch's (chosen without looking at validation, like the trials).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.cli import run_cli
from core.config import ConfigError, TrainConfig
from core.errors import DataError

#: 10 person-level folds, the first one validates: 90% of the people train (the tests' sets of
#: a few people get fewer folds, so that each stratum can fill them).
GAUGE_FOLDS = 10


def gauge_config(params: dict, weights: Path, epochs: int, device: str) -> TrainConfig:
    """The quality study's space evaluated at ``params`` (so the gauge and the warm-start trial
    are one recipe), with the local weights file, the epochs and the device."""
    import optuna

    from core.weights import weights_file
    from studies import quality

    cfg = quality.space(optuna.trial.FixedTrial(params))
    path = weights_file(weights, cfg.backbone)
    if path is None:
        raise ConfigError(f"no weights for backbone {cfg.backbone!r} in {weights}")
    cfg.pretrained_file, cfg.epochs, cfg.device = str(path), int(epochs), device
    return cfg.validate()


def run_gauge(data_dir: Path, weights: Path, epochs: int, device: str = "cpu",
              params: dict | None = None, seed: int = 0, progress: bool = False,
              faces: dict | None = None, pseudo: np.ndarray | None = None) -> dict:
    """Train the gauge once (training seed ``seed``); its validation curve, eval probabilities
    and wall time (training and prediction; loading the shared caches is counted apart).
    ``faces``: changes to the quality study's face settings (other crops, another cache).
    ``pseudo``: a pseudo-label per eval row (-1: none) to train on as well
    (``search.pseudo_labels``)."""
    import dataclasses

    from core.dataset import load_train_table, training_targets
    from core.engine import fit_fold, predict
    from core.study_data import load_study_data
    from search.pseudo_labels import with_pseudo
    from studies import face_settings, quality

    cfg = gauge_config(params or quality.GAUGE, weights, epochs, device)
    cfg.seed = int(seed)
    t0 = time.perf_counter()
    corrections = quality.corrections(data_dir)
    people = load_train_table(data_dir, corrections)["person"].nunique()  # tests' tiny sets
    data = load_study_data(data_dir, corrections, min(GAUGE_FOLDS, max(2, people // 4)),
                           quality.FOLD_SEED,
                           dataclasses.replace(face_settings(quality), **(faces or {})), progress)
    images = data.train_images(cfg.image_size)
    tr, va = data.folds != 0, data.folds == 0
    targets = training_targets(data.table, cfg.age_threshold)
    eval_images = data.eval_images(cfg.image_size)
    train_x, train_y = images[tr], targets[tr]
    if pseudo is not None:
        train_x, train_y = with_pseudo(train_x, train_y, eval_images, pseudo)
    t1 = time.perf_counter()  # caches are shared with the search: count training, not loading
    result = fit_fold(cfg, train_x, train_y, images[va], data.labels[va], progress=progress)
    if result.diverged:
        raise DataError("bench.gauge: the gauge's training diverged (non-finite loss)")
    eval_probs = predict(result.state_dict, cfg, eval_images)
    return {"config": cfg.to_dict(), "val_f1": [h["val_f1"] for h in result.history],
            "eval_probs": eval_probs, "image_ids": data.eval_table["ImageID"].tolist(),
            "train_people": int(data.table.loc[tr, "person"].nunique()),
            "seconds": time.perf_counter() - t1, "load_seconds": t1 - t0}


def cached_gauge(path: Path, data_dir: Path, weights: Path, epochs: int, device: str,
                 seed: int, params: dict | None = None, faces: dict | None = None,
                 pseudo: np.ndarray | None = None) -> dict:
    """``run_gauge`` once per (recipe, epochs, seed, face changes, pseudo-labels): its eval
    probabilities, curve and seconds are kept in ``path`` (an .npz written by temp name, then
    rename) and reused by a rerun (``bench.quality --no-search``, a gauge trained ahead beside
    the search, or ``bench.options``' reference arm). ``params``: the recipe (default the
    gauge's)."""
    import dataclasses
    import json

    from core.atomic import atomic_write
    from search.pseudo_labels import encode
    from studies import face_settings, quality

    params = dict(quality.GAUGE if params is None else params)
    # the crops as they are made now: a gauge trained on older crops (other default face
    # settings) is not reused
    crops = dataclasses.replace(face_settings(quality), **(faces or {})).key()
    key = json.dumps({"recipe": params, "epochs": int(epochs), "seed": int(seed), "crops": crops,
                      **({"pseudo": encode(pseudo)} if pseudo is not None else {})},
                     sort_keys=True)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {"eval_probs": z["eval_probs"], "val_f1": z["val_f1"].tolist(),
                        "seconds": float(z["seconds"]), "reused": True}
    g = run_gauge(data_dir, weights, epochs, device, params, seed=seed, faces=faces,
                  pseudo=pseudo)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, key=key, eval_probs=g["eval_probs"], val_f1=np.asarray(g["val_f1"]),
                     seconds=g["seconds"])

    atomic_write(path, save)
    return {**g, "reused": False}


def main(argv: Sequence[str] | None = None) -> int:
    from bench._quality_figures import task_f1
    from bench.quality import (
        answers_and_people,
        check_weights_folder,
        default_data_dir,
        weights_arg,
    )
    from core.bootstrap import interval, people_bootstrap
    from studies import quality

    p = argparse.ArgumentParser(prog="python -m bench.gauge", description=__doc__.split("\n")[0])
    weights_arg(p)
    p.add_argument("--epochs", type=int, action="append",
                   help=f"epochs (repeatable: one run each, the pilot); default {quality.EPOCHS}")
    p.add_argument("--image-size", choices=list(quality.IMAGE_SIZES), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    args = p.parse_args(argv)

    def body() -> int:
        weights = check_weights_folder(args.weights)
        data = default_data_dir()
        params = dict(quality.GAUGE)
        if args.image_size:
            params["image_size"] = args.image_size
        for epochs in args.epochs or [quality.EPOCHS]:
            g = run_gauge(data, weights, epochs, args.device, params,
                          progress=sys.stderr.isatty())
            answers, people = answers_and_people(data, g["image_ids"])
            pred = g["eval_probs"].argmax(axis=1)
            f = task_f1(answers, pred)
            lo, hi = interval(people_bootstrap(answers, [pred], people)[:, 0])
            curve = " ".join(f"{v:.3f}" for v in g["val_f1"])
            print(f"gauge size={params['image_size']} epochs={epochs} val_f1=[{curve}] "
                  f"heldout={f['f1']:.4f} [{lo:.4f}, {hi:.4f}] age={f['age']:.3f} "
                  f"old_classes={f['old_classes']:.3f} seconds={g['seconds']:.0f}", flush=True)
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
