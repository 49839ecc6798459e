"""core.synth writes the competition layout other modules parse; these tests read it by hand.

They check the layout file by file, determinism of every byte, the requested balance, the
planted traps (junk, a ``-1`` id, a shared id, label errors with matching corrections) and
that the eval answers cover info.csv. No core.dataset here: its tests read the same output.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.labels import GENDER_CODES, IMAGE_STEMS, MASK_BY_STEM, NUM_CLASSES, decode
from core.synth import MASK_COLORS, generate, main

SIZE = (64, 48)  # (height, width)
FOLDER = re.compile(r"^(?P<id>\d{6}(-\d)?)_(?P<gender>male|female)_(?P<race>\w+)_(?P<age>\d+)$")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def image_files(folder: Path) -> list[Path]:
    """The 7 images of a person folder: junk (hidden names) left out, as a reader must."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small") / "data", people=12, eval_people=3, seed=1,
                    size=SIZE)


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough people for shares to be meaningful; tiny images keep it to seconds."""
    return generate(tmp_path_factory.mktemp("large") / "data", people=150, eval_people=20,
                    seed=3, size=SIZE, progress=False)


def test_layout_matches_the_competition(small: Path) -> None:
    assert sorted(p.name for p in small.iterdir()) == [
        "corrections.csv", "eval", "eval_answers.csv", "eval_people.csv", "train"]
    cols, rows = read_csv(small / "train" / "train.csv")
    assert cols == ["id", "gender", "race", "age", "path"]
    assert len(rows) == 12
    folders = sorted(p.name for p in (small / "train" / "images").iterdir())
    assert folders == sorted(r["path"] for r in rows)
    suffixes = set()
    for r in rows:
        m = FOLDER.match(r["path"])
        assert m, r["path"]
        assert (m["id"], m["gender"], m["race"], m["age"]) == (
            r["id"], r["gender"], r["race"], r["age"])
        assert 18 <= int(r["age"]) <= 60
        files = image_files(small / "train" / "images" / r["path"])
        assert sorted(p.stem for p in files) == sorted(IMAGE_STEMS)
        for p in files:
            suffixes.add(p.suffix)
            with Image.open(p) as im:
                assert im.format == ("PNG" if p.suffix == ".png" else "JPEG")
                assert (im.mode, im.size) == ("RGB", (SIZE[1], SIZE[0]))
    assert suffixes == {".jpg", ".jpeg", ".png"}

    cols, info = read_csv(small / "eval" / "info.csv")
    assert cols == ["ImageID", "ans"]
    assert len(info) == 3 * 7 and all(r["ans"] == "" for r in info)
    assert sorted(p.name for p in (small / "eval" / "images").iterdir()) == sorted(
        r["ImageID"] for r in info)
    for r in info:
        assert re.fullmatch(r"[0-9a-f]{40}\.jpg", r["ImageID"])
        with Image.open(small / "eval" / "images" / r["ImageID"]) as im:
            assert (im.format, im.size) == ("JPEG", (SIZE[1], SIZE[0]))


def test_eval_answers_cover_info_in_order(small: Path) -> None:
    _, info = read_csv(small / "eval" / "info.csv")
    cols, answers = read_csv(small / "eval_answers.csv")
    assert cols == ["ImageID", "ans"]
    assert [a["ImageID"] for a in answers] == [r["ImageID"] for r in info]
    classes = np.array([int(a["ans"]) for a in answers])
    assert ((0 <= classes) & (classes < NUM_CLASSES)).all()
    mask, _, _ = decode(classes)
    assert np.bincount(mask, minlength=3).tolist() == [5 * 3, 3, 3]


def test_eval_people_group_each_persons_seven_photos(small: Path) -> None:
    """The bootstrap over eval people relies on it: one person = 7 photos, one gender and age,
    the competition's mask states (5 worn, 1 incorrect, 1 not worn)."""
    _, answers = read_csv(small / "eval_answers.csv")
    cols, people = read_csv(small / "eval_people.csv")
    assert cols == ["ImageID", "person"]
    assert [p["ImageID"] for p in people] == [a["ImageID"] for a in answers]
    by_person: dict[str, list[int]] = {}
    for p, a in zip(people, answers, strict=True):
        by_person.setdefault(p["person"], []).append(int(a["ans"]))
    assert len(by_person) == 3
    for classes in by_person.values():
        mask, gender, age = decode(np.array(classes))
        assert len(set(gender)) == 1 and len(set(age)) == 1
        assert np.bincount(mask, minlength=3).tolist() == [5, 1, 1]


