"""bench.quality: its figures on hand-made inputs, and one tiny end-to-end run.

The end-to-end run uses a faces folder the test writes (``conftest.faces_folder``), never
``../shared``, and a one-trial, one-epoch protocol, so it checks the plumbing (data, faces,
cache, search, ensemble, report, JSON) and that the printed figures agree with what the study
and the answers say, not the quality of anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from bench._quality_figures import containment, crop_shares, last_line, task_f1
from bench.quality import check_weights_folder, medians
from core.bootstrap import interval, people_bootstrap
from core.errors import DataError
from core.faces import FOUND_SOURCES
from core.labels import encode
from core.metrics import macro_f1


def test_task_f1_separates_the_tasks() -> None:
    mask = np.array([0, 0, 1, 2, 0, 1])
    gender = np.array([0, 1, 0, 1, 1, 0])
    age = np.array([0, 1, 2, 2, 0, 1])
    truth = encode(mask, gender, age)
    wrong_gender = encode(mask, 1 - gender, age)  # mask and age right, every gender wrong
    f = task_f1(truth, wrong_gender)
    assert f["mask"] == 1.0 and f["age"] == 1.0 and f["gender"] == 0.0 and f["f1"] == 0.0
    assert f["old_age"] == 1.0 and f["old_classes"] == 0.0
    perfect = task_f1(truth, truth)
    assert all(v == 1.0 for v in perfect.values())
    young = encode(mask, gender, np.zeros_like(age))  # never predicts ">=60"
    assert task_f1(truth, young)["old_age"] == 0.0 and task_f1(truth, young)["mask"] == 1.0


def test_containment_and_crop_shares() -> None:
    truth = np.array([[10, 10, 20, 20]] * 3)
    crops = np.array([[0, 0, 30, 30], [15, 10, 30, 20], [10, 10, 19, 20]])
    assert containment(crops, truth).tolist() == [1.0, 0.5, 0.9]
    index = pd.DataFrame({"file": ["a", "b", "c", "d"], "split": ["train", "train", "train",
                                                                   "eval"],
                          "box_source": ["mtcnn", "person", "mtcnn", "dataset"],
                          "x1": [0, 15, 10, 0], "y1": [0, 10, 10, 0], "x2": [30, 30, 19, 5],
                          "y2": [30, 20, 20, 5]})
    true_boxes = pd.DataFrame({"file": ["d", "c", "b", "a"], "x1": 10, "y1": 10, "x2": 20,
                               "y2": 20, "mask": [0, 0, 0, 0]})
    got = crop_shares(index, true_boxes).set_index(["split", "box_source"])
    assert got.loc[("train", "mtcnn"), "share"] == 1.0  # a (1.0) and c (0.9) hold the face
    assert got.loc[("train", "person"), "share"] == 0.0
    assert got.loc[("train", "all"), "share"] == pytest.approx(2 / 3)
    assert got.loc[("eval", "all"), "images"] == 1 and got.loc[("eval", "all"), "share"] == 0.0
    with pytest.raises(ValueError, match="no box"):
        crop_shares(index, true_boxes[true_boxes["file"] != "a"])


def test_last_line_format() -> None:
    one = {"oof": 0.5, "heldout": 0.45, "gap": 0.05, "ensemble_heldout": 0.47,
           "submission_heldout": 0.46, "gauge_heldout": 0.5}
    assert last_line(one) == ("quality oof=0.5000 heldout=0.4500 gap=+0.0500 "
                              "ensemble_heldout=0.4700 submission_heldout=0.4600 "
                              "gauge_heldout=0.5000")


def test_bootstrap_resamples_whole_people_and_pairs_the_predictions() -> None:
    """Two people of seven photos: A (class 0) predicted right, B (class 1) predicted as 0.
    Resampling people can only give {A, A} -> 1, {B, B} -> 0 or {A, B} -> (2*7/21 + 0) / 2;
    resampling rows would give many other values."""
    truth = np.array([0] * 7 + [1] * 7)
    pred = np.zeros(14, np.int64)
    people = np.array(["a"] * 7 + ["b"] * 7)
    boot = people_bootstrap(truth, [pred, truth], people, reps=400, seed=1)
    assert set(np.round(boot[:, 0], 6)) == {1.0, 0.0, round(1 / 3, 6)}
    assert (boot[:, 1] == 1.0).all()  # perfect on every resample
    same = people_bootstrap(truth, [pred, pred.copy()], people, reps=50)
    assert (same[:, 0] - same[:, 1] == 0).all()  # paired: the same people in both columns
    lo, hi = interval(boot[:, 0])
    assert lo == 0.0 and hi == 1.0


def test_missing_weights_folder_is_one_line_naming_both_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        check_weights_folder(tmp_path / "nowhere")
    message = str(e.value)
    assert "\n" not in message and "--weights DIR" in message
    assert "$MASK_SEARCH_WEIGHTS" in message and "nowhere" in message
    with pytest.raises(Exception, match="mobilenetv2_100") as e:
        check_weights_folder(tmp_path)  # a folder without the backbones' files
    assert "--weights" in str(e.value)


def test_gauge_is_the_seed_authors_recipe(quality_weights: Path) -> None:
    """The recipe the issue names, field by field, and trial 0 of the quality study."""
    from bench.gauge import gauge_config
    from search.space import warm_start
    from studies import quality

    cfg = gauge_config(quality.GAUGE, quality_weights, epochs=3, device="cpu")
    assert (cfg.loss, cfg.focal_gamma, cfg.class_weights) == ("focal", 2.0, "sqrt_inverse")
    assert (cfg.optimizer, cfg.scheduler, cfg.age_threshold) == ("adam", "cosine", 59)
    assert cfg.pretrained and cfg.pretrained_file.endswith("mobilenetv2_100.safetensors")
    assert cfg.epochs == 3 and cfg.mix == "none" and cfg.aug_strength == 0.5
    assert warm_start(quality, {}) == [quality.GAUGE]


def test_last_line_gap_is_the_median_gap_over_seeds() -> None:
    """Seeds with gaps +0.05, +0.30, +0.05: the median gap is +0.05, while the median OOF (0.4)
    minus the median held-out figure (0.1) would say +0.30."""
    seeds = [{"oof": o, "heldout": h, "gap": o - h, "ensemble_heldout": h,
              "ensemble_oof_in_sample": o, "ensemble_cross_fitted": o, "ensemble_gain": 0.0,
              "best_single_cross_fitted": o, "best_single_rule_heldout": h,
              "submission_heldout": h, "gauge_heldout": h, "submission_minus_gauge": 0.0,
              "best_single": {"f1": h}, "submission": {"f1": h}, "gauge": {"f1": h},
              "trials_finished": 1, "intervals": {"heldout": (h, h)},
              "seconds": {"search": 1.0, "ensemble": 1.0, "gauge": 1.0}}
             for o, h in ((0.5, 0.45), (0.4, 0.1), (0.1, 0.05))]
    assert "gap=+0.0500" in last_line(medians(seeds))


def test_the_equal_time_gauge_climbs_while_minutes_are_left_and_picks_by_oof() -> None:
    from bench.equal_time import choose_rung

    rungs = [{"epochs": 6, "oof": 0.20, "seconds": 100.0},
             {"epochs": 12, "oof": 0.30, "seconds": 200.0},
             {"epochs": 24, "oof": 0.25, "seconds": 400.0}]
    assert choose_rung(rungs, 50) == (rungs[0], 100.0)  # the first rung always runs
    assert choose_rung(rungs, 250) == (rungs[1], 300.0)  # the third starts at 300 > 250
    assert choose_rung(rungs, 301) == (rungs[1], 700.0)  # it starts at 300: OOF prefers 12
    rungs[2]["oof"] = 0.31
    assert choose_rung(rungs, 1e9) == (rungs[2], 700.0)


@pytest.mark.slow
def test_bench_quality_end_to_end(faces_folder: Path, quality_weights: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from bench.quality import main

    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MASK_SEARCH_CACHE", raising=False)
    argv = ["--faces", str(faces_folder), "--people", "8", "--eval-people", "3",
            "--trials", "1", "--epochs", "1", "--folds", "2", "--weights", str(quality_weights)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"quality oof=(\d\.\d{4}) heldout=(\d\.\d{4}) gap=([+-]\d\.\d{4}) "
                     r"ensemble_heldout=(\d\.\d{4}) submission_heldout=(\d\.\d{4}) "
                     r"gauge_heldout=(\d\.\d{4})", last)
    assert m, last
    for label in ("held-out mask F1", "held-out old_classes F1", "face crops holding",
                  "wall s: data", "ensemble: cross-fitted OOF F1",
                  "ensemble: gain held-out over best trial", "submission: held-out macro F1",
                  "gauge (one hand run): held-out macro F1", "95% over eval people: gauge"):
        assert label in out
    root = tmp_path / "runs" / "quality"
    payload = json.loads((root / "quality.json").read_text())
    seed = payload["seeds"][0]
    # the OOF figure is what the study recorded for its best trial
    study = optuna.load_study(study_name="quality",
                              storage=f"sqlite:///{root / 'seed0' / 'study.db'}")
    assert float(m[1]) == pytest.approx(study.best_value, abs=5e-5)
    assert seed["gap"] == pytest.approx(seed["oof"] - seed["heldout"])
    assert seed["submission_heldout"] == seed["submission"]["f1"]
    assert seed["gauge_heldout"] == seed["gauge"]["f1"]
    assert (float(m[5]), float(m[6])) == pytest.approx(
        (seed["submission_heldout"], seed["gauge_heldout"]), abs=5e-5)
    lo, hi = seed["intervals"]["gauge"]
    assert 0 <= lo <= hi <= 1
    # --summarize prints the same last line from the seed's figures.json, without training
    assert main(["--summarize"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    # bench.tta: the best trial's checkpoints without the flip give the held-out figure its
    # saved eval probabilities gave (the quality study trains without TTA)
    from bench.tta import tta_figures

    tta = tta_figures(root / "seed0", next((tmp_path / "runs").glob("quality_data-*")))
    assert not tta["trained_with_tta"] and tta["off"] == pytest.approx(seed["heldout"])
    # trial 0 of the fresh study is the warm-start recipe, the gauge's
    from studies import quality

    assert study.trials[0].params == quality.GAUGE
    assert seed["trials_finished"] == 1 and "WARNING" not in out
    # the submission's held-out F1, recomputed here from its CSV and the answers
    data = next((tmp_path / "runs").glob("quality_data-*"))
    answers = pd.read_csv(data / "eval_answers.csv").set_index("ImageID")["ans"]
    sub = pd.read_csv(root / "seed0" / "submission.csv")
    assert seed["submission"]["f1"] == pytest.approx(
        macro_f1(answers.loc[sub["ImageID"]].to_numpy(), sub["ans"].to_numpy()))
    # every image of the set is counted once per split in the crop table
    crops = pd.DataFrame(payload["crops"])
    everything = crops[crops["box_source"] == "all"].groupby("split")["images"].sum()
    assert everything.to_dict() == {"eval": 3 * 7, "train": 8 * 7}
    assert set(crops.loc[crops["split"] == "eval", "box_source"]) <= {
        "all", *FOUND_SOURCES, "dataset", "center"}
    # bench.final: the best configuration refitted without and with pseudo-labels, both
    # final trials of the study at twice its epochs; a rerun trains nothing again
    from bench.final import main as final_main

    final_argv = ["--pseudo-share", "0.5", "--weights", str(quality_weights)]
    assert final_main(final_argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"final seeds=1 final_gain=[+-]\d\.\d{4} pseudo_gain=[+-]\d\.\d{4} "
                        r"pseudo_old_gain=[+-]\d\.\d{4}", last), last
    figures = json.loads((root / "seed0" / "final.json").read_text())
    url = f"sqlite:///{root / 'seed0' / 'study.db'}"
    study = optuna.load_study(study_name="quality", storage=url)
    final, taught = (study.trials[figures[f"{arm}_trial"]] for arm in ("final", "pseudo"))
    for t in (final, taught):
        assert t.user_attrs["refit_of"] == seed["best_trial"] and t.user_attrs["refit_epochs"] == 2
    assert "pseudo_threshold" not in final.user_attrs
    assert taught.user_attrs["pseudo_threshold"] == figures["pseudo_threshold"] > 0
    # over both folds, at least half of the 21 eval images (3 people x 7) each
    assert len(figures["pseudo_count"]) == 2 and sum(figures["pseudo_count"]) >= 21
    assert figures["scores"]["search"]["f1"] == pytest.approx(seed["heldout"])
    assert figures["scores"]["submission"]["f1"] == pytest.approx(seed["submission"]["f1"])
    n_trials = len(study.trials)
    assert final_main(final_argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    assert len(optuna.load_study(study_name="quality", storage=url).trials) == n_trials
    # bench.equal_time: the recipe's ladder (1, 2, 4 epochs) in a study of its own, the
    # search + final submission, and the rung the ladder's OOF prefers, scored held out
    from bench.equal_time import main as equal_main

    assert equal_main(["--weights", str(quality_weights)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"equal_time seeds=1 search=\d\.\d{4} final=\d\.\d{4} gauge=\d\.\d{4} "
                        r"equal_gauge=\d\.\d{4} final_minus_equal_gauge=[+-]\d\.\d{4}", last), last
    ladder = optuna.load_study(study_name="quality",
                               storage=f"sqlite:///{root / 'equal_time' / 'study.db'}")
    assert [t.params for t in ladder.trials] == [quality.GAUGE] * 3
    assert [t.user_attrs.get("refit_epochs") for t in ladder.trials] == [None, 2, 4]
    record = json.loads((root / "equal_time.json").read_text())
    (figures,) = record["seeds"]
    chosen = ladder.trials[[r["epochs"] for r in record["ladder"]].index(
        figures["equal_gauge_epochs"])]
    from search.artifacts import EVAL, load_array, open_store

    probs = load_array(chosen, open_store(root / "equal_time" / "artifacts"), EVAL)
    truth = answers.loc[sub["ImageID"]].to_numpy()
    assert figures["scores"]["equal_gauge"]["f1"] == pytest.approx(
        macro_f1(truth, probs.argmax(axis=1)))
    after = pd.read_csv(root / "seed0" / "submission_final.csv")
    assert figures["scores"]["final"]["f1"] == pytest.approx(
        macro_f1(answers.loc[after["ImageID"]].to_numpy(), after["ans"].to_numpy()))
    assert figures["scores"]["search"]["f1"] == pytest.approx(seed["submission"]["f1"])
    assert equal_main(["--weights", str(quality_weights)]) == 0  # a rerun trains nothing
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    assert len(optuna.load_study(study_name="quality", storage=url).trials) == n_trials


@pytest.mark.slow
def test_bench_search_races_on_real_faces_with_a_group_arm(
        faces_folder: Path, quality_weights: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``bench.search --faces``: the quality study's data and space, and a ``+group`` arm."""
    from bench.search import main
    from studies import quality

    data = quality.ensure_data(tmp_path, faces_folder, people=13, eval_people=3)
    main(["--faces", "--data", str(data), "--trials", "2", "--seeds", "1", "--epochs", "1",
          "--arms", "median,median+group", "--weights", str(quality_weights)])
    out = capsys.readouterr().out
    assert out.startswith("seed 0 none")
    assert "quality study, 2 trials" in out and "91 training images" in out
    assert re.search(r"^median\+group +1\.00", out, re.M)  # 2 trials: nothing to prune yet
    assert out.strip().splitlines()[-1].startswith("search epochs_ratio=1.00 best_gap=+0.0000")
    with pytest.raises(SystemExit, match="'median\\+grup' is not PRUNER or PRUNER\\+group"):
        main(["--faces", "--data", str(data), "--trials", "1", "--seeds", "1",
              "--arms", "median+grup", "--weights", str(quality_weights)])


def test_a_cached_gauge_is_trained_again_when_the_crops_change(tmp_path: Path,
                                                               monkeypatch) -> None:
    """A gauge kept from before the default face settings changed (say a new YuNet margin) is
    trained again, not reused as if it had seen today's crops."""
    import bench.gauge as gauge
    from core.faces import FaceSettings

    trained = []

    def fake_run(data_dir, weights, epochs, device, params, seed=0, faces=None, pseudo=None):
        trained.append(faces)
        return {"eval_probs": np.zeros((2, 18), np.float32), "val_f1": [0.1], "seconds": 1.0}

    monkeypatch.setattr(gauge, "run_gauge", fake_run)
    path = tmp_path / "gauge.npz"
    assert not gauge.cached_gauge(path, tmp_path, tmp_path, 1, "cpu", 0)["reused"]
    assert gauge.cached_gauge(path, tmp_path, tmp_path, 1, "cpu", 0)["reused"]
    monkeypatch.setattr("studies.face_settings", lambda study: FaceSettings(yunet_margin=0.3))
    assert not gauge.cached_gauge(path, tmp_path, tmp_path, 1, "cpu", 0)["reused"]
    assert len(trained) == 2
