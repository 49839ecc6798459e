"""TrainConfig: bad values stop with one message naming the field; round trip is lossless."""

import pytest

from core.config import ConfigError, TrainConfig


def test_defaults_validate():
    cfg = TrainConfig().validate()
    assert cfg.backbone == "resnet18"
    assert cfg.select_epoch == "last"  # honest by default: no epoch picked on validation labels
    assert TrainConfig(select_epoch="best").validate().select_epoch == "best"
    # The options of issue 28 are off by default: today's shuffle, loss and batches.
    assert (cfg.sampler, cfg.soft_f1_weight, cfg.mix) == ("none", 0.0, "none")
    assert cfg.age_head == "classes"  # item 4: the 3-way age head unless asked
    TrainConfig(head="multi", age_head="ordinal").validate()
    TrainConfig(sampler="inverse", soft_f1_weight=1.0, mix="halfcut", mix_prob=0.5).validate()


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("lr", -1e-3, "'lr'"),
        ("lr", float("nan"), "'lr'"),
        ("backbone", "resnet_does_not_exist", "'backbone'"),
        ("loss", "hinge", "'loss'"),
        ("aug_strength", 1.5, "'aug_strength'"),
        ("age_threshold", 61, "'age_threshold'"),
        ("epochs", 0, "'epochs'"),
        ("image_size", (8, 8), "'image_size'"),
        ("device", "tpu", "'device'"),
        ("select_epoch", "median", "'select_epoch'"),
        ("sampler", "balanced", "'sampler'"),
        ("soft_f1_weight", 1.5, "'soft_f1_weight'"),
        ("soft_f1_weight", -0.1, "'soft_f1_weight'"),
        ("mix", "cutout", "'mix'"),
        ("age_head", "regression", "'age_head'"),
        ("age_head", "ordinal", "'age_head'.*needs head 'multi'"),  # the default head is single
    ],
)
def test_bad_values_name_the_field(field, value, fragment):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match=fragment) as err:
        cfg.validate()
    assert repr(value) in str(err.value) or field == "lr"


def test_unknown_backbone_suggests_similar_names():
    with pytest.raises(ConfigError, match="similar names: .*resnet"):
        TrainConfig(backbone="resnet_18x").validate()


def test_dict_round_trip_and_unknown_keys():
    cfg = TrainConfig(backbone="efficientnet_b0", image_size=(64, 48), lr=3e-4, age_threshold=58)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown config field.*colour"):
        TrainConfig.from_dict({**cfg.to_dict(), "colour": "red"})