def test_traps_of_the_real_set_are_present(small: Path) -> None:
    _, rows = read_csv(small / "train" / "train.csv")
    ids = Counter(r["id"] for r in rows)
    assert any(re.fullmatch(r"\d{6}-1", i) for i in ids), "an id with a -1 suffix"
    shared = [i for i, n in ids.items() if n == 2]
    assert len(shared) == 1, "one id used by two different people (two folders)"
    images = small / "train" / "images"
    assert list(images.glob("*/._mask1.jpg")), "macOS AppleDouble junk"
    assert list(images.glob("*/.DS_Store"))
    for junk in images.glob("*/._*"):
        with pytest.raises(OSError):
            Image.open(junk)


def test_corrections_fix_planted_label_errors(small: Path) -> None:
    cols, fixes = read_csv(small / "corrections.csv")
    assert cols == ["target", "field", "value"]
    _, rows = read_csv(small / "train" / "train.csv")
    by_folder = {r["path"]: r for r in rows}
    by_id: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    fields = Counter(f["field"] for f in fixes)
    assert fields == {"gender": 2, "mask_swap": 1, "age": 1}
    for f in fixes:
        # a target names one folder, or an id held by exactly one folder
        people = [by_folder[f["target"]]] if f["target"] in by_folder else by_id[f["target"]]
        assert len(people) == 1, f
        written = people[0]
        if f["field"] == "gender":
            assert f["value"] in GENDER_CODES and f["value"] != written["gender"]
        elif f["field"] == "age":
            assert 18 <= int(f["value"]) <= 60 and f["value"] != written["age"]
        else:
            assert f["value"] == "incorrect_mask:normal"
    genders = {f["value"] for f in fixes if f["field"] == "gender"}
    assert genders == {"male", "female"}, "one error each way keeps the female share"


def test_same_seed_same_bytes_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", people=12, eval_people=3, seed=1, size=SIZE)
    first, second = all_files(small), all_files(again)
    assert list(first) == list(second)
    assert [k for k in first if first[k] != second[k]] == []
    other = all_files(generate(tmp_path / "other", people=12, eval_people=3, seed=2, size=SIZE))
    assert other["train/train.csv"] != first["train/train.csv"]
    assert other["eval_answers.csv"] != first["eval_answers.csv"]


def test_balance_as_in_the_real_set(large: Path) -> None:
    _, rows = read_csv(large / "train" / "train.csv")
    gender = np.array([r["gender"] == "female" for r in rows])
    age = np.array([int(r["age"]) for r in rows])
    assert abs(gender.mean() - 0.61) < 0.02
    assert abs((age == 60).mean() - 0.07) < 0.02
    assert age.min() >= 18 and age.max() == 60
    assert 0.40 < (age < 30).mean() < 0.55, "many young people"
    assert 0.25 < ((age >= 50) & (age < 60)).mean() < 0.40, "many in their 50s"
    assert len(set(age[age < 60].tolist())) > 30, "ages spread continuously"
    for g in (0, 1):  # the rare >=60 group exists for both genders
        assert ((age == 60) & (gender == g)).any()
    stems = Counter(p.stem for p in (large / "train" / "images").glob("*/*")
                    if not p.name.startswith("."))
    kinds = Counter()
    for stem, n in stems.items():
        kinds[MASK_BY_STEM[stem]] += n
    assert [kinds[k] for k in range(3)] == [5 * 150, 150, 150]
    _, answers = read_csv(large / "eval_answers.csv")
    _, eg, ea = decode(np.array([int(a["ans"]) for a in answers]))
    assert abs(eg.mean() - 0.61) < 0.05 and (ea == 2).any()


