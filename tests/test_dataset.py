"""Reading the competition layout: tolerated quirks, clear errors, corrections, relabeling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.dataset import (
    PUBLIC_CORRECTIONS,
    TABLE_COLUMNS,
    CorrectionWarning,
    apply_corrections,
    load_eval_table,
    load_train_table,
    read_corrections,
    training_targets,
)
from core.errors import DataError
from core.fingerprints import data_fingerprint
from core.labels import IMAGE_STEMS, MASK_BY_STEM, age_group, encode
from tests.conftest import SYNTH_EVAL_PEOPLE, SYNTH_PEOPLE, TINY_PEOPLE


def csv_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --- the synthetic set parses, with its balance -------------------------------------------


@pytest.fixture(scope="module")
def synth_table(synth_data) -> pd.DataFrame:
    return load_train_table(synth_data)


def test_synthetic_set_parses_to_7_images_per_person(synth_table, synth_data):
    t = synth_table
    assert list(t.columns) == list(TABLE_COLUMNS)
    assert len(t) == SYNTH_PEOPLE * 7 and t["person"].nunique() == SYNTH_PEOPLE
    assert list(t.index) == list(range(len(t)))
    assert t.equals(t.sort_values(["person", "file"]).reset_index(drop=True))
    assert (t.groupby("person")["stem"].apply(sorted) == [sorted(IMAGE_STEMS)] * SYNTH_PEOPLE).all()
    assert all((synth_data / f).is_file() for f in t["file"])
    assert t["file"].str.startswith("train/images/").all()
    assert {Path(f).suffix for f in t["file"]} >= {".jpg", ".jpeg", ".png"}  # mixed, all read
    for col in ("gender", "age", "mask", "label"):
        assert t[col].dtype == np.int64, col
    assert (t["label"] == encode(t["mask"], t["gender"], age_group(t["age"].to_numpy()))).all()


def test_synthetic_set_has_the_requested_balance(synth_table):
    people = synth_table.groupby("person").first()
    assert 0.5 <= people["gender"].mean() <= 0.72  # ~61% female
    assert 1 <= (people["age"] >= 60).sum() <= 0.15 * SYNTH_PEOPLE  # ~7% aged 60, never none
    assert people["age"].between(18, 60).all()
    assert synth_table["mask"].value_counts().to_dict() == {
        0: 5 * SYNTH_PEOPLE, 1: SYNTH_PEOPLE, 2: SYNTH_PEOPLE}


def test_junk_files_are_skipped_and_counted(synth_table, synth_data):
    junk = [p for p in (synth_data / "train" / "images").rglob("*")
            if p.is_file() and (p.name.startswith(".") or p.stem not in MASK_BY_STEM)]
    assert junk, "the synthetic set should contain macOS junk files"
    assert synth_table.attrs["skipped_files"] == len(junk)
    assert not synth_table["file"].str.contains("/\\.", regex=True).any()


def test_eval_table_follows_info_csv(synth_data):
    e = load_eval_table(synth_data)
    listed = [line.split(",")[0] for line in csv_rows(synth_data / "eval" / "info.csv")[1:]]
    assert list(e.columns) == ["ImageID", "file"]
    assert list(e["ImageID"]) == listed and len(e) == SYNTH_EVAL_PEOPLE * 7
    assert all((synth_data / f).is_file() for f in e["file"])


# --- tolerated quirks of the real set -----------------------------------------------------


def test_person_is_the_folder_not_the_id(tiny_layout):
    t = load_train_table(tiny_layout())
    people = t.groupby("person").first()
    assert sorted(people.index) == sorted(p[4] for p in TINY_PEOPLE)
    shared = people[people["id"] == "000002"]  # one id, two different people
    assert len(shared) == 2 and sorted(shared["gender"]) == [0, 1]
    assert people.loc["000003-1_male_Asian_30", "id"] == "000003-1"  # suffix kept, zeros kept
    assert t.attrs["skipped_files"] == 2 * len(TINY_PEOPLE) + 1  # see write_tiny_layout
    assert not t["file"].str.contains("thumb|notes|/\\._", regex=True).any()


def test_extra_columns_and_upper_case_suffixes_are_fine(tiny_layout):
    root = tiny_layout()
    csv = root / "train" / "train.csv"
    lines = csv_rows(csv)
    csv.write_text("\n".join([lines[0] + ",note"] + [x + ",hi" for x in lines[1:]]) + "\n")
    folder = root / "train" / "images" / TINY_PEOPLE[0][4]
    next(folder.glob("normal.*")).rename(folder / "normal.JPG")
    t = load_train_table(root)
    assert len(t) == 7 * len(TINY_PEOPLE) and "note" not in t.columns


def test_extra_columns_in_info_csv_are_fine(tiny_layout):
    root = tiny_layout()
    csv = root / "eval" / "info.csv"
    csv.write_text("\n".join(["ImageID,ans,note"] + [x + ",hi" for x in csv_rows(csv)[1:]]) + "\n")
    e = load_eval_table(root)
    assert list(e.columns) == ["ImageID", "file"] and len(e) == 3


# --- a broken layout gives one clear error naming the file and field ----------------------


def set_csv_cell(csv: Path, row: int, column: str, value: str) -> None:
    lines = [line.split(",") for line in csv_rows(csv)]
    lines[row + 1][lines[0].index(column)] = value
    csv.write_text("\n".join(",".join(x) for x in lines) + "\n")


def first_folder(root: Path) -> str:
    return csv_rows(root / "train" / "train.csv")[1].split(",")[4]


def break_missing_csv(root):
    (root / "train" / "train.csv").unlink()
    return r"train\.csv: file not found"


def break_empty_csv(root):
    (root / "train" / "train.csv").write_text("")
    return r"train\.csv: file is empty"


def break_header_only(root):
    (root / "train" / "train.csv").write_text("id,gender,race,age,path\n")
    return r"train\.csv: has a header but no rows"


def break_missing_columns(root):
    csv = root / "train" / "train.csv"
    keep = [0, 1, 2]  # drop age and path
    csv.write_text("\n".join(",".join(line.split(",")[k] for k in keep)
                             for line in csv_rows(csv)) + "\n")
    return r"train\.csv: missing column\(s\) age, path"


def break_age_text(root):
    set_csv_cell(root / "train" / "train.csv", 1, "age", "forty")
    return r"train\.csv line 3 \(folder '[^']+'\): 'age' is not a whole number: 'forty'"


def break_age_range(root):
    set_csv_cell(root / "train" / "train.csv", 0, "age", "250")
    return rf"train\.csv line 2 \(folder '{first_folder(root)}'\): 'age' 250 is outside"


def break_gender(root):
    set_csv_cell(root / "train" / "train.csv", 0, "gender", "unknown")
    return rf"train\.csv line 2 \(folder '{first_folder(root)}'\): unknown gender 'unknown'"


def break_duplicate_row(root):
    csv = root / "train" / "train.csv"
    lines = csv_rows(csv)
    csv.write_text("\n".join(lines + [lines[1]]) + "\n")
    return rf"train\.csv: folder '{first_folder(root)}' is listed more than once"


def break_missing_image(root):
    folder = root / "train" / "images" / first_folder(root)
    next(folder.glob("normal.*")).unlink()
    return rf"{first_folder(root)}: missing image\(s\) normal"


def break_absent_folder(root):
    shutil.rmtree(root / "train" / "images" / first_folder(root))
    return rf"{first_folder(root)}: person folder listed in train\.csv .* does not exist"


def break_two_files_one_stem(root):
    folder = root / "train" / "images" / first_folder(root)
    src = next(folder.glob("mask1.*"))
    other = ".png" if src.suffix != ".png" else ".jpg"
    shutil.copy(src, folder / f"mask1{other}")
    return rf"{first_folder(root)}: two files for image 'mask1'"


def break_eval_absent(root):
    ev = root / "eval" / "images"
    victim = sorted(ev.iterdir())[0]
    victim.unlink()
    return rf"info\.csv: 1 of \d+ listed image\(s\) are not in .*: .{victim.name}. \(line \d+\)"


def break_eval_columns(root):
    (root / "eval" / "info.csv").write_text("id,ans\nx.jpg,\n")
    return r"info\.csv: missing column\(s\) ImageID"


def break_age_negative(root):
    set_csv_cell(root / "train" / "train.csv", 2, "age", "-3")
    return r"train\.csv line 4 \(folder '[^']+'\): 'age' -3 is outside"


def break_age_fraction(root):
    set_csv_cell(root / "train" / "train.csv", 0, "age", "45.5")
    return r"train\.csv line 2 \(folder '[^']+'\): 'age' is not a whole number: '45\.5'"


def break_age_empty(root):
    set_csv_cell(root / "train" / "train.csv", 3, "age", "")
    return r"train\.csv line 5 \(folder '[^']+'\): 'age' is not a whole number: ''"


def break_eval_duplicate(root):
    csv = root / "eval" / "info.csv"
    lines = csv_rows(csv)
    csv.write_text("\n".join(lines + [lines[1]]) + "\n")
    name = lines[1].split(",")[0]
    return (rf"info\.csv: ImageID '{name}' is listed more than once \(lines 2, {len(lines) + 1}\)")


def break_eval_empty_file(root):
    (root / "eval" / "info.csv").write_bytes(b"")
    return r"info\.csv: file is empty"


def break_eval_header_only(root):
    (root / "eval" / "info.csv").write_text("ImageID,ans\n")
    return r"info\.csv: has a header but no rows"


def break_eval_missing_csv(root):
    (root / "eval" / "info.csv").unlink()
    return r"info\.csv: file not found"


def break_eval_folder_missing(root):
    shutil.rmtree(root / "eval" / "images")
    return r"images: folder not found \(.*info\.csv lists 3 images there\)"


def break_eval_all_absent(root):
    names = [line.split(",")[0] for line in csv_rows(root / "eval" / "info.csv")[1:]]
    for n in names:
        (root / "eval" / "images" / n).unlink()
    listed = ", ".join(f"'{n}' \\(line {k + 2}\\)" for k, n in enumerate(names))
    return rf"info\.csv: 3 of 3 listed image\(s\) are not in .*images: {listed}$"


BREAKS = [break_missing_csv, break_empty_csv, break_header_only, break_missing_columns,
          break_age_text, break_age_range, break_age_negative, break_age_fraction,
          break_age_empty, break_gender, break_duplicate_row,
          break_missing_image, break_absent_folder, break_two_files_one_stem, break_eval_absent,
          break_eval_columns, break_eval_duplicate, break_eval_empty_file, break_eval_header_only,
          break_eval_missing_csv, break_eval_folder_missing, break_eval_all_absent]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__.removeprefix("break_"))
def test_broken_layout_names_file_and_field(tiny_layout, breaker):
    root = tiny_layout()
    pattern = breaker(root)
    with pytest.raises(DataError, match=pattern):
        if breaker.__name__.startswith("break_eval"):
            load_eval_table(root)
        else:
            load_train_table(root)


def test_broken_synthetic_copy_is_reported(copy_of_synth):
    # the shared fixture gives a private copy: breaking it must not touch synth_data
    pattern = break_missing_image(copy_of_synth)
    with pytest.raises(DataError, match=pattern):
        load_train_table(copy_of_synth)


# --- corrections --------------------------------------------------------------------------


def test_synthetic_corrections_change_exactly_the_listed_people(synth_data, synth_table):
    fixed = load_train_table(synth_data, corrections=synth_data / "corrections.csv")
    fixes = read_corrections(synth_data / "corrections.csv")
    targeted = set()
    for c in fixes:
        hit = synth_table["person"] == c.target
        targeted |= set(synth_table.loc[hit if hit.any() else synth_table["id"] == c.target,
                                        "person"])
    changed = (fixed[["gender", "age", "mask", "label"]] != synth_table[
        ["gender", "age", "mask", "label"]]).any(axis=1)
    assert set(fixed.loc[changed, "person"]) == targeted
    assert fixed.attrs["corrections_applied"] == len(fixes)
    same = ["person", "file", "stem"]
    assert (fixed[same] == synth_table[same]).all().all()
    for c in fixes:
        rows = (fixed["person"] == c.target) | (fixed["id"] == c.target)
        if c.field == "gender":
            assert (fixed.loc[rows, "gender"] == {"male": 0, "female": 1}[c.value]).all()
        elif c.field == "age":
            assert (fixed.loc[rows, "age"] == int(c.value)).all()
        else:
            stems = fixed.loc[rows].set_index("stem")["mask"]
            assert stems["normal"] == 1 and stems["incorrect_mask"] == 2
    assert data_fingerprint(fixed) != data_fingerprint(synth_table)
    assert data_fingerprint(load_train_table(synth_data)) == data_fingerprint(synth_table)


def public_set_people() -> list[tuple[str, str, str, int, str]]:
    """People named by the shipped corrections file, as the real train.csv writes them."""
    rows = [(f"00{n}", "female", "Asian", 20, f"00{n}_female_Asian_20") for n in range(6359, 6365)]
    rows += [("001498-1", "male", "Asian", 23, "001498-1_male_Asian_23"),
             ("004432", "male", "Asian", 43, "004432_male_Asian_43")]
    rows += [(i, "male", "Asian", 30, f"{i}_male_Asian_30") for i in ("000020", "004418", "005227")]
    return rows + [("000001", "female", "Asian", 45, "000001_female_Asian_45")]


def test_shipped_public_corrections_fix_the_reported_people(tiny_layout):
    root = tiny_layout(people=public_set_people())
    before = load_train_table(root)
    after = load_train_table(root, corrections=PUBLIC_CORRECTIONS)
    assert after.attrs["corrections_applied"] == 11
    people = after.groupby("person").first()
    for n in range(6359, 6365):
        assert people.loc[f"00{n}_female_Asian_20", "gender"] == 0
    assert people.loc["001498-1_male_Asian_23", "gender"] == 1
    assert people.loc["004432_male_Asian_43", "gender"] == 1
    swapped = after["id"].isin(["000020", "004418", "005227"])
    by_stem = after[swapped].groupby("stem")["mask"].unique()
    assert list(by_stem["normal"]) == [1] and list(by_stem["incorrect_mask"]) == [2]
    untouched = after["person"] == "000001_female_Asian_45"
    assert after[untouched].equals(before[untouched])
    changed = (after["label"] != before["label"]).groupby(after["person"]).any()
    assert changed.sum() == 11


def test_unmatched_target_is_an_error_unless_not_strict(synth_data, tmp_path):
    with pytest.raises(DataError, match=r"mask_public\.csv line 2: target '006359' matches no"):
        load_train_table(synth_data, corrections=PUBLIC_CORRECTIONS)
    with pytest.warns(CorrectionWarning, match="11 of 11 correction"):
        t = load_train_table(synth_data, corrections=PUBLIC_CORRECTIONS, strict=False)
    assert data_fingerprint(t) == data_fingerprint(load_train_table(synth_data))


@pytest.mark.parametrize(("line", "pattern"), [
    ("000001,height,180", r"fixes\.csv line 3: unknown field 'height'"),
    ("000001,gender,other", r"fixes\.csv line 3: gender value 'other'"),
    ("000001,age,old", r"fixes\.csv line 3: age value 'old'"),
    ("000001,mask_swap,normal:mask9", r"fixes\.csv line 3: mask_swap value"),
    (",gender,male", r"fixes\.csv line 3: empty 'target'"),
])
def test_bad_correction_line_names_file_and_line(tiny_layout, tmp_path, line, pattern):
    fixes = tmp_path / "fixes.csv"
    fixes.write_text(f"target,field,value\n000001,gender,male\n{line}\n")
    with pytest.raises(DataError, match=pattern):
        load_train_table(tiny_layout(), corrections=fixes, strict=False)


def test_correction_by_an_id_two_people_share_is_refused_naming_both_folders(tiny_layout,
                                                                              tmp_path):
    """One id, two people (as in the real set): changing both would be wrong for one of them."""
    t = load_train_table(tiny_layout())
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("target,field,value\n000002,age,61\n")
    with pytest.raises(DataError, match=r"fixes.csv line 2: target '000002' is the id of 2 "
                       r"person folders \(000002_female_Asian_29, 000002_male_Asian_60\); "
                       r"target one folder name instead"):
        apply_corrections(t, fixes)
    fixes.write_text("target,field,value\n000002_female_Asian_29,age,28\n")
    ages = apply_corrections(t, fixes).groupby("person")["age"].first()
    assert ages["000002_female_Asian_29"] == 28 and ages["000002_male_Asian_60"] == 60
    assert t.groupby("person")["age"].first()["000002_female_Asian_29"] == 29  # input untouched


# --- relabeling changes training targets only ---------------------------------------------


def test_age_threshold_relabels_targets_not_the_true_class(synth_table):
    t = synth_table.copy()
    t.loc[t.index[:7], "age"] = 58  # make sure someone is in the relabeled range
    t["label"] = encode(t["mask"], t["gender"], age_group(t["age"].to_numpy()))
    label_before = t["label"].copy()
    y58 = training_targets(t, age_threshold=58)
    assert y58.dtype == np.int64 and len(y58) == len(t)
    moved = t["age"].isin([58, 59]).to_numpy()
    assert moved.sum() >= 7
    assert (y58[moved] == t["label"].to_numpy()[moved] + 1).all()  # 30-59 -> >=60
    assert (y58[~moved] == t["label"].to_numpy()[~moved]).all()
    assert (training_targets(t, age_threshold=60) == t["label"].to_numpy()).all()
    assert t["label"].equals(label_before)
