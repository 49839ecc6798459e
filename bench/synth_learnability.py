"""How learnable are the synthetic cues? One fold of a tiny CNN, macro F1 per factor vs majority.

Why: the demo study and the engine tests rely on core.synth drawing mask, gender and age cues a
small CNN can pick up at 48x32 after the face crop. This trains fold 0 of 3 (split by person) and
prints each factor's macro F1 next to the majority-class baseline, so a change to the drawing can
be judged in about a minute on one CPU thread.

    python -m bench.synth_learnability                 # face crop via core.cache (MTCNN)
    python -m bench.synth_learnability --crop full     # whole image resized, no face crop
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score

from core.config import TrainConfig
from core.dataset import load_train_table
from core.engine import fit_fold
from core.labels import NUM_CLASSES, decode, factor_probs
from core.splits import person_folds
from core.synth import generate

FACTORS = ("mask", "gender", "age")


def images_for(data: Path, files: list[str], size: tuple[int, int], crop: str,
               cache_root: Path) -> np.ndarray:
    """(N, H, W, 3) uint8 in ``files`` order: face-cropped via the cache, or whole images."""
    if crop == "full":
        return np.stack([np.asarray(Image.open(data / f).convert("RGB").resize(
            size[::-1], Image.BILINEAR)) for f in files])
    os.environ["MASK_SEARCH_CACHE"] = str(cache_root)
    from core.cache import build_cache
    from studies import demo, face_settings

    cache = build_cache(data, image_size=size, faces=face_settings(demo), cache_root=cache_root,
                        workers=1, progress=False)
    print("face boxes by source:", cache.manifest["box_sources"])
    return np.asarray(cache.images[cache.rows(files)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--crop", choices=("face", "full"), default="face")
    ap.add_argument("--head", choices=("single", "multi"), default="single")
    ap.add_argument("--class-weights", default="none", help="TrainConfig.class_weights")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    size = (48, 32)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = generate(Path(tmp) / "data", people=args.people, eval_people=8, seed=args.seed,
                        size=(64, 48))
        t_gen = time.perf_counter() - t0
        table = load_train_table(data)
        images = images_for(data, table["file"].tolist(), size, args.crop, Path(tmp) / "cache")
    labels = table["label"].to_numpy()
    va = person_folds(table, 3, seed=0) == 0
    cfg = TrainConfig(backbone=args.backbone, image_size=size, epochs=args.epochs, batch_size=32,
                      lr=3e-3, aug_strength=0.2, device="cpu", head=args.head,
                      class_weights=args.class_weights)
    t0 = time.perf_counter()
    res = fit_fold(cfg, images[~va], labels[~va], images[va], labels[va], progress=False)
    t_fit = time.perf_counter() - t0
    truth = decode(labels[va])
    probs = factor_probs(res.val_probs)
    print(f"{args.backbone} head={args.head} class_weights={args.class_weights}, "
          f"{args.epochs} epochs, crop={args.crop}, {args.people} people, "
          f"{int(va.sum())} val images; generate {t_gen:.1f}s, fit {t_fit:.1f}s")
    # the headline is the last epoch's (what a trial is scored on), never the best epoch picked
    # on the same validation fold it is then scored on (optimistic); the best is context
    print(f"18-class macro F1 {res.selected_f1:.3f} at the last epoch ({res.selected_epoch + 1}; "
          f"best epoch {res.best_epoch + 1}: {res.best_f1:.3f}, optimistic), "
          f"{NUM_CLASSES} classes")
    for name, y, p in zip(FACTORS, truth, probs, strict=True):
        major = np.bincount(y).argmax()
        f1 = f1_score(y, p.argmax(1), average="macro")
        base = f1_score(y, np.full_like(y, major), average="macro")
        print(f"{name:6s} macro F1 {f1:.3f}  majority {base:.3f}  ratio {f1 / base:.2f}")
        if name == "mask":
            print("  mask confusion (rows true wear/incorrect/normal):",
                  confusion_matrix(y, p.argmax(1), labels=[0, 1, 2]).tolist())
    print("val F1 per epoch:", " ".join(f"{h['val_f1']:.2f}" for h in res.history))
    return 0


if __name__ == "__main__":
    sys.exit(main())
