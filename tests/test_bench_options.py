"""bench.options: each arm is its reference recipe with one option changed, and the paired run
end to end (cached, reused on a rerun)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from bench.options import ARMS, needed, recipe
from studies import quality


def _config(arm: str) -> dict:
    return quality.space(optuna.trial.FixedTrial(recipe(arm))).to_dict()


@pytest.mark.parametrize(("arm", "fields"), [
    ("sampler", {"sampler": "sqrt_inverse"}),
    ("soft_f1", {"soft_f1_weight": 0.4}),
    ("halfcut", {"mix": "halfcut", "mix_prob": 0.5}),
    ("ordinal", {"age_head": "ordinal"}),
])
def test_an_arm_changes_only_its_option(arm: str, fields: dict) -> None:
    mine, ref = _config(arm), _config(ARMS[arm][0])
    assert {k: v for k, v in mine.items() if ref[k] != v} == fields
    assert _config("multi")["head"] == "multi" and _config("gauge")["head"] == "single"


def test_the_mtcnn_arm_is_the_gauge_on_mtcnn_boxes_alone() -> None:
    """Same recipe as its reference; only the face settings' detectors differ (another cache)."""
    import dataclasses

    from bench.options import FACE_CHANGES
    from studies import face_settings

    assert ARMS["mtcnn"][0] == "gauge" and recipe("mtcnn") == recipe("gauge")
    default = face_settings(quality)
    mine = dataclasses.replace(default, **FACE_CHANGES["mtcnn"])
    assert mine.detectors == ("mtcnn",) and "yunet" in default.detectors
    assert {f.name for f in dataclasses.fields(mine)
            if getattr(mine, f.name) != getattr(default, f.name)} == {"detectors"}


def test_the_faces_arm_takes_its_settings_from_the_command_line_and_names_its_runs(
        tmp_path: Path) -> None:
    from bench.options import cache_path, face_changes
    from core.config import ConfigError

    changes = face_changes(["yunet_margin=0.18", "detectors=[\"mtcnn\"]"])
    assert changes == {"yunet_margin": 0.18, "detectors": ("mtcnn",)}
    assert cache_path(tmp_path, "faces", 1, changes) == \
        tmp_path / "options" / "faces-detectors=mtcnn-yunet_margin=0.18-seed1.npz"
    assert cache_path(tmp_path, "faces", 1, {"yunet_margin": 0.2}) != \
        cache_path(tmp_path, "faces", 1, {"yunet_margin": 0.18})
    with pytest.raises(ConfigError, match="--face yunet_marge: not a FaceSettings field"):
        face_changes(["yunet_marge=0.1"])


def test_references_run_first_and_once() -> None:
    assert needed(["ordinal", "sampler", "soft_f1"]) == ["multi", "gauge", "ordinal", "sampler",
                                                         "soft_f1"]


@pytest.mark.slow
def test_bench_options_end_to_end_and_reused(faces_folder: Path, quality_weights: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from bench.options import main

    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MASK_SEARCH_CACHE", raising=False)
    argv = ["--faces", str(faces_folder), "--people", "8", "--eval-people", "3", "--epochs", "1",
            "--weights", str(quality_weights), "--arm", "sampler", "--arm", "pseudo"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"options sampler=[+-]\d\.\d{4} pseudo=[+-]\d\.\d{4}", last), last
    assert re.search(r"seed 0 pseudo: \d+% of the eval images at >= 0.9", out)
    runs = tmp_path / "runs"
    assert (runs / "quality" / "seed0" / "gauge.npz").is_file()  # the gauge arm, where
    assert (runs / "options" / "sampler-seed0.npz").is_file()  # bench.quality keeps it
    assert (runs / "options" / "pseudo-seed0.npz").is_file()
    summary = json.loads((runs / "options" / "options-sampler-pseudo.json").read_text())["summary"]
    assert float(last.split()[1].split("=")[1]) == pytest.approx(summary["sampler"]["gain"],
                                                                 abs=5e-5)
    assert main(argv) == 0  # a rerun trains nothing and says the same
    again = capsys.readouterr().out
    assert again.count("(reused)") == 3 and again.strip().splitlines()[-1] == last
    assert main([*argv, "--arm", "nosuch"]) == 2
    assert "--arm 'nosuch'" in capsys.readouterr().err
