"""search.labels ranks suspected label errors per person; core.synth plants errors to find.

Studies are made without training (``tests.test_ensemble.StudyMaker``): OOF probabilities are
written from the labels, confident and right, then contradicted on chosen photos.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from core.dataset import (
    MASK_SWAP_VALUE,
    apply_corrections,
    load_train_table,
    read_corrections,
)
from core.labels import GENDER_NAMES, NUM_CLASSES, SWAPPED_STEMS, decode, encode
from search.labels import FLAGGED, main
from tests.test_ensemble import StudyMaker


@pytest.fixture(autouse=True)
def _runs_and_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


@pytest.fixture
def maker(tmp_path, synth_data) -> StudyMaker:
    return StudyMaker(tmp_path, synth_data)


def confident(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """OOF probabilities right on every photo (0.8 plus noise on the label)."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 0.02, (len(labels), NUM_CLASSES))
    p[np.arange(len(labels)), labels] += 0.8 + rng.uniform(0, 0.15, len(labels))
    return p / p.sum(axis=1, keepdims=True)


def contradict(p: np.ndarray, rows: np.ndarray, *, gender: bool = False,
               swap_mask: bool = False) -> np.ndarray:
    """``p`` with the mass of ``rows`` moved to the class of the other gender and/or with mask
    states 1 and 2 exchanged."""
    m, g, a = decode(np.arange(NUM_CLASSES))
    if gender:
        g = 1 - g
    if swap_mask:
        m = np.where(m == 1, 2, np.where(m == 2, 1, m))
    to = np.asarray(encode(m, g, a))
    out = p.copy()
    out[np.ix_(rows, to)] = p[rows]
    return out


def person_rows(maker: StudyMaker, k: int) -> tuple[str, np.ndarray]:
    """The k-th person folder of the study's table and its rows."""
    table = load_train_table(maker.study.user_attrs["data_dir"])
    folder = sorted(table["person"].unique())[k]
    return folder, np.flatnonzero(table["person"].to_numpy() == folder)


def run(maker: StudyMaker, *extra: str) -> list[dict[str, str]]:
    out = maker.art.parent / "labels" / "suspects.csv"
    assert main(["--study", "t", "--storage", maker.storage, "--artifacts", str(maker.art),
                 "--out", str(out), *extra]) == 0
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_a_person_contradicted_on_all_seven_photos_comes_first(maker, synth_data, capsys):
    folder, rows = person_rows(maker, 5)
    given = int(load_train_table(synth_data).loc[rows[0], "gender"])
    maker.add(contradict(confident(maker.labels), rows, gender=True), None)
    suspects = run(maker)
    first = suspects[0]
    assert (first["target"], first["field"], first["value"]) == (
        folder, "gender", GENDER_NAMES[1 - given])
    assert (first["given"], first["status"]) == (GENDER_NAMES[given], FLAGGED)
    assert len(suspects) == 1  # no one else is flagged
    assert len(first["photos"].split(";")) == 7
    assert all(Path(synth_data, p).is_file() for p in first["photos"].split(";"))
    # the file is a corrections file: applied, it gives the person back the other gender
    fixed = apply_corrections(load_train_table(synth_data), maker.art.parent / "labels" /
                              "suspects.csv")
    assert (fixed.loc[rows, "gender"] == 1 - given).all()
    assert "wrote" in capsys.readouterr().out


def test_one_contradicted_photo_ranks_below_seven(maker):
    folder7, rows7 = person_rows(maker, 3)
    folder1, rows1 = person_rows(maker, 11)
    p = contradict(confident(maker.labels), rows7, gender=True)
    maker.add(contradict(p, rows1[:1], gender=True), None)
    gender = [r["target"] for r in run(maker, "--top", "1000") if r["field"] == "gender"]
    assert gender[0] == folder7
    assert gender.index(folder1) > gender.index(folder7)


def test_a_swap_in_the_probabilities_is_found_as_a_swap(maker, synth_data):
    folder, rows = person_rows(maker, 8)
    table = load_train_table(synth_data)
    pair = rows[table.loc[rows, "stem"].isin(SWAPPED_STEMS).to_numpy()]
    maker.add(contradict(confident(maker.labels), pair, swap_mask=True), None)
    suspects = run(maker)
    assert [(r["target"], r["field"], r["value"], r["status"]) for r in suspects][0] == (
        folder, "mask_swap", MASK_SWAP_VALUE, FLAGGED)
    assert sorted(Path(p).stem for p in suspects[0]["photos"].split(";")) == sorted(SWAPPED_STEMS)


def test_the_studys_own_corrections_lead_the_file(maker, synth_data, tmp_path):
    """So the reviewed file alone is the next study's corrections (they apply in order)."""
    folder, rows = person_rows(maker, 5)
    table = load_train_table(synth_data)
    same = GENDER_NAMES[int(table.loc[rows[0], "gender"])]  # a no-op: the data stay the same
    own = tmp_path / "own.csv"
    own.write_text(f"target,field,value\n{folder},gender,{same}\n")
    maker.study.set_user_attr("corrections", str(own))
    maker.add(contradict(confident(maker.labels), rows, gender=True), None)
    suspects = run(maker)
    assert [(r["target"], r["field"], r["status"]) for r in suspects] == [
        (folder, "gender", "applied"), (folder, "gender", FLAGGED)]
    fixes = read_corrections(maker.art.parent / "labels" / "suspects.csv")
    assert [c.value for c in fixes] == [same, GENDER_NAMES[1 - GENDER_NAMES.index(same)]]