def test_age_cue_is_continuous(large: Path) -> None:
    """Gray hair grows smoothly with age: the brightest top-of-head pixels track age."""
    _, rows = read_csv(large / "train" / "train.csv")
    age, gray = [], []
    for r in rows:
        with Image.open(large / "train" / "images" / r["path"] / f"normal{_ext(large, r)}") as im:
            px = np.asarray(im.convert("RGB"), np.float32)
        # hair is the low-saturation region near the top of the head; take its brightness
        sat = px.max(axis=2) - px.min(axis=2)
        top = px[: px.shape[0] // 2].mean(axis=2)[sat[: px.shape[0] // 2] < 25]
        age.append(int(r["age"]))
        gray.append(np.percentile(top, 75) if top.size else 0.0)
    assert np.corrcoef(age, gray)[0, 1] > 0.5


def _ext(root: Path, row: dict[str, str]) -> str:
    return next((root / "train" / "images" / row["path"]).glob("normal.*")).suffix


def test_refuses_bad_arguments_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="people must be >= 6"):
        generate(tmp_path / "a", people=3, size=SIZE)
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path / "a", people=6, size=(8, 8))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(foreign, people=6, eval_people=1, size=SIZE)
    with pytest.raises(FileExistsError, match="does not look like"):
        generate(foreign, people=6, eval_people=1, size=SIZE, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"], "no temp folders left"


def test_overwrite_replaces_an_earlier_set(tmp_path: Path) -> None:
    out = generate(tmp_path / "d", people=6, eval_people=1, seed=0, size=SIZE)
    before = all_files(out)
    generate(out, people=7, eval_people=1, seed=0, size=SIZE, overwrite=True)
    _, rows = read_csv(out / "train" / "train.csv")
    assert len(rows) == 7 and all_files(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--people", "6", "--eval-people", "2", "--seed", "4",
            "--height", "32", "--width", "24"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(next((out / "eval" / "images").iterdir())) as im:
        assert im.size == (24, 32)
    assert all_files(out) == all_files(generate(tmp_path / "api", 6, 2, 4, (32, 24)))
    assert main(argv) == 2  # exists, not empty
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not empty" in err and "\n" not in err


def _mouth_pixels(path: Path) -> int:
    """Pixels of the dark-red open mouth colour (visible only when no mask covers it)."""
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"), np.int32)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    return int(((r > 85) & (r < 165) & (g < 40) & (b < 55) & (r - g > 75)).sum())


def test_mask_cue_mouth_shows_only_without_mask(large: Path) -> None:
    """A worn mask hides the mouth: per person, `normal` shows mouth pixels, `mask1` does not."""
    _, rows = read_csv(large / "train" / "train.csv")
    _, fixes = read_csv(large / "corrections.csv")
    swapped = {f["target"] for f in fixes if f["field"] == "mask_swap"}
    shown = []
    for r in rows:
        folder = large / "train" / "images" / r["path"]
        if r["path"] in swapped:  # the planted error is in the pixels: this `incorrect_mask`
            assert _mouth_pixels(next(folder.glob("incorrect_mask.*"))) >= 8  # is unmasked
            continue
        normal, worn = (_mouth_pixels(next(folder.glob(f"{s}.*"))) for s in ("normal", "mask1"))
        shown.append((normal, worn))
    normal, worn = np.array(shown).T
    assert np.mean(normal >= 8) > 0.95, "the mouth shows without a mask"
    assert np.mean(worn >= 8) < 0.2, "a worn mask hides it (background clutter aside)"


def _mask_pixels(path: Path) -> int:
    """Pixels of any mask colour, allowing the photo's global brightness factor (0.8..1.15)."""
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"), np.float32)
    best = np.full(px.shape[:2], np.inf, np.float32)
    for col in MASK_COLORS:
        c = np.asarray(col, np.float32)
        k = np.clip((px * c).sum(-1) / (c * c).sum(), 0.8, 1.15)
        best = np.minimum(best, np.linalg.norm(px - k[..., None] * c, axis=-1))
    return int((best < 25).sum())


def test_mask_states_differ_clearly_in_covered_area(large: Path) -> None:
    """Worn covers the most of the face, incorrect (lowered) clearly less, normal none.

    Background clutter can hold mask-like colours, so compare per person and by median: the
    three states must be far enough apart that a small CNN learns them at 48x32.
    """
    counts = np.array([[_mask_pixels(next(f.glob(f"{s}.*"))) for s in
                        ("mask1", "incorrect_mask", "normal")]
                       for f in sorted((large / "train" / "images").iterdir())])
    worn, incorrect, normal = np.median(counts, axis=0)
    assert worn > 1.25 * incorrect and incorrect > 1.4 * normal, (worn, incorrect, normal)
    assert np.mean(counts[:, 0] > counts[:, 1]) > 0.7
    assert np.mean(counts[:, 1] > counts[:, 2]) > 0.7
