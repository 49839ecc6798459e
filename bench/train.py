"""Training images/s end to end vs the model alone, and per DataLoader worker count, in one run.

Arms, each with its own model, optimizer and scheduler, doing the same steps on the same config
(``core.engine.train_step``, the step every trial runs):

- limit: one random batch already on the device: what the hardware does with no input at all;
- ours, N workers: the engine's loader (``core.loader.create_loader``: rows of a memory-mapped
  uint8 array shaped like the image cache -> ``train_transform`` -> batches, N worker
  processes, pinned memory on CUDA) -> the step; ``auto`` is ``default_loader_workers(device)``;
- naive (``--naive``): every image decoded again from its 384x512 file (PIL), resized, the same
  augmentation and step: what a loader without the cache costs.

Windows are interleaved (every arm's window 1, then every arm's window 2, ..., in a rotating
order) so that a machine getting busier or quieter moves every arm alike; each figure is the
median images/s of ``--windows`` windows of ``--steps`` steps. Each window gets a fresh loader
whose first batch and ``--warm`` steps come before the clock starts, and whose workers are shut
down when it ends, so no arm's prefetching runs during another arm's window.

The rows are decoded synthetic photos resized to the training size (what the cache holds, minus
the face crop): the face detector plays no part in per-step speed, and leaving it out keeps
facenet-pytorch (and Optuna) out of the process. Only the end-to-end arms need Albumentations.

    python -m bench.train                                          # CPU, resnet18 at 128x96
    python -m bench.train --preset mask --steps 2                  # the mask study's largest
    python -m bench.train --preset mask --device cuda --size 224 168 --batch 128 --amp \\
        --channels-last --backbone resnet18 efficientnet_b0 --steps 40 --windows 5   # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import TrainConfig

#: The mask study's largest settings (studies/mask.py): its biggest input, its batch, the
#: strongest augmentation and CutMix on every batch; the two backbones issue 11 asks about.
#: On the CPU, torch's default thread count, which is what a trial in ``search.run`` gets.
PRESETS: dict[str, dict] = {
    "mask": {"size": (384, 288), "batch": 32, "aug_strength": 1.0, "mix": "cutmix",
             "mix_prob": 1.0, "backbone": ["resnet18", "efficientnet_b0"],
             "workers": ["0", "auto", "1", "2"], "threads": 0},
}
#: Modules this benchmark must not need; reported at the end so a GPU box knows what it lacks.
WATCHED = ("optuna", "facenet_pytorch", "albumentations", "sklearn", "pandas", "cv2")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Arm:
    """One measured configuration: how to get a window's batches, and its own trainer state."""

    name: str
    cfg: TrainConfig
    batches: Callable[[], Iterator]  # a fresh source per window (a new loader, or the limit)
    trainer: tuple = ()
    rates: list[float] = field(default_factory=list)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def new_trainer(cfg: TrainConfig, total_steps: int) -> tuple:
    """(model, loss, optimizer, scheduler, mixup) exactly as a fold builds them."""
    from core.augment import create_mixup
    from core.engine import memory_format_for
    from core.loader import seed_everything
    from core.losses import create_loss
    from core.models import create_model
    from core.optim import create_optimizer, create_scheduler

    device = cfg.resolved_device()
    seed_everything(cfg.seed)
    model = create_model(cfg).to(device, memory_format=memory_format_for(device, cfg)).train()
    criterion = create_loss(cfg, np.arange(cfg.batch_size) % 18).to(device)
    optimizer = create_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch=total_steps)
    return model, criterion, optimizer, scheduler, create_mixup(cfg)


def warm_steps(cfg: TrainConfig, asked: int | None) -> int:
    """Untimed steps that start each window: ``asked``, else 1 on the CPU, 1 + workers on CUDA.

    A fresh loader's workers each make a batch while the first one is awaited; on a fast GPU
    those would flatter a short window, so as many steps as workers go before the clock. On the
    CPU a step costs a hundred times a batch's loading, so one step is enough.
    """
    if asked is not None:
        return asked
    return 1 + cfg.num_workers if cfg.resolved_device().startswith("cuda") else 1


def run_window(arm: Arm, steps: int, warm: int | None) -> float:
    """images/s of ``steps`` steps of ``arm`` after its untimed first batch and warm steps."""
    from core.engine import train_step

    model, criterion, optimizer, scheduler, mixup = arm.trainer
    device = arm.cfg.resolved_device()
    source = arm.batches()
    x, y = next(source)  # workers started, first batch made: not what a long epoch pays
    for _ in range(warm_steps(arm.cfg, warm)):
        train_step(model, criterion, optimizer, scheduler, x, y, arm.cfg, device, mixup)
        x, y = next(source)
    _sync(device)
    t, n = time.perf_counter(), 0
    for i in range(steps):
        if i:
            x, y = next(source)
        train_step(model, criterion, optimizer, scheduler, x, y, arm.cfg, device, mixup)
        n += len(x)
    _sync(device)
    rate = n / (time.perf_counter() - t)
    del source, x, y
    gc.collect()  # the loader goes now, and its workers with it, before the next arm's window
    return rate


