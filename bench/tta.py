"""Flip TTA on the yardstick: each finished seed's best trial with and without it, held out.

``python -m bench.tta runs/quality/seed0 [runs/quality/seed1 ...]`` loads the best trial's fold
checkpoints of each ``bench.quality`` study, predicts the eval images with and without the
horizontal-flip average (``TrainConfig.tta``), and prints held-out macro F1 of both and their
paired difference with a 95% bootstrap interval over eval people. Nothing is trained: the same
fold models in both arms, so the difference is the flip alone (issue 26's TTA decision).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import median, task_f1
from bench.quality import STUDY, answers_and_people, default_data_dir
from core.bootstrap import interval, people_bootstrap
from core.cli import Parser, run_cli
from core.errors import DataError


def tta_figures(seed_dir: Path, data_dir: Path) -> dict:
    """Held-out F1 of the best trial's fold-mean prediction without and with flip TTA."""
    import optuna

    from core.engine import predict
    from core.study_data import load_study_data
    from search.artifacts import open_store
    from search.finished_study import fold_states, trial_config
    from studies import face_settings, quality

    db = Path(seed_dir) / "study.db"
    if not db.is_file():
        raise DataError(f"{db}: no study here (run python -m bench.quality first)")
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{db}")
    best = study.best_trial
    cfg = trial_config(best, "cpu")
    attrs = study.user_attrs  # the study's own folds (a smoke run may use --folds 2)
    data = load_study_data(data_dir, quality.corrections(data_dir),
                           int(attrs.get("n_folds", quality.FOLDS)),
                           int(attrs.get("fold_seed", quality.FOLD_SEED)), face_settings(quality))
    images = data.eval_images(cfg.image_size)
    states = fold_states(best, open_store(Path(seed_dir) / "artifacts"), data.n_folds)
    preds = [np.mean([predict(s, cfg, images, tta=tta) for s in states], axis=0).argmax(axis=1)
             for tta in (False, True)]
    answers, people = answers_and_people(data_dir, data.eval_table["ImageID"])
    boot = people_bootstrap(answers, preds, people)
    off, on = (task_f1(answers, p) for p in preds)
    return {"trial": best.number, "trained_with_tta": cfg.tta, "off": off["f1"], "on": on["f1"],
            "gain": on["f1"] - off["f1"], "gain_interval": interval(boot[:, 1] - boot[:, 0]),
            "old_classes": (off["old_classes"], on["old_classes"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="python -m bench.tta", description=__doc__.split("\n")[0])
    p.add_argument("seed_dirs", nargs="+", type=Path, help="bench.quality's runs/quality/seedN")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    args = p.parse_args(argv)

    def body() -> int:
        data = default_data_dir()
        gains = []
        for d in args.seed_dirs:
            f = tta_figures(d, data)
            lo, hi = f["gain_interval"]
            gains.append(f["gain"])
            print(f"{d}: trial {f['trial']} held-out off {f['off']:.4f} on {f['on']:.4f} "
                  f"gain {f['gain']:+.4f} [{lo:+.4f}, {hi:+.4f}] >=60 classes "
                  f"{f['old_classes'][0]:.3f} -> {f['old_classes'][1]:.3f}", flush=True)
        print(f"tta gain_median={median(gains):+.4f} seeds={len(gains)}")
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
