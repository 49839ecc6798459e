"""core.engine: a fold trains, is scored honestly (true labels, no augmentation), repeats exactly.

Images come straight from the synthetic data (PIL decode + resize), not the cache, so these tests
depend on the engine's contract only. A timm test model at 48x32 keeps them to seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score

import core.augment as augment
import core.engine as engine
import core.loader as loader
import core.optim as optim
from core.config import TrainConfig
from core.dataset import load_train_table, training_targets
from core.faces import FaceSettings
from core.labels import decode
from core.splits import person_folds
from core.train_fold import build_faces, parse_set
from core.train_fold import main as train_fold_main

SIZE = (48, 32)  # (height, width)
BACKBONE = "test_efficientnet"  # timm's tiny test net: resnet18 is ~15x slower on the CPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on two busy cores are several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(synth_data: Path) -> dict:
    table = load_train_table(synth_data)  # planted label errors stay: a little label noise
    images = np.stack([
        np.asarray(Image.open(synth_data / f).convert("RGB").resize(SIZE[::-1], Image.BILINEAR))
        for f in table["file"]
    ])
    folds = person_folds(table, n_folds=4, seed=0)
    return {"table": table, "images": images, "tr": folds != 0, "va": folds == 0}


def _cfg(**kw) -> TrainConfig:
    base = dict(backbone=BACKBONE, image_size=SIZE, epochs=2, batch_size=16, lr=3e-3,
                aug_strength=0.0, tta=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


class _Counting:
    """Wraps an Albumentations transform and records a digest of every image it sees."""

    def __init__(self, inner, seen: list[str]):
        self.inner, self.seen = inner, seen

    def __call__(self, **kw):
        self.seen.append(_digest(kw["image"]))
        return self.inner(**kw)


@pytest.fixture(scope="module")
def trained(data: dict) -> dict:
    """One real fold: threshold 57, augmentation on; spies on the transforms and the F1 truth."""
    t, tr, va = data["table"], data["tr"], data["va"]
    cfg = _cfg(epochs=10, lr=5e-3, age_threshold=57, aug_strength=0.3, class_weights="inverse")
    spy = {"train": [], "eval": [], "f1_truth": []}
    real_f1 = engine.macro_f1

    def f1_spy(y_true, probs):
        spy["f1_truth"].append(np.array(y_true))
        return real_f1(y_true, probs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "macro_f1", f1_spy)
        mp.setattr(engine, "train_transform",
                   lambda c: _Counting(augment.train_transform(c), spy["train"]))
        mp.setattr(engine, "eval_transform",
                   lambda c: _Counting(augment.eval_transform(c), spy["eval"]))
        result = engine.fit_fold(cfg, data["images"][tr], training_targets(t, 57)[tr],
                                 data["images"][va], t["label"].to_numpy()[va], progress=False)
    return {"cfg": cfg, "result": result, "spy": spy}


def test_learns_every_factor_above_majority_baseline(data: dict, trained: dict):
    result = trained["result"]
    y = data["table"]["label"].to_numpy()[data["va"]]
    pred = result.val_probs.argmax(axis=1)
    for name, truth, guess in zip(("mask", "gender", "age"), decode(y), decode(pred),
                                  strict=True):
        majority = np.full_like(truth, np.bincount(truth).argmax())
        baseline = f1_score(truth, majority, average="macro")
        got = f1_score(truth, guess, average="macro")
        assert got > baseline + 0.1, f"{name}: macro F1 {got:.3f} vs majority {baseline:.3f}"
    assert result.best_f1 == max(h["val_f1"] for h in result.history)
    assert result.history[result.best_epoch]["val_f1"] == result.best_f1
    # the default keeps the LAST epoch: nothing is chosen on the validation labels
    assert result.selected_epoch == len(result.history) - 1
    assert result.selected_f1 == result.history[-1]["val_f1"]


def test_training_loss_falls(trained: dict):
    losses = [h["train_loss"] for h in trained["result"].history]
    assert len(losses) == trained["cfg"].epochs
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(h["images_per_s"] > 0 for h in trained["result"].history)


def test_validation_scored_on_true_labels_whatever_the_threshold(data: dict, trained: dict):
    t, va = data["table"], data["va"]
    true = t["label"].to_numpy()[va]
    relabeled = training_targets(t, 57)[va]
    assert (true != relabeled).any(), "precondition: the validation fold holds ages 57..59"
    truths = trained["spy"]["f1_truth"]
    assert len(truths) == trained["cfg"].epochs
    for y in truths:
        np.testing.assert_array_equal(y, true)


def test_augmentation_never_touches_validation(data: dict, trained: dict):
    imgs, tr, va = data["images"], data["tr"], data["va"]
    train_set = {_digest(i) for i in imgs[tr]}
    val_set = {_digest(i) for i in imgs[va]}
    seen_train, seen_eval = trained["spy"]["train"], trained["spy"]["eval"]
    epochs, batch = trained["cfg"].epochs, trained["cfg"].batch_size
    assert set(seen_train) <= train_set and not set(seen_train) & val_set
    assert len(seen_train) == epochs * (tr.sum() // batch) * batch  # ragged tail dropped
    assert set(seen_eval) == val_set and len(seen_eval) == epochs * va.sum()


def test_predict_reproduces_the_selected_epoch_and_is_deterministic(data: dict, trained: dict):
    cfg, result = trained["cfg"], trained["result"]
    val = data["images"][data["va"]]
    probs = engine.predict(result.state_dict, cfg, val)
    assert probs.dtype == np.float32 and probs.shape == (len(val), 18)
    np.testing.assert_allclose(probs, result.val_probs, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # strength-1 augmentation in the config must not leak into prediction
    strong = _cfg(aug_strength=1.0, mix="cutmix", mix_prob=1.0)
    np.testing.assert_array_equal(engine.predict(result.state_dict, strong, val),
                                  engine.predict(result.state_dict, strong, val))


def test_flip_tta_is_symmetric(data: dict, trained: dict):
    cfg, sd = trained["cfg"], trained["result"].state_dict
    val = data["images"][data["va"]][:20]
    with_tta = engine.predict(sd, cfg, val, tta=True)
    np.testing.assert_allclose(with_tta, engine.predict(sd, cfg, val[:, :, ::-1], tta=True),
                               atol=1e-5)
    assert not np.allclose(with_tta, engine.predict(sd, cfg, val, tta=False), atol=1e-5)


def _small(data: dict, n_train: int = 64, n_val: int = 24):
    t = data["table"]
    tr, va = np.flatnonzero(data["tr"])[:n_train], np.flatnonzero(data["va"])[:n_val]
    y = t["label"].to_numpy()
    return data["images"][tr], y[tr], data["images"][va], y[va]


def test_same_seed_same_result_on_cpu(data: dict):
    args = _small(data)
    cfg = _cfg(aug_strength=1.0, mix="cutmix", mix_prob=0.5, warmup_epochs=0.5)
    a = engine.fit_fold(cfg, *args, progress=False)
    b = engine.fit_fold(cfg, *args, progress=False)
    c = engine.fit_fold(_cfg(aug_strength=1.0, mix="cutmix", mix_prob=0.5, warmup_epochs=0.5,
                             seed=1), *args, progress=False)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    np.testing.assert_array_equal(a.val_probs, b.val_probs)
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]


@pytest.mark.parametrize("head", ["single", "multi"])
def test_sampler_soft_f1_and_half_cutmix_train_and_repeat_exactly(data: dict, head: str):
    """The options of issue 28 together, through the real fold loop: finite losses, the same
    run twice gives the same weights, and they change what is trained (not silently ignored)."""
    args = _small(data)
    cfg = _cfg(epochs=1, head=head, sampler="inverse", soft_f1_weight=0.4, mix="halfcut",
               mix_prob=1.0)
    a = engine.fit_fold(cfg, *args, progress=False)
    b = engine.fit_fold(cfg, *args, progress=False)
    assert not a.diverged and np.isfinite(a.history[0]["train_loss"])
    np.testing.assert_array_equal(a.val_probs, b.val_probs)
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k
    for off in ({"sampler": "none"}, {"soft_f1_weight": 0.0}, {"mix": "none"}):
        other = engine.fit_fold(dataclasses.replace(cfg, **off), *args, progress=False)
        assert other.history[0]["train_loss"] != a.history[0]["train_loss"], off


def test_ordinal_age_head_trains_mixed_repeats_and_predicts_from_its_checkpoint(data: dict):
    """The ordinal age head through the real fold loop with half CutMix (soft targets): the run
    repeats exactly, trains something else than the 3-way head, and its kept weights load
    back into a model that predicts the validation probabilities again (rows summing to 1)."""
    args = _small(data)
    cfg = _cfg(epochs=1, head="multi", age_head="ordinal", mix="halfcut", mix_prob=1.0)
    a = engine.fit_fold(cfg, *args, progress=False)
    b = engine.fit_fold(cfg, *args, progress=False)
    assert not a.diverged and np.isfinite(a.history[0]["train_loss"])
    np.testing.assert_array_equal(a.val_probs, b.val_probs)
    np.testing.assert_allclose(a.val_probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(engine.predict(a.state_dict, cfg, args[2]), a.val_probs,
                               atol=1e-6)
    other = engine.fit_fold(dataclasses.replace(cfg, age_head="classes"), *args, progress=False)
    assert other.history[0]["train_loss"] != a.history[0]["train_loss"]


def test_row_view_trains_and_predicts_like_the_copied_rows(data: dict, tmp_path: Path):
    """A RowView on a memmap gives exactly what the fancy-indexed copy gives, without copying."""
    images = data["images"]
    mm = np.lib.format.open_memmap(tmp_path / "images.npy", mode="w+", dtype=np.uint8,
                                   shape=images.shape)
    mm[:] = images
    y = data["table"]["label"].to_numpy()
    tr, va = np.flatnonzero(data["tr"])[:64], np.flatnonzero(data["va"])[:24]
    view = loader.RowView(mm, va)
    assert len(view) == 24 and view.shape == (24, *images.shape[1:]) and view.dtype == np.uint8
    np.testing.assert_array_equal(view[3], images[va[3]])
    assert loader.ImageArrayDataset(view, None, lambda image: image).images is view
    cfg = _cfg(epochs=1)
    a = engine.fit_fold(cfg, images[tr], y[tr], images[va], y[va], progress=False)
    b = engine.fit_fold(cfg, loader.RowView(mm, tr), y[tr], view, y[va], progress=False)
    np.testing.assert_array_equal(a.val_probs, b.val_probs)
    np.testing.assert_array_equal(engine.predict(a.state_dict, cfg, view),
                                  engine.predict(a.state_dict, cfg, images[va]))
    with pytest.raises(ValueError, match="out of range"):
        loader.RowView(mm, [len(images)])


def test_on_epoch_true_stops_now(data: dict):
    calls = []

    def prune(epoch: int, f1: float) -> bool:
        calls.append((epoch, f1))
        return True

    r = engine.fit_fold(_cfg(epochs=3), *_small(data), on_epoch=prune, progress=False)
    assert r.stopped_early and not r.diverged
    assert len(calls) == 1 and len(r.history) == 1 and r.best_epoch == 0
    assert r.selected_epoch == 0 and r.selected_f1 == r.best_f1
    assert calls[0] == (0, r.best_f1) and r.state_dict


@pytest.mark.parametrize(("select", "want"), [("last", 2), ("best", 1)])
def test_select_epoch_picks_the_last_or_the_best_epoch(data: dict, select: str, want: int):
    """Scores 0.5, 0.9, 0.2: "last" keeps epoch 2 although epoch 1 scored higher; "best" epoch 1."""
    scores = iter([0.5, 0.9, 0.2])
    seen = []  # each epoch's validation probabilities, as the engine computed them
    real_predict = engine._predict_loader

    def spy_predict(*a, **kw):
        seen.append(real_predict(*a, **kw))
        return seen[-1]

    cfg = _cfg(epochs=3, select_epoch=select)
    args = _small(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "macro_f1", lambda y, p: next(scores))
        mp.setattr(engine, "_predict_loader", spy_predict)
        r = engine.fit_fold(cfg, *args, progress=False)
    assert len(seen) == 3
    assert not any(np.allclose(seen[want], seen[e], atol=1e-4) for e in range(3) if e != want)
    assert (r.best_epoch, r.best_f1) == (1, 0.9)
    assert (r.selected_epoch, r.selected_f1) == (want, [0.5, 0.9, 0.2][want])
    np.testing.assert_array_equal(r.val_probs, seen[want])
    # the kept weights are that epoch's: predicting with them reproduces its probabilities
    np.testing.assert_allclose(engine.predict(r.state_dict, cfg, args[2]), seen[want], atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_absurd_lr_ends_the_fold_without_crashing(data: dict, optimizer: str):
    r = engine.fit_fold(_cfg(lr=1e6, optimizer=optimizer, scheduler="none"), *_small(data),
                        progress=False)
    assert r.diverged, r.history
    assert r.history[-1]["diverged"]
    if r.best_epoch < 0:  # diverged before the first validation: nothing worth keeping
        assert r.state_dict == {} and np.allclose(r.val_probs, 1 / 18)


def test_schedules_warm_up_then_follow_their_shape():
    p = [torch.nn.Parameter(torch.zeros(1))]
    steps = 10

    def lrs(**kw) -> list[float]:
        cfg = _cfg(epochs=4, lr=1.0, **kw)
        opt = optim.create_optimizer(cfg, p)
        sched = optim.create_scheduler(cfg, opt, steps)
        out = []
        for _ in range(cfg.epochs * steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cos = lrs(scheduler="cosine", warmup_epochs=0.5)  # 5 warmup steps
    # pinned: warmup step k runs at (k + 1) / 6 of lr, the main schedule starts at exactly lr
    assert cos[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert cos[5:] == sorted(cos[5:], reverse=True) and cos[-1] < 0.01
    step = lrs(scheduler="step", step_every=2, step_gamma=0.1)
    assert step[0] == step[19] == 1.0 and step[20] == step[39] == pytest.approx(0.1)
    one = lrs(scheduler="onecycle", warmup_epochs=1)
    assert max(one) == pytest.approx(1.0) and int(np.argmax(one)) in (steps - 1, steps)
    assert one[0] < 0.1 and one[-1] < 0.01


def test_train_fold_cli_parses_sets_and_fails_in_one_line(tmp_path: Path, capsys):
    assert parse_set(["lr=3e-4", "backbone=resnet18", "image_size=[96, 64]", "tta=false"]) == {
        "lr": 3e-4, "backbone": "resnet18", "image_size": [96, 64], "tta": False}
    assert train_fold_main(["--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "absent" in err
    assert train_fold_main(["--data", str(tmp_path), "--set", "lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err


@pytest.mark.slow
def test_train_fold_cli_runs_one_fold_end_to_end(synth_data: Path, tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MASK_SEARCH_CACHE", str(tmp_path / "cache"))  # keep synth_data intact
    rc = train_fold_main(["--data", str(synth_data), "--fold", "1", "--folds", "4", "--quiet",
                          "--set", f"backbone={BACKBONE}", "--set", "image_size=[48, 32]",
                          "--set", "epochs=1", "--set", "batch_size=32", "--set", "device=cpu",
                          "--face", "reduce=1", "--face", "min_face_size=16",
                          "--face", 'detectors=["mtcnn"]'])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "epoch 1: val macro F1" in out and "best val macro F1" in out
    # the crops are the ones a study with these FACES trains on (the demo's, say), not the
    # default settings' (the bug: train_fold built every cache with the defaults)
    (manifest,) = (tmp_path / "cache").glob("images-48x32-*/manifest.json")
    faces = json.loads(manifest.read_text())["key"]["faces"]
    assert (faces["reduce"], faces["min_face_size"], faces["detectors"]) == (1, 16, ["mtcnn"])


def test_train_fold_face_flags_are_face_settings_fields(tmp_path: Path, capsys) -> None:
    assert build_faces(["reduce=1", "min_face_size=16", "thresholds=[0.5, 0.6, 0.6]"]) == \
        FaceSettings(reduce=1, min_face_size=16, thresholds=(0.5, 0.6, 0.6))
    assert train_fold_main(["--data", str(tmp_path), "--face", "min_face=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "min_face: not a FaceSettings field" in err


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_weight_decay_spares_biases_and_norm_layers(optimizer):
    """Decaying a BatchNorm scale or a bias towards 0 only hurts: every 1-D parameter sits in a
    group without weight decay, every weight matrix / kernel in one with the configured decay."""
    from core.models import create_model

    model = create_model(_cfg(backbone="test_resnet"))
    opt = optim.create_optimizer(_cfg(optimizer=optimizer, weight_decay=0.1), model)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(decay) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if p.ndim <= 1 else 0.1), name
    assert opt.param_groups[0].get("nesterov", False) == (optimizer == "sgd")
