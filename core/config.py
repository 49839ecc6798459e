"""One dataclass holding every knob of a training run.

A study's ``space(trial)`` returns one of these; the engine reads nothing else. Defaults are
a sound CPU-friendly run; ``validate()`` turns bad values into one clear ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from core.labels import TRUE_OLD_FROM, YOUNG_BELOW

HEADS = ("single", "multi")  # one 18-way layer, or mask(3)/gender(2)/age(3) heads
#: The three-head model's age head: a 3-way softmax over the groups ("classes"), or two ordered
#: cumulative logits, P(age >= 30) and P(age >= 60), trained with binary cross entropy on the
#: cumulative targets ("ordinal"; see core.models.ordinal_age_log_probs and core.losses).
AGE_HEADS = ("classes", "ordinal")
#: Why an age head other than "classes" is refused with head="single" (validate, create_loss).
AGE_HEAD_NEEDS_MULTI = ("needs head 'multi' (the single head is one 18-way softmax, with no age "
                        "head of its own)")
LOSSES = ("ce", "focal")
CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse", "effective")
MIXES = ("none", "cutmix", "mixup", "halfcut")  # halfcut: CutMix whose box is half the image
#: How training images are drawn: shuffled once each ("none"), or with replacement, each image
#: weighted by 1/sqrt(n_c) or 1/n_c of its class (PyTorch's WeightedRandomSampler).
SAMPLERS = ("none", "sqrt_inverse", "inverse")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "onecycle", "step", "none")
SELECT_EPOCHS = ("last", "best")  # which epoch's model a fold keeps (see TrainConfig.select_epoch)
#: Fields that say where a run happens, not what it trains: they may differ between the machines
#: of one study (a retry elsewhere still resumes the finished folds).
MACHINE_FIELDS = ("device", "num_workers", "pretrained_file")


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the field."""


@dataclass
class TrainConfig:
    """Every setting of one training run (one fold of one trial)."""

    backbone: str = "resnet18"  # any timm.create_model name
    pretrained: bool = False
    pretrained_file: str = ""  # local weights (.safetensors/.pth) used when pretrained; "" = hub
    image_size: tuple[int, int] = (128, 96)  # (height, width), for train, val and predict alike
    head: str = "single"
    age_head: str = "classes"  # AGE_HEADS; "ordinal" needs head="multi"
    drop_rate: float = 0.0
    loss: str = "ce"
    focal_gamma: float = 0.0  # 0 makes focal equal to cross entropy
    class_weights: str = "none"
    effective_beta: float = 0.999  # Cui et al. 2019, used by class_weights="effective"
    label_smoothing: float = 0.0
    # Share of the soft macro-F1 loss: loss = (1 - w) * the loss above + w * soft-F1. 0 = off.
    soft_f1_weight: float = 0.0
    sampler: str = "none"  # SAMPLERS; training batches only
    aug_strength: float = 0.5  # 0 = resize/normalize only, 1 = the strongest set
    mix: str = "none"
    mix_prob: float = 0.0
    mix_alpha: float = 1.0
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"
    warmup_epochs: float = 0.0
    step_gamma: float = 0.1  # scheduler="step": lr multiplier every step_every epochs
    step_every: int = 2
    epochs: int = 5
    batch_size: int = 64
    grad_clip: float = 0.0  # 0 = off
    age_threshold: int = TRUE_OLD_FROM  # first age counted as ">=60" in the training targets
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    num_workers: int = 0  # DataLoader workers; 0 = in process
    tta: bool = True  # horizontal-flip test-time augmentation in predict
    # Which epoch's weights and validation probabilities a fold returns (its OOF rows, eval
    # predictions, checkpoint). "last": the final epoch, chosen without looking at validation
    # labels, so the OOF score is honest. "best": the epoch with the best validation macro F1,
    # chosen on the very labels it is then scored on, so the OOF score is optimistic.
    select_epoch: str = "last"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form user notes; core ignores it

    def validate(self) -> TrainConfig:
        """Raise ``ConfigError`` naming the first bad field; return self when all is well."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config field '{name}': {why} (got {getattr(self, name)!r})")

        for name, allowed in (
            ("head", HEADS),
            ("age_head", AGE_HEADS),
            ("loss", LOSSES),
            ("class_weights", CLASS_WEIGHTS),
            ("mix", MIXES),
            ("sampler", SAMPLERS),
            ("optimizer", OPTIMIZERS),
            ("scheduler", SCHEDULERS),
            ("select_epoch", SELECT_EPOCHS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        if self.age_head != "classes" and self.head != "multi":
            raise bad("age_head", AGE_HEAD_NEEDS_MULTI)
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive finite number")
        for name in ("weight_decay", "focal_gamma", "label_smoothing", "warmup_epochs",
                     "grad_clip", "drop_rate"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise bad(name, "must be >= 0")
        if self.label_smoothing >= 1:
            raise bad("label_smoothing", "must be < 1")
        for name in ("aug_strength", "mix_prob", "soft_f1_weight"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "must be in [0, 1]")
        if not 0 < self.effective_beta < 1:
            raise bad("effective_beta", "must be in (0, 1)")
        for name in ("epochs", "batch_size", "step_every"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise bad("warmup_epochs", f"must be below epochs ({self.epochs})")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            raise bad("image_size", "must be (height, width), each >= 16 pixels")
        if not YOUNG_BELOW < self.age_threshold <= TRUE_OLD_FROM:
            raise bad("age_threshold", f"must be in {YOUNG_BELOW + 1}..{TRUE_OLD_FROM}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise bad("device", "must be auto, cpu, cuda or cuda:N")
        import timm  # deferred: importing timm costs a second, validation of enums does not

        if not timm.is_model(self.backbone):
            close = timm.list_models(f"*{self.backbone.split('_')[0]}*")[:5]
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise bad("backbone", f"is not a timm model name{hint}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (image_size as a list)."""
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        d = dict(d)
        if "image_size" in d:
            d["image_size"] = tuple(int(x) for x in d["image_size"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def resolved_device(self) -> str:
        """'cuda' when asked for (or auto and available), else 'cpu'."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
