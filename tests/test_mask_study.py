"""The ``mask`` study as its users run it: local weights, ``--fix``, ``--corrections``, offline.

Nothing here touches the network: the hub is switched off (``HF_HUB_OFFLINE``) and every socket
connect fails, so a test that passes proves the path works on an offline GPU box.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import optuna
import pytest
import timm
import torch
from huggingface_hub import constants
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file

import search.ensemble.cli
import search.run
import search.weights
from core.config import ConfigError
from search import artifacts
from search.artifacts import checkpoint_name
from search.space import check_fixed, fits, fixed_sampler, override_waiting, parse_fixes
from studies import mask

MASK_BACKBONES = sorted(mask.BACKBONES)
REAL_CREATE_MODEL = timm.create_model


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty Hugging Face cache, the hub switched off, and no socket can connect."""
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("socket.create_connection", no_network)
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MASK_SEARCH_WEIGHTS", raising=False)


def run_mask(tmp_path: Path, data: Path, *extra: str) -> int:
    url = f"sqlite:///{tmp_path / 'mask.db'}"
    return search.run.main(["--study", "mask", "--storage", url, "--artifacts",
                            str(tmp_path / "artifacts"), "--data", str(data), *extra])


@pytest.mark.parametrize("hub_offline", [True, False])
def test_no_weights_offline_is_one_line_naming_every_backbone_and_stores_nothing(
        offline, hub_offline, synth_data, tmp_path, monkeypatch, capfd) -> None:
    """Refused fast: before any data is read, after at most one connect (none offline)."""
    connects, sleeps = [], []

    def no_network(address, timeout=None, *args, **kwargs):
        connects.append(address)
        raise OSError("network is unreachable")

    def must_not_read(*args, **kwargs):
        raise AssertionError("read the data before checking the weights")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_offline)
    monkeypatch.setattr("socket.create_connection", no_network)
    monkeypatch.setattr("search.run.load_study_data", must_not_read)
    monkeypatch.setattr("time.sleep", sleeps.append)
    code = run_mask(tmp_path, synth_data, "--trials", "1")
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2
    assert connects == ([] if hub_offline else [("huggingface.co", 443)]) and sleeps == []
    assert len(err) == 1 and err[0].startswith("error: pretrained weights missing for "
                                               + ", ".join(MASK_BACKBONES) + " (")
    assert "--weights DIR" in err[0] and "python -m search.weights --study mask" in err[0]
    url = f"sqlite:///{tmp_path / 'mask.db'}"
    assert optuna.get_all_study_names(url) == []  # refused before the study was created


def test_fix_narrows_the_weights_check_to_the_pinned_backbone(offline, synth_data, tmp_path,
                                                              capfd) -> None:
    assert run_mask(tmp_path, synth_data, "--trials", "1", "--fix", "backbone=resnet34") == 2
    err = capfd.readouterr().err
    assert "missing for resnet34 (" in err and "resnet18" not in err.split("(")[0]


@pytest.mark.parametrize(("fix", "words"), [
    ("nope=1", ["never suggests 'nope'", "it suggests: age_head, age_threshold", "backbone"]),
    ("backbone=vit_huge", ["backbone accepts one of resnet18", "convnext_tiny"]),
    ("age_threshold=61", ["age_threshold accepts 57..60"]),
    ("lr=5", ["lr accepts", "0.001..0.1", "1e-05..0.003"]),
    ("backbone", ["expected NAME=VALUE"]),
])
def test_a_bad_fix_is_one_line_and_exit_2(offline, fix, words, synth_data, tmp_path,
                                          capfd) -> None:
    assert run_mask(tmp_path, synth_data, "--trials", "1", "--fix", fix) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_a_fixed_value_another_branch_refuses_stops_the_trial_naming_what_it_accepts() -> None:
    """lr=0.05 is inside the SGD branch's range, so it parses; on the Adam branch it cannot."""
    fixed = parse_fixes(mask, ["lr=0.05", "optimizer=adam"])
    study = optuna.create_study(sampler=fixed_sampler(optuna.samplers.RandomSampler(0), fixed))
    trial = study.ask()
    with pytest.warns(UserWarning, match="out of range"):  # Optuna's own warning comes first
        mask.space(trial)
    with pytest.raises(ConfigError, match=r"--fix lr=0.05: on this branch .*optimizer=adam.* "
                                          r"lr accepts 1e-05..0.003"):
        check_fixed(trial, fixed)


