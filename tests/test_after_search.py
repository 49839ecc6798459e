"""What a user does after a search: predict on photos, look at Grad-CAM, read the report.

One small demo search (3 trials, 2 folds, 2 epochs on ``tiny_data``) and its ensemble are made
once for the module; each CLI is then run as a user runs it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest

from core.faces import FOUND_SOURCES
from search import predict
from search import run as search_run
from search.ensemble import cli as ensemble
from search.ensemble.submission import Submission
from tests.test_search import args, enqueue

STUDY = "demo"  # search.run takes the space from the study of this name


@pytest.fixture(scope="module")
def finished(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A demo study with 3 complete trials and its submission, under its own runs/ folder."""
    root = tmp_path_factory.mktemp("after")
    mp = pytest.MonkeyPatch()
    mp.setenv("MASK_SEARCH_RUNS", str(root / "runs"))
    url, art = f"sqlite:///{root / 'after.db'}", root / "artifacts"
    enqueue(url, STUDY, 3)
    assert search_run.main(args(STUDY, url, art, tiny_data, 3, "--pruner", "none")) == 0
    flags = ["--study", STUDY, "--storage", url, "--artifacts", str(art)]
    assert ensemble.main([*flags, "--size", "3"]) == 0
    yield SimpleNamespace(root=root, url=url, art=art, flags=flags, data=tiny_data,
                          study=optuna.load_study(study_name=STUDY, storage=url),
                          submission=root / "runs" / STUDY / "submission.csv")
    mp.undo()


def read_csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text), dtype={"file": str}, keep_default_na=False)


@pytest.mark.slow
def test_predict_on_the_eval_folder_gives_the_submissions_classes(finished, capsys) -> None:
    """The photos of the eval folder, cropped and classified from scratch, get the classes the
    submission gave them from the trials' stored eval probabilities."""
    capsys.readouterr()
    assert predict.main([*finished.flags, "--quiet", str(finished.data / "eval" / "images")]) == 0
    out = read_csv(capsys.readouterr().out)
    assert list(out.columns) == list(predict.COLUMNS)
    sub = pd.read_csv(finished.submission, dtype={"ImageID": str})
    out["ImageID"] = out["file"].map(lambda f: Path(f).name)
    merged = sub.merge(out, on="ImageID", how="left")
    assert len(merged) == len(sub) and merged["class"].notna().all(), out
    assert (merged["ans"] == merged["class"].astype(int)).all(), merged
    assert set(out["mask"]) <= {"wear", "incorrect", "not_worn"}
    assert set(out["gender"]) <= {"male", "female"}
    assert set(out["age"]) <= {"<30", "30-59", ">=60"}
    assert ((out["prob"] > 0) & (out["prob"] <= 1)).all()
    assert set(out["box_source"]) <= {*FOUND_SOURCES, "dataset", "center"}


@pytest.mark.slow
def test_predict_prob_is_the_blended_eval_probability_of_its_class(finished, tmp_path,
                                                                   capsys) -> None:
    """``prob`` is the probability of the printed class under the submission's blend: the
    members' stored eval probabilities averaged with their weights (submission.json). The
    submission is rewritten with two members weighted 0.7 / 0.3, so equal weights (or one
    member's probabilities) would not pass."""
    import json

    import numpy as np

    from search.artifacts import EVAL, load_array, open_store
    from search.finished_study import SUBMISSION_ATTR

    payload = json.loads(finished.submission.with_suffix(".json").read_text())
    best, second = [t.number for t in sorted(
        (t for t in finished.study.trials if t.value is not None),
        key=lambda t: -t.value)][:2]
    payload |= {"members": [{"trial": best, "weight": 0.7}, {"trial": second, "weight": 0.3}],
                "offsets": None, "uses": "ensemble"}
    mine = tmp_path / "two_members.json"
    mine.write_text(json.dumps(payload))
    study = optuna.load_study(study_name=STUDY, storage=finished.url)
    recorded = study.user_attrs[SUBMISSION_ATTR]
    study.set_user_attr(SUBMISSION_ATTR, str(mine))
    try:
        capsys.readouterr()
        assert predict.main([*finished.flags, "--quiet",
                             str(finished.data / "eval" / "images")]) == 0
        out = read_csv(capsys.readouterr().out)
    finally:
        study.set_user_attr(SUBMISSION_ATTR, recorded)
    store = open_store(finished.art)
    trials = {t.number: t for t in finished.study.trials}
    blended = (0.7 * load_array(trials[best], store, EVAL).astype(np.float64)
               + 0.3 * load_array(trials[second], store, EVAL).astype(np.float64))
    ids = pd.read_csv(finished.data / "eval" / "info.csv", dtype={"ImageID": str})["ImageID"]
    row = {image_id: i for i, image_id in enumerate(ids)}
    rows = [row[Path(f).name] for f in out["file"]]
    assert len(out) == len(ids)
    assert (out["class"].astype(int).to_numpy() == blended[rows].argmax(axis=1)).all()
    expected = blended[rows, out["class"].astype(int).to_numpy()]
    # printed with 4 decimals: within 0.00005 of the blend, plus float noise
    np.testing.assert_allclose(out["prob"].astype(float), expected, rtol=0, atol=6e-5)


