"""timm backbones with an 18-way head, or three heads (mask / gender / age) joined into 18 classes.

Why the multi head returns 18-way log-probabilities: the engine, the metrics and the ensemble
then handle both heads alike (argmax over 18, probabilities via ``to_probabilities``); only the
loss looks at the per-head marginals (``core.losses``). The same holds for the ordinal age head
(``age_head="ordinal"``): its two cumulative logits become three ordered group probabilities
inside the model, so nothing downstream knows which age head was trained.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigError, TrainConfig
from core.errors import first_line
from core.labels import NUM_AGE, NUM_CLASSES, NUM_GENDER, NUM_MASK
from core.weights import missing_weights

#: Outputs of the age head: one logit per group, or one per cumulative task (>=30, >=60).
AGE_OUTPUTS = {"classes": NUM_AGE, "ordinal": NUM_AGE - 1}


def ordinal_age_log_probs(z: torch.Tensor) -> torch.Tensor:
    """Two ordinal logits (N, 2) -> log P(age group) (N, 3), ordered and valid by construction.

    ``z[:, 0]`` is the logit of P(age >= 30), ``z[:, 1]`` that of P(age >= 60 | age >= 30), so
    P(>=60) = P(>=30) * sigmoid(z[:, 1]) can never exceed P(>=30), and the groups
    (1 - P(>=30), P(>=30) - P(>=60), P(>=60)) are non-negative and sum to 1 for any logits.
    This is the conditional parameterization of CORN (Shi, Cao & Raschka 2021). Why not two
    free sigmoids, one per threshold: their cumulative probabilities can cross, and a crossing
    means a negative middle group. In log space with logsigmoid, so large logits stay finite.
    """
    ge30, ge60_given_ge30 = z.float().unbind(1)
    ls = F.logsigmoid
    return torch.stack([ls(-ge30), ls(ge30) + ls(-ge60_given_ge30),
                        ls(ge30) + ls(ge60_given_ge30)], dim=1)


class MultiHeadNet(nn.Module):
    """Backbone features -> mask (3), gender (2), age (3 or 2) linear heads -> 18-way log-probs.

    The three heads are one timm classifier with 3+2+3 outputs (3+2+2 for the ordinal age head)
    split in three, which is the same as three ``nn.Linear`` on the pooled features, and keeps
    timm's own pooling, dropout and head layout (``reset_classifier``, ViT heads) for every
    architecture.
    """

    multi_head = True

    def __init__(self, backbone: nn.Module, age_head: str = "classes") -> None:
        super().__init__()
        self.backbone = backbone
        self.age_head = age_head

    def head_log_probs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head log-probabilities: (N, 3), (N, 2), (N, 3), in float32 (safe under autocast).

        The age head's are a log-softmax, or ``ordinal_age_log_probs`` of its two logits.
        """
        z = self.backbone(x).float()
        zm, zg, za = z.split((NUM_MASK, NUM_GENDER, AGE_OUTPUTS[self.age_head]), dim=1)
        la = ordinal_age_log_probs(za) if self.age_head == "ordinal" else F.log_softmax(za, 1)
        return F.log_softmax(zm, 1), F.log_softmax(zg, 1), la

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lm, lg, la = self.head_log_probs(x)
        # log P(class) = log P(mask) + log P(gender) + log P(age), laid out as
        # class = mask * 6 + gender * 3 + age (C order over (mask, gender, age)).
        joint = lm[:, :, None, None] + lg[:, None, :, None] + la[:, None, None, :]
        return joint.reshape(x.shape[0], NUM_CLASSES)


def _pretrained_help(backbone: str) -> str:
    return (
        f"pretrained weights for backbone '{backbone}' could not be loaded (no network or not "
        f"in the cache). Fix: run once with internet to fill the Hugging Face cache "
        f"(HF_HOME, default ~/.cache/huggingface), or put a local weights file in the config "
        f"as pretrained_file='/path/to/weights.safetensors' (passed to timm "
        f"as pretrained_cfg_overlay=dict(file=...)), or set pretrained=False"
    )


def check_weights_available(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` (with the fix) when ``cfg`` asks for hub weights that cannot be had.

    Cheap: reads the local caches and, only when the weights are not there, tries one connect.
    ``HF_HUB_OFFLINE=1`` without cached weights fails here without any network access.
    """
    if not cfg.pretrained or cfg.pretrained_file:
        return
    missing, why = missing_weights([cfg.backbone], None)
    if missing:
        raise ConfigError(f"{_pretrained_help(cfg.backbone)} ({why})")


def create_model(cfg: TrainConfig) -> nn.Module:
    """The network for ``cfg``: logits (N, 18) for head="single", log-probs for head="multi".

    Every returned module has a ``multi_head`` attribute. Raises ``ConfigError`` for an unknown
    backbone or for pretrained weights that cannot be had (offline), saying how to fix it.
    """
    cfg.validate()  # head and backbone name: one check, one wording (TrainConfig)
    num_out = (NUM_CLASSES if cfg.head == "single"
               else NUM_MASK + NUM_GENDER + AGE_OUTPUTS[cfg.age_head])
    kwargs: dict = {"num_classes": num_out, "drop_rate": cfg.drop_rate}
    weights_file = cfg.pretrained_file if cfg.pretrained else None
    if weights_file:
        if not Path(weights_file).is_file():
            raise ConfigError(f"config field 'pretrained_file': no such file {weights_file}")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
    check_weights_available(cfg)
    try:
        net = timm.create_model(cfg.backbone, pretrained=cfg.pretrained, **kwargs)
    except Exception as e:  # hub/network/cache errors come in many types; all mean "no weights"
        if not cfg.pretrained:
            raise
        raise ConfigError(f"{_pretrained_help(cfg.backbone)} ({first_line(e)})") from e
    if cfg.head == "multi":
        return MultiHeadNet(net, cfg.age_head)
    net.multi_head = False
    return net


def is_multi_head(model: nn.Module) -> bool:
    """True when the model returns 18-way log-probabilities (the three-head model)."""
    return bool(getattr(model, "multi_head", False))


def to_probabilities(model: nn.Module, outputs: torch.Tensor) -> torch.Tensor:
    """Model outputs -> probabilities (N, 18) float32: exp for the multi head, else softmax."""
    outputs = outputs.float()
    return outputs.exp() if is_multi_head(model) else F.softmax(outputs, dim=1)
