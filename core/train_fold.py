"""Run one configuration on one fold from the shell, for debugging a config outside Optuna.

    python -m core.train_fold --data DIR --fold 0 --folds 5 --seed 0 --set lr=3e-4 --set epochs=2

``--seed`` is the fold seed (the study's ``fold_seed``), so the fold is the one a trial saw;
the training seed is a config field like any other (``--set seed=1``). ``--face`` sets a
``FaceSettings`` field the same way: a study with its own ``FACES`` (the demo's
``--face reduce=1 --face min_face_size=16``) needs them to train on the crops its trials saw.
Values are read as JSON when they parse (``3e-4``, ``true``, ``[96, 64]``), else as strings
(``resnet18``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from core.cli import Parser, run_cli
from core.config import ConfigError, TrainConfig
from core.errors import DataError
from core.faces import FaceSettings


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "backbone=resnet18"]`` -> ``{"lr": 0.0003, "backbone": "resnet18"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def build_faces(sets: list[str]) -> FaceSettings:
    """``FaceSettings`` with ``--face`` overrides (JSON lists become the tuples it holds)."""
    d = parse_set(sets)
    fields = {f.name for f in dataclasses.fields(FaceSettings)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"--face {', '.join(unknown)}: not a FaceSettings field "
                          f"({', '.join(sorted(fields))})")
    return FaceSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_config(config: str | None, sets: list[str]) -> TrainConfig:
    """Config from a JSON string or file (``--config``), then ``--set`` overrides, validated."""
    d: dict[str, Any] = {}
    if config:
        text = Path(config).read_text() if Path(config).is_file() else config
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config is neither a JSON file nor JSON text: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError("--config must be a JSON object of TrainConfig fields")
    d.update(parse_set(sets))
    return TrainConfig.from_dict(d).validate()


def run(args: argparse.Namespace) -> float:
    """Load data, fold and cache; train; print per-epoch and final macro F1; return the best."""
    from core.dataset import training_targets
    from core.engine import fit_fold
    from core.models import check_weights_available
    from core.study_data import load_study_data

    cfg = build_config(args.config, args.set or [])
    faces = build_faces(args.face or [])
    if not 0 <= args.fold < args.folds:
        raise ConfigError(f"--fold must be in 0..{args.folds - 1}, got {args.fold}")
    # Before the minutes of reading and caching: weights that cannot be had fail now.
    check_weights_available(cfg)
    if not Path(args.data).is_dir():
        raise DataError(f"data folder {str(args.data)!r} does not exist")
    # the rows, folds and crops a trial of a study with these settings sees
    data = load_study_data(args.data, args.corrections, args.folds, args.seed, faces=faces,
                           progress=not args.quiet)
    images = data.train_images(tuple(cfg.image_size))  # a view: never copied into RAM
    targets = training_targets(data.table, cfg.age_threshold)
    tr, va = data.folds != args.fold, data.folds == args.fold
    train_images, val_images = images[tr], images[va]
    print(f"fold {args.fold}/{args.folds}: {len(train_images)} training images, "
          f"{len(val_images)} validation "
          f"images, config {cfg.to_json()}", flush=True)

    def report(epoch: int, f1: float) -> bool:
        print(f"epoch {epoch + 1}: val macro F1 {f1:.4f}", flush=True)
        return False

    result = fit_fold(cfg, train_images, targets[tr], val_images, data.labels[va],
                      on_epoch=report, progress=not args.quiet)
    for h in result.history:
        print(json.dumps(h), flush=True)
    if result.diverged:
        print("training diverged (non-finite loss); lower lr or set grad_clip", flush=True)
    print(f"best val macro F1 {result.best_f1:.4f} at epoch {result.best_epoch + 1}", flush=True)
    return result.best_f1


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m core.train_fold", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="competition layout folder (train/, eval/)")
    p.add_argument("--fold", type=int, default=0, help="which fold to validate on")
    p.add_argument("--folds", type=int, default=5, help="number of person-level folds")
    p.add_argument("--seed", type=int, default=0, help="fold seed (the study's fold_seed)")
    p.add_argument("--corrections", default=None, help="label corrections CSV")
    p.add_argument("--config", default=None, help="TrainConfig as JSON text or a JSON file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one TrainConfig field (repeatable)")
    p.add_argument("--face", action="append", metavar="KEY=VALUE",
                   help="override one FaceSettings field (repeatable): the study's FACES, so "
                        "the crops are its trials'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    args = p.parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