@pytest.mark.slow
def test_predict_gives_unreadable_files_a_row_with_the_reason(finished, tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    eval_image = next((finished.data / "eval" / "images").iterdir())
    (photos / "good.jpg").write_bytes(eval_image.read_bytes())
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "._good.jpg").write_bytes(b"macOS junk")  # skipped, as in the data folders
    out_csv = tmp_path / "pred.csv"
    capsys.readouterr()
    assert predict.main([*finished.flags, "--quiet", "--out", str(out_csv), str(photos),
                         str(tmp_path / "missing.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # with --out, nothing but the CSV file
    table = read_csv(out_csv.read_text()).set_index("file")
    assert len(table) == 3
    good, broken = table.loc[str(photos / "good.jpg")], table.loc[str(photos / "broken.jpg")]
    assert good["reason"] == "" and 0 <= int(good["class"]) < 18
    assert broken["class"] == "" and broken["reason"]
    assert table.loc[str(tmp_path / "missing.png"), "reason"] == "no such file"


@pytest.mark.slow
def test_predict_says_to_run_the_ensemble_first(finished, tmp_path, capsys) -> None:
    finished.submission.with_suffix(".json").rename(tmp_path / "kept.json")
    try:
        assert predict.main([*finished.flags, str(finished.data / "eval" / "images")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "python -m search.ensemble --study demo" in err
    finally:
        (tmp_path / "kept.json").rename(finished.submission.with_suffix(".json"))


def gradcam_files(finished, number: int) -> list[str]:
    from search.artifacts import finished_artifacts

    study = optuna.load_study(study_name=STUDY, storage=finished.url)
    return [m["filename"] for m in finished_artifacts(study, study.trials[number]).values()]


@pytest.mark.slow
def test_the_ensemble_attaches_the_best_trials_gradcam_and_the_dashboard_lists_it(
        finished, tmp_path) -> None:
    """search.ensemble made the best trial's grid; optuna-dashboard's own API lists it under
    that trial and serves a PNG."""
    import json

    from tests.test_dashboard import dashboard_at, get

    best = finished.study.best_trial.number
    assert gradcam_files(finished, best) == [f"gradcam_trial{best}.png"]
    with dashboard_at(finished.url, finished.art) as base:
        sid = json.loads(get(base + "/api/studies"))["study_summaries"][0]["study_id"]
        detail = json.loads(get(f"{base}/api/studies/{sid}"))
        trial = next(t for t in detail["trials"] if t["number"] == best)
        listed = [a for a in trial["artifacts"] if a["filename"].startswith("gradcam")]
        assert [a["filename"] for a in listed] == [f"gradcam_trial{best}.png"]
        blob = get(f"{base}/artifacts/{sid}/{trial['trial_id']}/{listed[0]['artifact_id']}")
        assert blob[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_explain_any_trial_replaces_its_earlier_grid(finished, capsys) -> None:
    from search import explain

    other = next(t.number for t in finished.study.trials if t.number !=
                 finished.study.best_trial.number)
    for _ in range(2):
        assert explain.main([*finished.flags, "--trial", str(other)]) == 0
    assert gradcam_files(finished, other) == [f"gradcam_trial{other}.png"]  # one, not two
    assert f"gradcam_trial{other}.png" in capsys.readouterr().out


PROBE = """<script>window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.setAttribute("data-images", document.images.length);
  document.body.setAttribute("data-broken", bad);
});</script>"""


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_renders_in_chromium_with_every_image(finished, tmp_path, capsys) -> None:
    """Headless Chromium loads the report: every embedded image decodes, no console error, and
    the figures a reader looks for are on the page."""
    import html
    import re
    import subprocess

    from search import report
    from tests.test_dashboard import chromium

    assert report.main(finished.flags) == 0
    out = Path(capsys.readouterr().out.strip().removeprefix("wrote "))
    text = out.read_text()
    assert "<script" not in text and not re.search(r'(src|href)="(?!data:)', text)  # no fetch
    # confusion matrix, history, importances, fold curves, Grad-CAM
    assert text.count("<img") == 5
    probed = tmp_path / "probed.html"  # the page plus a probe that counts broken images
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    if shot := os.environ.get("MASK_SEARCH_REPORT_SHOT"):  # to look at it yourself
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={tmp_path / 'shot'}", "--window-size=1200,5000",
                        f"--screenshot={shot}", out.as_uri()], capture_output=True, timeout=120)
    r = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    images = int(re.search(r'data-images="(\d+)"', r.stdout).group(1))
    assert images == 5 and 'data-broken="0"' in r.stdout, r.stdout[:500]
    assert "CONSOLE" not in r.stderr and "Uncaught" not in r.stderr
    best = finished.study.best_trial
    payload = __import__("json").loads(finished.submission.with_suffix(".json").read_text())
    for number in (f"{best.value:.4f}",
                   f"{payload['figures']['ensemble_cross_fitted_f1']:.4f}"):
        assert number in r.stdout
    uses = Submission.from_json(payload).what_it_uses()
    assert f"The submission uses {html.escape(uses)};" in text
    assert "No Grad-CAM grid" not in r.stdout  # the grid itself, not how to make it
    assert "Grad-CAM" in r.stdout and "&gt;=60" in r.stdout


@pytest.mark.slow
def test_tools_after_the_search_find_a_submission_written_elsewhere(finished, tmp_path,
                                                                   capsys) -> None:
    """``search.ensemble --out elsewhere.csv``: predict (and report, explain, labels, which
    read it the same way) find it there, not "no ensemble yet"; the default place is not read."""
    from search.finished_study import FinishedStudy

    elsewhere = tmp_path / "team" / "final.csv"
    default = finished.submission.with_suffix(".json")
    default.rename(tmp_path / "kept.json")
    try:
        assert ensemble.main([*finished.flags, "--size", "3", "--no-gradcam",
                              "--out", str(elsewhere)]) == 0
        capsys.readouterr()
        study = optuna.load_study(study_name=STUDY, storage=finished.url)
        found = FinishedStudy(STUDY, finished.url, study, None)
        assert found.submission_path == elsewhere.with_suffix(".json").resolve()
        assert found.submission().csv == str(elsewhere)
        photo = sorted((finished.data / "eval" / "images").iterdir())[0]
        assert predict.main([*finished.flags, "--quiet", str(photo)]) == 0, \
            capsys.readouterr().err
        rows = read_csv(capsys.readouterr().out)
        want = pd.read_csv(elsewhere, dtype={"ImageID": str}).set_index("ImageID")["ans"]
        assert int(rows["class"][0]) == int(want[photo.name])
    finally:
        (tmp_path / "kept.json").rename(default)
        assert ensemble.main([*finished.flags, "--size", "3", "--no-gradcam"]) == 0  # as before


def test_explain_picks_per_mask_state_the_lowest_true_class_probability_first() -> None:
    """The Grad-CAM grid's rows: for each mask state (class // 6: worn, incorrect, not worn),
    the images whose true class got the lowest OOF probability, lowest first."""
    from search.explain import pick_rows

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 18, 200)
    oof = rng.dirichlet(np.ones(18), 200)
    picked = pick_rows(labels, oof, per_state=4)
    assert len(picked) == 3
    for mask_state, rows in enumerate(picked):
        mine = [r for r in range(200) if labels[r] // 6 == mask_state]
        by_p = sorted(mine, key=lambda r: oof[r, labels[r]])
        assert list(rows) == by_p[:4]


@pytest.mark.slow
def test_explain_draws_each_image_through_the_fold_model_that_did_not_train_on_it(
        finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each picked image goes through the model of its own validation fold (the one that never
    saw it): fold models are tagged, the Grad-CAM call records which images each one got."""
    from search import explain
    from search.artifacts import OOF, load_array, open_store
    from search.finished_study import FinishedStudy, study_rows

    found = FinishedStudy(STUDY, finished.url, finished.study, open_store(finished.art))
    number = found.complete()[0].number
    n_folds = found.n_folds
    monkeypatch.setattr(explain, "fold_states", lambda trial, store, n: [
        {"fold": k} for k in range(n)])
    calls: list[tuple[int, np.ndarray]] = []

    def record(cfg, state, images, classes):
        calls.append((state["fold"], np.asarray(images).copy()))
        return np.zeros(np.asarray(images).shape[:3], np.float32)

    monkeypatch.setattr(explain, "heat_maps", record)
    explain.gradcam_grid(found, number, tmp_path / "grid.png")

    # independently: the picked rows, their crops and their folds
    _, table, folds = study_rows(found.study)
    trial = found.trial(number)
    labels = table["label"].to_numpy(np.int64)
    rows = np.concatenate(explain.pick_rows(labels, load_array(trial, found.store, OOF),
                                            explain.PER_STATE))
    cache = explain.build_cache(finished.data, tuple(trial.user_attrs["config"]["image_size"]),
                                found.faces, progress=False)
    images = cache.view(table["file"].tolist())
    seen = {fold: [img.tobytes() for img in imgs] for fold, imgs in calls}
    assert sorted(seen) == sorted({int(f) for f in folds[rows]}) and n_folds >= 2
    assert sum(len(v) for v in seen.values()) == len(rows)
    for r in rows:
        assert np.asarray(images[int(r)]).tobytes() in seen[int(folds[r])], f"row {r}"