def measure(arms: list[Arm], windows: int, steps: int, warm: int | None) -> None:
    """Fill every arm's ``rates`` with ``windows`` interleaved windows (rotating order)."""
    for arm in arms:
        arm.trainer = new_trainer(arm.cfg, windows * (steps + warm_steps(arm.cfg, warm)))
    for w in range(windows):
        k = w % len(arms)
        for arm in arms[k:] + arms[:k]:
            arm.rates.append(run_window(arm, steps, warm))
    for arm in arms:
        arm.trainer = ()


def decoded_rows(files: list[Path], size: tuple[int, int], n: int, path: Path) -> np.ndarray:
    """``n`` rows (n, h, w, 3) uint8 in a memory-mapped .npy, like the cache's ``images.npy``:
    the photos decoded and resized once, repeated to ``n`` rows (content does not change speed)."""
    from PIL import Image

    h, w = size
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
    for i, f in zip(range(n), itertools.cycle(files), strict=False):
        if i < len(files):
            with Image.open(f) as im:
                out[i] = np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
        else:
            out[i] = out[i % len(files)]
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def photo_files(data: Path) -> list[Path]:
    """The synthetic set's training photos (macOS ``._`` junk and non-images left out)."""
    return sorted(p for p in (data / "train" / "images").rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._"))


class NaivePhotos(torch.utils.data.Dataset):
    """(image, label): decode the 384x512 file on every access, resize, then the transform."""

    def __init__(self, files: list[Path], labels: np.ndarray, transform, size: tuple[int, int]):
        self.files, self.labels, self.transform, self.size = files, labels, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            img = im.convert("RGB").resize(self.size[::-1], Image.Resampling.BILINEAR)
        return self.transform(image=np.asarray(img))["image"], int(self.labels[i])


def worker_counts(tokens: Iterable[str], device: str) -> list[tuple[str, int]]:
    """(label, count) per distinct count: ``auto`` is ``default_loader_workers(device)``, and a
    count asked for twice (``0`` and ``auto`` on the CPU) is measured once, labelled "0 = auto"."""
    from core.loader import default_loader_workers

    out: dict[int, list[str]] = {}
    for tok in tokens:
        names = out.setdefault(default_loader_workers(device) if tok == "auto" else int(tok), [])
        if tok not in names:
            names.append(tok)
    return [(" = ".join(names), n) for n, names in out.items()]


def end_to_end_arms(cfg: TrainConfig, args: argparse.Namespace, tmp: Path) -> list[Arm]:
    """The loader arms on synthetic photos; raises ImportError when Albumentations is missing."""
    from core.augment import train_transform  # Albumentations: the one extra the arms need
    from core.loader import create_loader
    from core.synth import generate

    device = cfg.resolved_device()
    data = generate(tmp / "data", people=args.people, eval_people=1, seed=0, size=(512, 384),
                    progress=False)
    files = photo_files(data)
    counts = worker_counts(args.workers, device)
    most = max(warm_steps(dataclasses.replace(cfg, num_workers=w), args.warm) for _, w in counts)
    n = max(len(files), (args.steps + most + 1) * cfg.batch_size)  # no window wraps an epoch
    rows = decoded_rows(files, cfg.image_size, n, tmp / "images.npy")
    labels = np.arange(n) % 18
    arms = []
    for label, workers in counts:
        c = dataclasses.replace(cfg, num_workers=workers)
        arms.append(Arm(f"ours, {workers} loader workers ({label})", c, lambda c=c: iter(
            create_loader(rows, labels, train_transform(c), c.batch_size, c, True, device))))
    if args.naive:
        c = arms[0].cfg
        cycled = [files[i % len(files)] for i in range(n)]  # as many rows as ours: no wrap
        ds = NaivePhotos(cycled, labels, train_transform(c), c.image_size)
        arms.append(Arm(f"naive, {c.num_workers} loader workers", c, lambda: iter(
            torch.utils.data.DataLoader(ds, c.batch_size, shuffle=True, drop_last=True,
                                        num_workers=c.num_workers,
                                        pin_memory=device.startswith("cuda")))))
    return arms


def limit_arm(cfg: TrainConfig) -> Arm:
    """One random batch on the device, reused every step: the model alone."""
    device = cfg.resolved_device()
    x = torch.randn(cfg.batch_size, 3, *cfg.image_size, device=device)
    y = torch.randint(0, 18, (cfg.batch_size,), device=device)
    return Arm("limit (random batch on the device)", cfg, lambda: itertools.repeat((x, y)))


def bench_backbone(cfg: TrainConfig, args: argparse.Namespace) -> tuple[list[Arm], str]:
    """Measure every arm that can run for ``cfg``; the second value says what could not."""
    missing = ""
    with tempfile.TemporaryDirectory() as tmp:
        arms = [limit_arm(cfg)]
        try:
            arms += end_to_end_arms(cfg, args, Path(tmp))
        except ImportError as e:
            name = e.name or str(e)
            hint = " (pip install 'albumentations>=2')" if name.startswith("albu") else ""
            missing = f"end-to-end arms NOT run: {name} is not installed{hint}; only the limit ran"
        measure(arms, args.windows, args.steps, args.warm)
    return arms, missing


def paired(a: Arm, b: Arm) -> float:
    """Median over rounds of a's images/s over b's in the same round: the two ran minutes apart
    at most, so a load that drifts over the run cancels out (a ratio of medians would not)."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates, strict=True))


def report(cfg: TrainConfig, args: argparse.Namespace, arms: list[Arm], missing: str) -> list[str]:
    """Print one backbone's figures; return its ratio lines (printed last, all together)."""
    h, w = cfg.image_size
    cuda = cfg.resolved_device().startswith("cuda")
    print(f"\n{cfg.backbone} at {h}x{w}, batch {cfg.batch_size}, device {cfg.resolved_device()}, "
          f"amp(bf16) {cfg.amp and cuda}, channels_last {cfg.channels_last and cuda}, torch "
          f"threads {torch.get_num_threads()}, aug_strength {cfg.aug_strength}, mix {cfg.mix} "
          f"p {cfg.mix_prob}; median of {args.windows} interleaved windows x {args.steps} steps")
    for a in arms:
        print(f"  {a.name:44s}: {statistics.median(a.rates):9.1f} images/s  (windows "
              f"{', '.join(f'{v:.1f}' for v in a.rates)})")
    if missing:
        print(f"  {missing}")
        return [f"{cfg.backbone}: {missing}"]
    limit, ours = arms[0], [a for a in arms[1:] if a.name.startswith("ours")]
    lines = [f"{cfg.backbone}: {a.name}: {paired(a, limit):5.2f} of the limit, "
             f"{paired(a, ours[0]):5.2f}x {ours[0].cfg.num_workers} workers" for a in arms[1:]]
    best = max(ours, key=lambda a: paired(a, limit))
    lines.append(f"{cfg.backbone}: fastest loader: {best.cfg.num_workers} workers "
                 f"({paired(best, limit):.2f} of the limit; goal >= 0.9)")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags; ``--preset`` sets defaults that explicit flags still override."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="mask: 384x288, batch 32, aug 1.0, CutMix p 1, resnet18 and "
                         "efficientnet_b0, workers 0 auto 1 2, torch's default threads")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", nargs="+", default=["resnet18"], help="one or more timm names")
    ap.add_argument("--channels-last", action="store_true", help="CUDA only")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast, CUDA only")
    ap.add_argument("--workers", nargs="+", default=["0"], metavar="N|auto",
                    help="DataLoader worker counts to compare (auto: default_loader_workers)")
    ap.add_argument("--people", type=int, default=10, help="synthetic people, 7 photos each")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed window")
    ap.add_argument("--warm", type=int, default=None,
                    help="untimed steps before each window (default: 1 on the CPU, "
                         "1 + workers on CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 0 = torch's default (1 is fastest on a shared "
                         "2-core machine without workers)")
    ap.add_argument("--aug-strength", type=float, default=TrainConfig().aug_strength)
    ap.add_argument("--mix", default="none", help="none, cutmix or mixup")
    ap.add_argument("--mix-prob", type=float, default=0.0)
    ap.add_argument("--naive", action="store_true", help="also the decode-every-epoch loader")
    pre, _ = ap.parse_known_args(argv)
    if pre.preset:
        ap.set_defaults(**PRESETS[pre.preset])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import core.engine  # noqa: F401  (every arm runs its step)
    except ImportError as e:
        sys.exit(f"no arm can run: core.engine needs '{e.name}', which is not installed "
                 "(core.engine imports core.augment -> albumentations and core.metrics -> "
                 "scikit-learn at the top)")
    ratios = []
    for backbone in args.backbone:
        cfg = TrainConfig(backbone=backbone, image_size=tuple(args.size), batch_size=args.batch,
                          device=args.device, amp=args.amp, channels_last=args.channels_last,
                          aug_strength=args.aug_strength, mix=args.mix,
                          mix_prob=args.mix_prob).validate()
        arms, missing = bench_backbone(cfg, args)
        ratios += report(cfg, args, arms, missing)
    loaded = {m.split(".")[0] for m in sys.modules}
    print("\nimported: " + ", ".join(f"{m} {'yes' if m in loaded else 'no'}" for m in WATCHED))
    print("ratios (median over windows of images/s / images/s in the same round):")
    for line in ratios:
        print(f"  {line}")


if __name__ == "__main__":
    main()
