"""core.synth with real faces: the layout from a faces folder, read back by hand and by the
loaders of core.dataset.

The faces folder is written by the test (``conftest.write_faces_folder``: the astronaut photo,
cropped 16 ways), never ``../shared``. Independent facts checked: the pasted square in
``true_boxes.csv`` is where the source photo is (normalized correlation with the photo), so the
source photo of every unmasked image can be identified, and with it the person's gender and age
from faces.csv; a drawn mask changes the lower face and leaves the eyes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.dataset import load_eval_table, load_train_table
from core.errors import DataError
from core.labels import GENDER_CODES, IMAGE_STEMS, NUM_AGE, age_group, decode
from core.synth import main
from core.synth_faces import choose_people, generate, read_faces
from tests.test_synth import all_files, image_files, read_csv

PEOPLE, EVAL_PEOPLE = 10, 4


@pytest.fixture(scope="module")
def real(faces_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("real") / "data", faces_folder, people=PEOPLE,
                    eval_people=EVAL_PEOPLE, seed=0)


def _boxes(root: Path) -> dict[str, dict[str, str]]:
    _, rows = read_csv(root / "true_boxes.csv")
    return {r["file"]: r for r in rows}


def _norm(img: Image.Image) -> np.ndarray:
    """Centre of a face, gray, 64x64, zero mean and unit variance (for correlation)."""
    a = np.asarray(img.convert("L").resize((64, 64)), np.float32)[13:51, 13:51]
    return (a - a.mean()) / a.std()


def _crop(root: Path, row: dict[str, str]) -> Image.Image:
    with Image.open(root / row["file"]) as im:
        return im.convert("RGB").crop(tuple(int(row[k]) for k in ("x1", "y1", "x2", "y2")))


def _source(root: Path, row: dict[str, str], faces: Path) -> tuple[str, float, float]:
    """(best matching photo, its correlation, the runner-up's) for an image's true box."""
    crop = _norm(_crop(root, row))
    scores = sorted(((float((crop * _norm(Image.open(p))).mean()), p.name)
                     for p in (faces / "photos").iterdir()), reverse=True)
    return scores[0][1], scores[0][0], scores[1][0]


def test_layout_reads_back_like_the_synthetic_one(real: Path) -> None:
    corrections = real / "corrections.csv"
    table = load_train_table(real, corrections)
    assert table["person"].nunique() == PEOPLE and len(table) == 7 * PEOPLE
    assert table.attrs["corrections_applied"] == 4 and table.attrs["skipped_files"] > 0
    assert len(load_eval_table(real)) == 7 * EVAL_PEOPLE
    suffixes = set()
    for folder in (real / "train" / "images").iterdir():
        files = image_files(folder)
        assert sorted(p.stem for p in files) == sorted(IMAGE_STEMS)
        for p in files:
            suffixes.add(p.suffix)
            with Image.open(p) as im:
                assert (im.format, im.mode, im.size) == (
                    "PNG" if p.suffix == ".png" else "JPEG", "RGB", (384, 512))
    assert suffixes == {".jpg", ".jpeg", ".png"}
    for p in (real / "eval" / "images").iterdir():
        with Image.open(p) as im:
            assert im.size == (384, 512)


def test_answers_and_true_boxes_sit_outside_train_and_eval(real: Path) -> None:
    assert sorted(p.name for p in real.iterdir()) == [
        "corrections.csv", "eval", "eval_answers.csv", "eval_people.csv", "train",
        "true_boxes.csv"]
    for sub in ("train", "eval"):
        names = {p.name for p in (real / sub).rglob("*")}
        assert not names & {"true_boxes.csv", "eval_answers.csv"}
    boxes = _boxes(real)
    table = load_train_table(real, real / "corrections.csv")
    ev = load_eval_table(real)
    assert set(boxes) == set(table["file"]) | set(ev["file"])
    for r in boxes.values():
        x1, y1, x2, y2 = (int(r[k]) for k in ("x1", "y1", "x2", "y2"))
        assert 0 <= x1 < x2 <= 384 and 0 <= y1 < y2 <= 512 and x2 - x1 == y2 - y1
    # the mask drawn is the corrected label (the planted swap is in the pixels, fixed by CSV)
    assert [int(boxes[f]["mask"]) for f in table["file"]] == table["mask"].tolist()
    _, answers = read_csv(real / "eval_answers.csv")
    drawn = [int(boxes[f"eval/images/{a['ImageID']}"]["mask"]) for a in answers]
    assert drawn == decode(np.array([int(a["ans"]) for a in answers]))[0].tolist()


def test_faces_are_pasted_in_the_true_box_with_faces_csv_labels(real: Path,
                                                                faces_folder: Path) -> None:
    """Every unmasked photo's true box holds one source photo; labels follow faces.csv."""
    faces = pd.read_csv(faces_folder / "faces.csv").set_index("file")
    boxes = _boxes(real)
    table = load_train_table(real, real / "corrections.csv")
    train_photos = set()
    for file, person in zip(table["file"], table["person"], strict=True):
        if boxes[file]["mask"] != "2":
            continue
        photo, best, second = _source(real, boxes[file], faces_folder)
        assert best > 0.97 and second < best - 0.05, (file, best, second)
        row = table[table["file"] == file].iloc[0]
        assert (GENDER_CODES[faces.loc[photo, "gender"]], faces.loc[photo, "age"]) == (
            row["gender"], row["age"]), person
        train_photos.add(photo)
    assert len(train_photos) == PEOPLE
    eval_photos = {_source(real, r, faces_folder)[0] for f, r in boxes.items()
                   if f.startswith("eval/") and r["mask"] == "2"}
    assert len(eval_photos) == EVAL_PEOPLE and not eval_photos & train_photos


def test_masks_cover_the_lower_face_only(real: Path, faces_folder: Path) -> None:
    """Against the unmasked photo of the same person: a worn mask changes the mouth and chin
    a lot and the eyes hardly; an incorrect one changes less of the nose area than a worn one."""
    table = load_train_table(real, real / "corrections.csv")
    boxes = _boxes(real)
    lower, upper, nose = {0: [], 1: []}, {0: [], 1: []}, {0: [], 1: []}
    for _, rows in table.groupby("person"):
        by_mask = {m: rows[rows["mask"] == m]["file"].tolist() for m in range(3)}
        ref = np.asarray(_crop(real, boxes[by_mask[2][0]]).resize((100, 100)), np.float32)
        for m in (0, 1):
            for f in by_mask[m]:
                a = np.asarray(_crop(real, boxes[f]).resize((100, 100)), np.float32)
                diff = np.abs(a - ref).mean(axis=2)
                upper[m].append(diff[15:35, 20:80].mean())
                nose[m].append(diff[45:58, 35:65].mean())
                lower[m].append(diff[70:90, 25:75].mean())
    assert np.median(lower[0]) > 3 * np.median(upper[0]), (lower[0], upper[0])
    assert np.median(nose[0]) > np.median(nose[1])


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_out_path(real: Path, faces_folder: Path,
                                                    tmp_path: Path) -> None:
    again = generate(tmp_path / "x" / "elsewhere", faces_folder, people=PEOPLE,
                     eval_people=EVAL_PEOPLE, seed=0)
    first, second = all_files(real), all_files(again)
    assert list(first) == list(second)
    assert [k for k in first if first[k] != second[k]] == []
    other = all_files(generate(tmp_path / "other", faces_folder, people=PEOPLE,
                               eval_people=EVAL_PEOPLE, seed=1, size=(128, 96)))
    assert other["train/train.csv"] != first["train/train.csv"]


def test_split_is_stratified_and_disjoint() -> None:
    """On a folder shaped like the shared one (61% female, 7% aged 60), both parts keep each
    gender x age group's share within one person."""
    rng = np.random.default_rng(0)
    n = 1500
    gender = (rng.random(n) < 0.61).astype(int)
    age = np.where(rng.random(n) < 0.07, 60, rng.integers(18, 60, n))
    faces = pd.DataFrame({"file": [f"f{i}.jpg" for i in range(n)], "gender": gender, "age": age})
    train, ev = choose_people(faces, 900, 300, seed=0)
    assert len(train) == 900 and len(ev) == 300 and not set(train) & set(ev)
    strata = gender * NUM_AGE + age_group(age)
    for part, size in ((train, 900), (ev, 300)):
        want = np.bincount(strata, minlength=6) / n * size
        assert np.all(np.abs(np.bincount(strata[part], minlength=6) - want) <= 1)


def _broken(faces_folder: Path, tmp_path: Path, csv_text: str | None) -> Path:
    root = Path(shutil.copytree(faces_folder, tmp_path / "faces"))
    if csv_text is None:
        (root / "faces.csv").unlink()
    else:
        (root / "faces.csv").write_text(csv_text)
    return root


@pytest.mark.parametrize(("text", "message"), [
    (None, r"faces\.csv: file not found"),
    ("", r"faces\.csv: file is empty"),
    ("file,gender\nface00000.jpg,male\n", r"faces\.csv: missing column\(s\) age"),
    ("file,gender,age\nface00000.jpg,man,30\n", r"faces\.csv line 2: 'gender'"),
    ("file,gender,age\nface00000.jpg,male,thirty\n", r"faces\.csv line 2: 'age'"),
    ("file,gender,age\nface00000.jpg,male,30\nnope.jpg,female,40\n",
     r"faces\.csv line 3: photo 'nope\.jpg' not found"),
    ("file,gender,age\nface00000.jpg,male,30\nface00000.jpg,male,30\n",
     r"faces\.csv line 3: photo 'face00000\.jpg' is listed twice"),
])
def test_bad_faces_csv_is_one_clear_error(faces_folder: Path, tmp_path: Path,
                                          text: str | None, message: str) -> None:
    root = _broken(faces_folder, tmp_path, text)
    with pytest.raises(DataError, match=message):
        read_faces(root)
    with pytest.raises(DataError, match=message):
        generate(tmp_path / "out", root, people=6, eval_people=1)
    assert not (tmp_path / "out").exists()


def test_cli_with_faces(faces_folder: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--faces", str(faces_folder), "--out", str(out), "--people", "6",
            "--eval-people", "2", "--seed", "3", "--height", "128", "--width", "96"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(next((out / "eval" / "images").iterdir())) as im:
        assert im.size == (96, 128)
    assert all_files(out) == all_files(generate(tmp_path / "api", faces_folder, 6, 2, 3,
                                                (128, 96)))
    too_many = ["--faces", str(faces_folder), "--out", str(tmp_path / "big"), "--people", "20"]
    assert main(too_many) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "faces folder has 16" in err and "\n" not in err
    root = _broken(faces_folder, tmp_path, None)
    assert main(["--faces", str(root), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "faces.csv: file not found" in err and "\n" not in err
