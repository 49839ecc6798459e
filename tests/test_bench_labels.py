"""bench.labels: planted label errors scored against the finder's ranking, and its end to end run
(a noisy real-face set, search, search.labels, the reviewed rerun)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from bench.labels import plant, score
from core.dataset import load_train_table
from core.labels import SWAPPED_STEMS, age_group
from search.labels import find_suspects
from tests.test_suspects import confident


def test_score_counts_hits_against_the_truth_by_hand() -> None:
    ranked = pd.DataFrame({"target": ["a", "b", "c", "d", "e"],
                           "field": ["gender", "age", "gender", "mask_swap", "age"]})
    truth = pd.DataFrame({"target": ["c", "a", "e"], "field": ["gender", "gender", "mask_swap"]})
    # top K = 3: a, b, c (2 planted); top 2K = all 5 rows (2 planted); e's mask_swap never ranked
    assert score(ranked, truth) == {"planted": 3, "precision_topk": pytest.approx(2 / 3),
                                    "precision_top2k": pytest.approx(2 / 5),
                                    "recall_gender": 1.0, "recall_mask_swap": 0.0}


def test_a_model_that_knows_the_truth_puts_every_planted_error_first(synth_data: Path) -> None:
    clean = load_train_table(synth_data)
    probs = confident(clean["label"].to_numpy())
    noisy, truth = plant(clean, 0.05, np.random.default_rng(3))  # 40 people: 2 per kind
    assert truth["field"].value_counts().to_dict() == {"gender": 2, "age": 2, "mask_swap": 2}
    assert truth["target"].is_unique  # one error per person
    # each planted person differs from the clean table exactly as its kind says, nobody else
    changed = clean.index[(clean[["gender", "age", "mask"]] != noisy[["gender", "age", "mask"]])
                          .any(axis=1)]
    assert set(clean.loc[changed, "person"]) == set(truth["target"])
    for person, field in truth[["target", "field"]].itertuples(index=False):
        rows = clean["person"] == person
        was, now = clean[rows], noisy[rows]
        if field == "gender":
            assert (now["gender"] == 1 - was["gender"]).all()
        elif field == "age":
            assert (age_group(now["age"].to_numpy()) != age_group(was["age"].to_numpy())).all()
        else:
            by_stem = now.set_index("stem")["mask"], was.set_index("stem")["mask"]
            a, b = SWAPPED_STEMS
            assert (by_stem[0][a], by_stem[0][b]) == (by_stem[1][b], by_stem[1][a])
    figures = score(find_suspects(noisy, probs), truth)
    assert figures == {"planted": 6, "precision_topk": 1.0, "precision_top2k": 0.5,
                       "recall_age": 1.0, "recall_gender": 1.0, "recall_mask_swap": 1.0}


@pytest.mark.slow
def test_bench_labels_end_to_end_with_the_reviewed_rerun(
        faces_folder: Path, quality_weights: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.labels import main

    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("MASK_SEARCH_CACHE", raising=False)
    argv = ["--faces", str(faces_folder), "--people", "8", "--eval-people", "3", "--trials", "1",
            "--epochs", "1", "--folds", "2", "--weights", str(quality_weights), "--rerun"]
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"labels precision_topk=\d\.\d{4} precision_top2k=\d\.\d{4} "
                        r"recall_age=\d\.\d{4} recall_gender=\d\.\d{4} recall_mask_swap=\d\.\d{4} "
                        r"heldout_noisy=\d\.\d{4} heldout_corrected=\d\.\d{4} "
                        r"corrected_gain=[+-]\d\.\d{4}", last), last
    runs = tmp_path / "runs"
    data = next(runs.glob("quality_data-8x3-*-noise0.0125-*"))
    truth = pd.read_csv(data / "planted_errors.csv", dtype=str)
    assert len(truth) == 3  # 8 people: one of each kind
    seed = runs / "labels" / "seed0"
    suspects = pd.read_csv(seed / "noisy" / "suspects.csv", dtype=str, keep_default_na=False)
    assert (suspects["status"] != "applied").sum() <= 2 * len(truth)  # --top 2K
    # the reviewed file: the study's own corrections, then only suspects that were planted,
    # with the planted truth's value; the rerun's study applied exactly that file
    reviewed = pd.read_csv(seed / "corrected" / "reviewed.csv", dtype=str)
    own = pd.read_csv(data / "corrections.csv", dtype=str)
    assert reviewed.head(len(own)).equals(own)
    kept = reviewed.iloc[len(own):].merge(truth, on=["target", "field", "value"])
    assert len(kept) == len(reviewed) - len(own)
    study = optuna.load_study(study_name="quality",
                              storage=f"sqlite:///{seed / 'corrected' / 'study.db'}")
    assert Path(study.user_attrs["corrections"]) == seed / "corrected" / "reviewed.csv"
    figures = json.loads((seed / "figures.json").read_text())
    assert figures["corrected_gain"] == pytest.approx(
        figures["heldout_corrected"] - figures["heldout_noisy"])