def test_fix_wins_over_an_enqueued_trial(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"backbone": "resnet50", "loss": "focal"})
    fixed = {"backbone": "resnet18"}
    override_waiting(study, storage, fixed)
    study.sampler = fixed_sampler(optuna.samplers.RandomSampler(0), fixed)
    trial = study.ask()
    cfg = mask.space(trial)
    assert (cfg.backbone, cfg.loss) == ("resnet18", "focal")  # the rest of the queue stays


def test_fixes_are_fixed_per_study(offline, tmp_path, synth_data, capfd, monkeypatch) -> None:
    """A rerun with other --fix values is refused like other fixed settings; without --fix it
    takes the stored ones."""
    url = f"sqlite:///{tmp_path / 'mask.db'}"
    study = optuna.create_study(study_name="mask", storage=url, direction="maximize")
    for key, value in {"n_folds": 5, "fold_seed": 0, "data_dir": str(synth_data), "epochs": 8,
                       "report_mode": "epoch", "corrections": None, "weights": None,
                       "fixed": {"backbone": "resnet18"}}.items():
        study.set_user_attr(key, value)
    monkeypatch.setattr("search.study_settings.check_weights", lambda *a, **k: None)
    assert run_mask(tmp_path, synth_data, "--trials", "1", "--fix", "backbone=resnet34") == 2
    assert "created with fixed={'backbone': 'resnet18'}" in capfd.readouterr().err


def fake_hub(downloads: list[str], fail_on: str | None = None):
    """A stand-in for timm's hub loading: a small random network per name, no network."""
    def create_model(name: str, pretrained: bool = False, **kwargs):
        assert pretrained
        if name == fail_on:
            raise OSError("connection reset by peer")
        downloads.append(name)
        return REAL_CREATE_MODEL("test_resnet", num_classes=1000)
    return create_model


