"""Models: both heads give (N, 18); the three-head output is a proper joint distribution whose
argmax decodes to the per-head argmaxes; offline pretrained weights fail with a usable message."""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch

from core.config import ConfigError, TrainConfig
from core.labels import NUM_CLASSES, encode
from core.models import MultiHeadNet, create_model, is_multi_head, to_probabilities


@pytest.mark.parametrize("backbone", ["resnet18", "test_resnet"])
@pytest.mark.parametrize("head", ["single", "multi"])
def test_create_model_shapes(backbone, head):
    torch.manual_seed(0)
    model = create_model(TrainConfig(backbone=backbone, head=head, drop_rate=0.1)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, NUM_CLASSES)
    assert is_multi_head(model) == (head == "multi")
    probs = to_probabilities(model, out)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    assert (probs >= 0).all()


def test_single_head_probabilities_are_softmax_of_logits():
    model = create_model(TrainConfig(backbone="test_resnet")).eval()
    logits = torch.randn(4, NUM_CLASSES)
    torch.testing.assert_close(to_probabilities(model, logits), torch.softmax(logits, 1))


def test_multi_head_is_product_of_heads_and_decodes_consistently():
    torch.manual_seed(0)
    model = create_model(TrainConfig(backbone="test_resnet", head="multi")).eval()
    assert isinstance(model, MultiHeadNet) and model.multi_head
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        log_probs = model(x)
        lm, lg, la = model.head_log_probs(x)
    probs = to_probabilities(model, log_probs)
    torch.testing.assert_close(probs.sum(1), torch.ones(6))
    # P(class = m*6 + g*3 + a) = P(m) P(g) P(a), for every class
    pm, pg, pa = lm.exp(), lg.exp(), la.exp()
    for c in range(NUM_CLASSES):
        m, g, a = c // 6, (c // 3) % 2, c % 3
        torch.testing.assert_close(probs[:, c], pm[:, m] * pg[:, g] * pa[:, a])
    expected = encode(lm.argmax(1).numpy(), lg.argmax(1).numpy(), la.argmax(1).numpy())
    np.testing.assert_array_equal(probs.argmax(1).numpy(), expected)


def test_multi_head_trains():
    model = create_model(TrainConfig(backbone="test_resnet", head="multi"))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_backbone_is_config_error():
    with pytest.raises(ConfigError, match="no_such_net"):
        create_model(TrainConfig(backbone="no_such_net"))


@pytest.mark.timeout(60)
def test_pretrained_offline_raises_config_error_with_fix(monkeypatch, tmp_path):
    # Offline and an empty cache: no network is touched, so this cannot hang.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = TrainConfig(backbone="test_resnet", pretrained=True)
    with pytest.raises(ConfigError) as info:
        create_model(cfg)
    msg = str(info.value)
    assert "test_resnet" in msg
    assert "HF_HOME" in msg and "pretrained_file" in msg and "pretrained=False" in msg


def test_pretrained_from_local_file(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = timm.create_model("test_resnet", num_classes=1000)
    weights = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), weights)
    cfg = TrainConfig(backbone="test_resnet", pretrained=True, head="multi",
                      pretrained_file=str(weights))
    model = create_model(cfg)
    torch.testing.assert_close(model.backbone.conv1[0].weight, source.conv1[0].weight)

    cfg.pretrained_file = str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="missing.pth"):
        create_model(cfg)