def test_the_submission_members_are_read_with_their_weights(maker):
    """submission.json names the worse trial: its contradiction is what is found."""
    folder, rows = person_rows(maker, 2)
    clean = confident(maker.labels)
    maker.add(clean, None)
    maker.add(contradict(clean, rows, gender=True), None)
    assert maker.study.best_trial.number == 0
    assert not [r for r in run(maker) if r["target"] == folder]  # the best trial: no suspect
    runs = Path(maker.art.parent / "runs" / "t")
    runs.mkdir(parents=True)
    (runs / "submission.json").write_text(json.dumps(
        {"members": [{"trial": 1, "weight": 1.0}, {"trial": 0, "weight": 0.0}]}))
    assert run(maker)[0]["target"] == folder


def test_the_review_page_shows_each_suspects_photos(maker):
    _, rows = person_rows(maker, 5)
    maker.add(contradict(confident(maker.labels), rows, gender=True), None)
    suspects = run(maker, "--top", "3")
    text = (maker.art.parent / "labels" / "suspects.html").read_text()
    assert text.count('class="card ') == len(suspects) == 3
    photos = sum(len(r["photos"].split(";")) for r in suspects)
    assert len(re.findall(r'src="data:image/jpeg;base64,', text)) == photos
    assert "<script" not in text and not re.search(r'(src|href)="(?!data:)', text)


def test_a_study_without_a_complete_trial_is_one_line_and_exit_2(maker, capsys):
    maker.study.tell(maker.study.ask(), state=optuna.trial.TrialState.PRUNED)
    out = maker.art.parent / "labels" / "suspects.csv"
    assert main(["--study", "t", "--storage", maker.storage, "--artifacts", str(maker.art),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "no complete trial" in err
    assert not out.exists()


# ----------------------------------------------------------------------------- planted errors


def test_label_noise_plants_the_count_asked_and_its_truth_is_what_changed(tmp_path):
    from core.synth import generate
    from tests.test_synth import all_files, read_csv

    size = (32, 24)
    clean = generate(tmp_path / "clean", people=30, eval_people=1, seed=2, size=size)
    noisy = generate(tmp_path / "noisy", people=30, eval_people=1, seed=2, size=size,
                     label_noise=0.1)
    _, truth = read_csv(noisy / "planted_errors.csv")
    assert pd.Series([t["field"] for t in truth]).value_counts().to_dict() == {
        "gender": 3, "age": 3, "mask_swap": 3}
    assert len({t["target"] for t in truth}) == 9  # one error per person
    _, before = read_csv(clean / "train" / "train.csv")
    _, after = read_csv(noisy / "train" / "train.csv")
    planted = {t["target"]: t for t in truth}
    by_path, by_id = {r["path"]: r for r in before}, {r["id"]: r for r in before}
    folder_of = {}  # noisy folder -> clean one (a planted person's id is not shared)
    for r in after:
        t = planted.get(r["path"])
        was = by_path[r["path"]] if t is None else by_id[r["id"]]
        folder_of[r["path"]] = was["path"]
        if t is None or t["field"] == "mask_swap":
            assert r == was
        elif t["field"] == "gender":
            assert (r["gender"], was["gender"]) == (t["written"], t["value"])
            assert r["age"] == was["age"]
        else:
            assert (r["age"], was["age"]) == (t["written"], t["value"])
            assert (int(r["age"]) < 30, int(r["age"]) < 60) != (int(was["age"]) < 30,
                                                                 int(was["age"]) < 60)
            assert r["gender"] == was["gender"]
    swapped = {t["target"] for t in truth if t["field"] == "mask_swap"}
    a, b = all_files(clean), all_files(noisy)
    changed = set()
    for name, data in b.items():
        parts = name.split("/")
        if parts[:2] == ["train", "images"]:
            parts[2] = folder_of[parts[2]]
        if a.get("/".join(parts)) != data:
            changed.add(name)
    swap_photos = {f"train/images/{f}/{s}" for f in swapped for s in SWAPPED_STEMS}
    assert {n.rsplit(".", 1)[0] for n in changed - {"train/train.csv", "planted_errors.csv"}} \
        == swap_photos
    assert len(b) == len(a) + 1 and "planted_errors.csv" in changed


def test_label_noise_refusals(tmp_path):
    from core.synth import generate

    with pytest.raises(ValueError, match="label_noise"):
        generate(tmp_path / "a", people=6, size=(32, 24), label_noise=0.5)
    with pytest.raises(ValueError, match="needs 9 people"):
        generate(tmp_path / "b", people=10, size=(32, 24), label_noise=0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no temp folders left"