def test_search_weights_writes_every_backbone_atomically(tmp_path, monkeypatch, capsys) -> None:
    downloads: list[str] = []
    out = tmp_path / "weights"
    monkeypatch.setattr(search.weights.timm, "create_model", fake_hub(downloads, "resnet50"))
    assert search.weights.main(["--study", "mask", "--out", str(out)]) == 2
    assert "could not download pretrained weights for 'resnet50'" in capsys.readouterr().err
    done_before = sorted(p.name for p in out.iterdir())
    assert done_before == [f"{b}.safetensors" for b in MASK_BACKBONES if b < "resnet50"]

    monkeypatch.setattr(search.weights.timm, "create_model", fake_hub(downloads))
    assert search.weights.main(["--study", "mask", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{b}.safetensors" for b in MASK_BACKBONES]
    assert downloads.count("convnext_tiny") == 1  # kept from the first run, not fetched again
    state = load_file(out / "resnet18.safetensors")
    assert state["fc.weight"].shape[0] == 1000  # the ImageNet head, as the hub gives it
    assert "--weights" in capsys.readouterr().out


def write_marked_resnet18(folder: Path) -> Path:
    """resnet18 weights as timm's hub gives them (ImageNet head), random except conv1, all
    0.01: a value no initialisation produces, so a model holding it loaded this file."""
    state = timm.create_model("resnet18", num_classes=1000).state_dict()
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], 0.01)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.slow
def test_mask_study_runs_offline_on_local_weights_then_ensembles(offline, tiny_data, tmp_path,
                                                                 capsys) -> None:
    weights = write_marked_resnet18(tmp_path / "weights")
    fixes = ["backbone=resnet18", "image_size=224x168", "optimizer=adam", "lr=1e-05",
             "scheduler=cosine"]
    argv = ["--corrections", "none", "--weights", str(weights.parent), "--trials", "2",
            "--folds", "2", "--epochs", "1", "--seed", "0", "--pruner", "none"]
    assert run_mask(tmp_path, tiny_data, *argv, *[a for f in fixes for a in ("--fix", f)]) == 0
    url = f"sqlite:///{tmp_path / 'mask.db'}"
    study = optuna.load_study(study_name="mask", storage=url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert study.user_attrs["weights"] == {
        "resnet18.safetensors": {"bytes": weights.stat().st_size, "sha256": sha}}
    assert study.user_attrs["corrections"] is None
    for t in study.trials:  # warmup (0..2 epochs) cannot fit in 1 epoch: clamped, recorded
        clamp = t.user_attrs["clamped"]["warmup_epochs"]
        assert clamp == {"sampled": t.params["warmup_epochs"], "used": 0.0}
        assert t.user_attrs["config"]["warmup_epochs"] == 0.0
    store = artifacts.open_store(tmp_path / "artifacts")
    dest = tmp_path / "fold0.pt"
    artifacts.load_file(study.trials[0], store, checkpoint_name(0), dest)
    state = torch.load(dest, weights_only=True)
    conv1 = state.get("conv1.weight", state.get("backbone.conv1.weight"))  # single / multi head
    assert (conv1 - 0.01).abs().max() < 2e-3  # a few Adam steps at lr 1e-5 from the file
    capsys.readouterr()
    assert search.ensemble.cli.main(["--study", "mask", "--storage", url, "--artifacts",
                                 str(tmp_path / "artifacts"), "--out",
                                 str(tmp_path / "sub.csv")]) == 0
    assert (tmp_path / "sub.csv").read_text().startswith("ImageID,ans\n")


@pytest.mark.parametrize(("extra", "want"), [
    ([], [r["backbone"] for r in mask.WARM_START]),
    (["--fix", "backbone=resnet34"], ["resnet34"] * len(mask.WARM_START)),
    (["--fix", "optimizer=sgd"], []),  # every recipe's Adam lr is outside the SGD branch
    (["--no-warm-start"], []),
])
def test_warm_start_recipes_are_enqueued_once_in_order(offline, extra, want, synth_data,
                                                       tmp_path, monkeypatch) -> None:
    from tests.test_cli_errors import stop_at_data

    stop_at_data(monkeypatch)
    monkeypatch.setattr("search.study_settings.check_weights", lambda *a, **k: None)
    for _ in range(2):  # a rerun enqueues nothing more
        assert run_mask(tmp_path, synth_data, "--trials", "5", "--corrections", "none",
                        *extra) == 2
    study = optuna.load_study(study_name="mask", storage=f"sqlite:///{tmp_path / 'mask.db'}")
    waiting = [t.system_attrs["fixed_params"] for t in study.trials]
    assert [p["backbone"] for p in waiting] == want


@pytest.mark.parametrize("recipe", mask.WARM_START, ids=lambda r: r["backbone"])
def test_each_warm_start_recipe_is_a_complete_valid_point_of_the_space(recipe) -> None:
    """FixedTrial refuses any parameter the space asks for that the recipe lacks."""
    cfg = mask.space(optuna.trial.FixedTrial(recipe)).validate()
    assert (cfg.backbone, cfg.optimizer, cfg.scheduler, cfg.age_threshold) == (
        recipe["backbone"], "adam", "cosine", 59)
    # issue 28's options stay off: the recipes are the ones every earlier study enqueued
    assert (cfg.sampler, cfg.soft_f1_weight, cfg.mix, cfg.age_head) == (
        "none", 0.0, "none", "classes")
    assert fits(mask, recipe)


def test_a_worker_with_other_weights_is_refused_in_one_line(offline, tiny_data, tmp_path,
                                                            monkeypatch, capfd) -> None:
    """The study stores a fingerprint of its weights (names, sizes, SHA-256): a second machine
    or rerun with different files for the same backbone is refused before anything runs, in
    one line naming the study and the fix; the same files elsewhere are fine."""
    ran = []
    monkeypatch.setattr(search.run, "search_here", lambda run, workers, **kw: ran.append(1)
                        or True)
    first = write_marked_resnet18(tmp_path / "weights")
    argv = ["--trials", "1", "--fix", "backbone=resnet18", "--corrections", "none"]
    assert run_mask(tmp_path, tiny_data, *argv, "--weights", str(first.parent)) == 0
    moved = tmp_path / "elsewhere" / first.name  # the same files in another folder: accepted
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    assert run_mask(tmp_path, tiny_data, *argv, "--weights", str(moved.parent)) == 0
    capfd.readouterr()
    other = tmp_path / "other"
    state = load_file(str(first))
    state["fc.bias"] = state["fc.bias"] + 1  # another fine-tune of the same backbone
    other.mkdir()
    save_file(state, str(other / first.name))
    assert run_mask(tmp_path, tiny_data, *argv, "--weights", str(other)) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "study 'mask' was created with other pretrained weights" in err[0]
    assert "pass --weights with the study's files" in err[0]
    assert len(ran) == 2  # the refused run trained nothing
