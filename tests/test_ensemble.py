"""Ensembling trials (search.ensemble) and trial artifacts (search.artifacts)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.artifacts.exceptions import ArtifactNotFound

from core.answers import write_submission
from core.dataset import load_eval_table, load_train_table
from core.errors import DataError
from core.fingerprints import fingerprints
from core.labels import NUM_CLASSES
from core.metrics import macro_f1
from core.splits import person_folds
from search import artifacts
from search.artifacts import EVAL, OOF
from search.ensemble.choice import SINGLE
from search.ensemble.cli import main
from search.ensemble.nested import Recipe, nested_f1
from search.ensemble.score import main as score_main
from search.ensemble.select import Selection, blend, select_weights

N_FOLDS = 4
HALF = NUM_CLASSES // 2


pytestmark = pytest.mark.usefixtures("quiet_optuna")


@pytest.mark.slow
def test_one_macro_f1_everywhere_and_torch_free():
    """Engine, objective and ensemble score with the same function; importing it needs no torch."""
    import core.engine
    import search.ensemble.cli
    import search.objective

    assert (core.engine.macro_f1 is search.objective.macro_f1 is search.ensemble.cli.macro_f1
            is macro_f1)
    code = "import sys, core.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def member(labels: np.ndarray, right: np.ndarray, seed: int) -> np.ndarray:
    """Probabilities confident and right on rows ``right``, diffuse and wrong elsewhere."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    p = rng.uniform(0, 0.02, (n, NUM_CLASSES))
    wrong = (labels + rng.integers(1, NUM_CLASSES, n)) % NUM_CLASSES
    p[np.arange(n), np.where(right, labels, wrong)] += np.where(right, 0.9, 0.4)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def complementary(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two members: one right on classes 0..8, the other on classes 9..17."""
    low = labels < HALF
    return member(labels, low, seed), member(labels, ~low, seed + 1)


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, NUM_CLASSES, 360)


# ----------------------------------------------------------------------------- pure functions


def greedy_select(oof_list, labels, size: int) -> np.ndarray:
    """Plain Caruana selection on macro F1 from the empty set (no pool filter, init or bags)."""
    return select_weights(oof_list, labels, Selection(objective="f1", size=size, init=0, bags=1,
                                                      margin=0.0, pool_margin=None))


def cross_fitted_f1(oof_list, labels, folds, size: int = Selection().size) -> float:
    """Nested cross-fitted macro F1 of the CLI's recipe with ``size`` rounds (1: the best
    single member)."""
    recipe = SINGLE if size == 1 else Recipe(top=len(oof_list), selection=Selection(size=size))
    return nested_f1(oof_list, labels, folds, recipe)[recipe.offsets != "none"]


def test_complementary_members_ensemble_beats_each(labels):
    a, b = complementary(labels)
    weights = greedy_select([a, b], labels, size=10)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights > 0).all()
    ens = macro_f1(labels, blend([a, b], weights).argmax(axis=1))
    singles = [macro_f1(labels, p.argmax(axis=1)) for p in (a, b)]
    assert ens > max(singles) + 0.2


def test_selection_is_deterministic_and_ties_go_to_the_better_rank(labels):
    a, b = complementary(labels)
    first = greedy_select([a, a.copy(), b], labels, size=12)
    assert np.array_equal(first, greedy_select([a, a.copy(), b], labels, size=12))
    assert first[1] == 0  # an exact copy of member 0 never wins a tie against it
    assert np.allclose(first[[0, 2]], greedy_select([a, b], labels, size=12))


def test_selection_keeps_the_best_prefix(labels):
    good = member(labels, np.ones(len(labels), bool), 0)
    bad = member(labels, np.zeros(len(labels), bool), 1)
    assert np.array_equal(greedy_select([bad, good], labels, size=5), [0.0, 1.0])


def test_cross_fitted_f1_is_honest_about_noise(labels):
    rng = np.random.default_rng(1)
    noise = [rng.dirichlet(np.ones(NUM_CLASSES), len(labels)) for _ in range(8)]
    folds = np.arange(len(labels)) % N_FOLDS
    in_sample = macro_f1(labels, blend(noise, greedy_select(noise, labels, 20)).argmax(axis=1))
    honest = cross_fitted_f1(noise, labels, folds, size=20)
    assert honest < in_sample - 0.02
    a, b = complementary(labels)
    assert cross_fitted_f1([a, b], labels, folds) > cross_fitted_f1([a, b], labels, folds, 1)


def test_bad_probabilities_are_refused(labels):
    with pytest.raises(DataError, match="shape"):
        greedy_select([np.zeros((len(labels) - 1, NUM_CLASSES))], labels, 3)


def test_write_submission_order_and_types(tmp_path):
    ids = [f"{i:03d}.jpg" for i in (5, 1, 3)]
    out = write_submission(tmp_path / "sub" / "s.csv", ids, np.array([17, 0, 4]))
    df = pd.read_csv(out, dtype={"ImageID": str})
    assert list(df.columns) == ["ImageID", "ans"]
    assert df["ImageID"].tolist() == ids and df["ans"].tolist() == [17, 0, 4]
    assert [p.name for p in out.parent.iterdir()] == ["s.csv"]  # no temp file left
    for bad in (np.array([0, 1]), np.array([0, 1, 18]), np.array([0.0, 1.0, 2.0])):
        with pytest.raises(DataError):
            write_submission(tmp_path / "bad.csv", ids, bad)
    assert not (tmp_path / "bad.csv").exists()


# ----------------------------------------------------------------------------- artifacts


def test_artifacts_round_trip_and_removal(tmp_path):
    store = artifacts.open_store(tmp_path / "art" / "nested")
    assert (tmp_path / "art" / "nested").is_dir()
    study = optuna.create_study()
    trial = study.ask()
    arr = np.arange(36, dtype=np.float64).reshape(2, NUM_CLASSES)
    artifacts.save_array(trial, store, "oof", arr)
    ckpt = tmp_path / "fold0.pt"
    ckpt.write_bytes(b"weights")
    artifacts.save_file(trial, store, "ckpt0", ckpt)
    study.tell(trial, 0.5)
    frozen = study.trials[0]
    got = artifacts.load_array(frozen, store, "oof")
    assert got.dtype == np.float32 and np.array_equal(got, arr)
    names = {m.filename for m in optuna.artifacts.get_all_artifact_meta(frozen,
                                                                        storage=study._storage)}
    assert names == {"oof.npy", "fold0.pt"}  # what the dashboard lists
    assert artifacts.load_file(frozen, store, "ckpt0", tmp_path / "x.pt").read_bytes() == \
        b"weights"
    with pytest.raises(DataError, match=r"trial 0 has no artifact 'eval'"):
        artifacts.load_array(frozen, store, "eval")
    assert artifacts.remove_artifact(frozen, store, "ckpt0")
    with pytest.raises(DataError, match=r"trial 0: artifact 'ckpt0' .* not in the artifact store"):
        artifacts.load_file(frozen, store, "ckpt0", tmp_path / "y.pt")

    running = study.ask()
    artifacts.save_array(running, store, "ckpt", np.zeros(3))
    assert artifacts.remove_artifact(running, store, "ckpt")
    assert running.user_attrs["artifact_ckpt"] == ""
    assert not artifacts.remove_artifact(running, store, "ckpt")


def test_open_store_refusals(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # as when boto3 is not installed
    with pytest.raises(DataError, match="needs boto3"):
        artifacts.open_store("s3://bucket/prefix")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        artifacts.open_store(tmp_path / "file")
    with pytest.raises(DataError, match="only a folder or s3"):
        artifacts.open_store("gs://bucket")


# ----------------------------------------------------------------------------- the CLI


class StudyMaker:
    """A sqlite study on ``synth_data`` with fake trials whose artifacts we upload ourselves."""

    def __init__(self, tmp_path: Path, data: Path) -> None:
        self.db = tmp_path / "s.db"
        self.storage = f"sqlite:///{self.db}"
        self.art = tmp_path / "art"
        self.out = tmp_path / "out" / "submission.csv"
        self.store = artifacts.open_store(self.art)
        self.study = optuna.create_study(study_name="t", storage=self.storage,
                                         direction="maximize")
        for key, value in (("data_dir", str(data)), ("n_folds", N_FOLDS), ("fold_seed", 3)):
            self.study.set_user_attr(key, value)
        table = load_train_table(data)
        self.labels = table["label"].to_numpy()
        folds = person_folds(table, N_FOLDS, seed=3)
        eval_table = load_eval_table(data)
        self.fps = fingerprints(table, folds, eval_table)
        self.eval_ids = eval_table["ImageID"].tolist()
        answers = pd.read_csv(data / "eval_answers.csv", dtype={"ImageID": str})
        self.answers = answers.set_index("ImageID")["ans"].loc[self.eval_ids].to_numpy()

    def add(self, oof: np.ndarray, ev: np.ndarray | None, params: dict | None = None,
            **attrs) -> int:
        if params:  # numbers in [0, 10], as a sampler would give them
            self.study.enqueue_trial(params)
        trial = self.study.ask()
        for key in params or {}:
            trial.suggest_float(key, 0.0, 10.0)
        for key, value in {**self.fps, "fold_f1": [0.5] * N_FOLDS, **attrs}.items():
            trial.set_user_attr(key, value)
        artifacts.save_array(trial, self.store, OOF, oof)
        if ev is not None:
            artifacts.save_array(trial, self.store, EVAL, ev)
        self.study.tell(trial, macro_f1(self.labels, oof.argmax(axis=1)))
        return trial.number

    def add_pair(self) -> None:
        """Two complementary trials (OOF and eval alike)."""
        for k, (oof, ev) in enumerate(zip(complementary(self.labels, 0),
                                          complementary(self.answers, 10), strict=True)):
            self.add(oof, ev, fold_f1=[0.4 + k / 10] * N_FOLDS)

    def cli(self, *extra: str) -> int:
        return main(["--study", "t", "--storage", self.storage, "--artifacts", str(self.art),
                     "--out", str(self.out), *extra])


@pytest.fixture
def maker(tmp_path, synth_data) -> StudyMaker:
    return StudyMaker(tmp_path, synth_data)


def test_cli_writes_submission_and_beats_best_single(maker, synth_data, capsys):
    maker.add_pair()
    for k, seed in enumerate((7, 9)):  # two worse trials: a pool of MIN_POOL (4) trials
        maker.add(member(maker.labels, maker.labels % 3 == k, seed),
                  member(maker.answers, maker.answers % 3 == k, seed + 1))
    assert maker.cli("--size", "6") == 0
    printed = capsys.readouterr().out
    assert printed.startswith("nested cross-fitted")  # the honest figures come first
    assert "optimistic" in printed and "eval answers" in printed
    last = printed.strip().splitlines()[-1]
    assert last == (f"score it: python -m search.ensemble.score {maker.out} "
                    f"{synth_data / 'eval_answers.csv'}")

    info = pd.read_csv(synth_data / "eval" / "info.csv", dtype={"ImageID": str})
    sub = pd.read_csv(maker.out, dtype={"ImageID": str})
    assert sub["ImageID"].tolist() == info["ImageID"].tolist()
    assert sub["ImageID"].is_unique
    assert pd.api.types.is_integer_dtype(sub["ans"]) and sub["ans"].between(0, 17).all()

    report = json.loads(maker.out.with_suffix(".json").read_text())
    assert report["uses"] == "ensemble"
    assert sum(m["weight"] for m in report["members"]) == pytest.approx(1.0)
    weights = {m["trial"]: m["weight"] for m in report["members"]}
    assert {0, 1} <= set(weights)  # both halves of the answer (the others are right elsewhere)
    fig = report["figures"]
    assert fig["ensemble_eval_f1"] > fig["best_single_eval_f1"] + 0.05
    assert fig["submission_eval_f1"] == pytest.approx(macro_f1(maker.answers, sub["ans"]))
    assert fig["ensemble_cross_fitted_f1"] > fig["best_single_cross_fitted_f1"]
    assert fig["ensemble_oof_f1_in_sample"] >= fig["ensemble_cross_fitted_f1"]
    assert score_main([str(maker.out), str(synth_data / "eval_answers.csv")]) == 0
    assert capsys.readouterr().out == f"macro F1 {fig['submission_eval_f1']:.4f}\n"


def test_a_two_trial_study_submits_its_best_trial_and_says_why(maker, capsys):
    """Two complementary trials: the ensemble is far ahead, but two trials are no pool
    (``MIN_POOL``); ``--min-pool 2`` submits the ensemble."""
    from search.ensemble.choice import MIN_POOL

    maker.add_pair()
    assert maker.cli("--no-gradcam") == 0
    report = json.loads(maker.out.with_suffix(".json").read_text())
    assert report["uses"] == "best_single" and report["recipe"]["min_pool"] == MIN_POOL
    assert [m["trial"] for m in report["members"]] == [0]  # trial 0 has the higher value
    assert report["why"].startswith("only 2 complete trial(s) to choose from")
    assert f"submission uses the best single trial ({report['why']})" in capsys.readouterr().out
    assert maker.cli("--no-gradcam", "--min-pool", "2") == 0
    assert json.loads(maker.out.with_suffix(".json").read_text())["uses"] == "ensemble"


def test_top1_size1_is_the_best_single_trial_through_the_same_rule(maker, capsys):
    maker.add_pair()
    assert maker.cli("--top", "1", "--size", "1") == 0
    report = json.loads(maker.out.with_suffix(".json").read_text())
    assert [m["trial"] for m in report["members"]] == [0]  # trial 0 has the higher value
    fig = report["figures"]
    assert fig["ensemble_cross_fitted_f1"] == fig["best_single_cross_fitted_f1"]
    assert (report["offsets"] is not None) == (report["rule"] == "offsets")
    assert "submission uses the ensemble, which is the best trial alone" in \
        capsys.readouterr().out


def test_cli_skips_trials_without_all_folds(maker, capsys):
    maker.add_pair()
    perfect = member(maker.labels, np.ones(len(maker.labels), bool), 3)
    maker.add(perfect, perfect[: len(maker.eval_ids)], fold_f1=[1.0])  # one fold only
    assert maker.cli() == 0
    assert "skipped 1 complete trial(s) without all 4 folds" in capsys.readouterr().out
    members = json.loads(maker.out.with_suffix(".json").read_text())["members"]
    assert 2 not in {m["trial"] for m in members}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_refuses_without_complete_trial(maker, capsys):
    trial = maker.study.ask()
    maker.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert maker.cli() == 2
    assert "no complete trial" in one_line_error(capsys)
    assert not maker.out.exists()


def test_cli_refuses_missing_eval_probabilities(maker, capsys):
    maker.add_pair()
    number = maker.add(member(maker.labels, maker.labels < 5, 4), None)
    assert maker.cli() == 2
    assert f"trial {number} has no eval probabilities" in one_line_error(capsys)
    assert not maker.out.exists()


@pytest.mark.parametrize("attr,what", [("data_fingerprint", "data"),
                                       ("folds_fingerprint", "folds"),
                                       ("eval_fingerprint", "eval images")])
def test_cli_refuses_mixed_data_or_folds(maker, capsys, attr, what):
    maker.add_pair()
    a, _ = complementary(maker.labels)
    number = maker.add(a, a[: len(maker.eval_ids)], **{attr: "0123456789abcdef"})
    assert maker.cli() == 2
    err = one_line_error(capsys)
    assert f"different {what}" in err
    assert f"0123456789abcdef: trials {number}" in err and "trials 0, 1" in err
    assert not maker.out.exists()


def test_cli_refuses_when_data_changed_since_the_trials(maker, capsys):
    a, b = complementary(maker.labels)
    for p in (a, b):
        maker.add(p, p[: len(maker.eval_ids)], data_fingerprint="feedfacefeedface")
    assert maker.cli() == 2
    assert "now gives" in one_line_error(capsys)


def test_cli_refuses_when_eval_info_csv_changed_since_the_trials(maker, copy_of_synth, capsys):
    """Same eval images, other order: the eval probabilities would land on the wrong ImageIDs."""
    maker.add_pair()
    assert maker.cli("--data", str(copy_of_synth)) == 0  # an exact copy is the same data
    info = copy_of_synth / "eval" / "info.csv"
    df = pd.read_csv(info, dtype=str, keep_default_na=False)
    df.iloc[::-1].to_csv(info, index=False)  # same rows, same count, reordered
    before = maker.out.read_bytes()
    assert maker.cli("--data", str(copy_of_synth)) == 2
    err = one_line_error(capsys)
    assert "eval_fingerprint" in err and str(info) in err and "wrong ImageIDs" in err
    assert maker.out.read_bytes() == before  # the previous submission is left alone


def test_cli_refuses_unknown_study_or_storage(maker, tmp_path, capsys):
    assert main(["--study", "nope", "--storage", maker.storage]) == 2
    assert "no study named 'nope'" in one_line_error(capsys)
    missing = tmp_path / "missing.db"
    assert main(["--study", "t", "--storage", f"sqlite:///{missing}"]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert not missing.exists()


# ----------------------------------------------------------------------------- interrupted work


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def test_default_output_goes_inside_runs(maker, tmp_path, monkeypatch, capsys):
    """Without --out the files go to runs/<study>/ (--out is the user's explicit path)."""
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    maker.add_pair()
    assert main(["--study", "t", "--storage", maker.storage, "--artifacts",
                 str(maker.art)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "t").iterdir()) == [
        "submission.csv", "submission.json"]


def test_crash_mid_write_keeps_the_previous_files(maker, monkeypatch, capsys):
    """An error after the new bytes are written but before the rename: old files intact, whole,
    and no temp left behind."""
    maker.add_pair()
    assert maker.cli() == 0
    before = {p.name: p.read_bytes() for p in maker.out.parent.iterdir()}
    maker.add_pair()  # the next result differs (four trials)

    def crash(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", crash)
    capsys.readouterr()
    assert maker.cli("--top", "2") == 2  # a full disk is the user's to fix: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device writing ")
    after = {p.name: p.read_bytes() for p in maker.out.parent.iterdir()}
    assert after == before


KILLER = """
import os, sys, time
import search.ensemble.cli
def stall(fd):  # the new bytes are in the temp file; stop here until killed
    print("WRITING", flush=True)
    time.sleep(120)
os.fsync = stall
sys.exit(search.ensemble.cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_during_writing_leaves_the_previous_submission(maker, capsys):
    """SIGKILL while the submission is being written: the previous submission and JSON are
    untouched, and the next run removes the dead process's temp and writes new files."""
    maker.add_pair()
    assert maker.cli("--size", "1") == 0
    before = {p.name: p.read_bytes() for p in maker.out.parent.iterdir()}
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(  # `with` closes both pipes: no ResourceWarning
        [sys.executable, "-c", KILLER, "--study", "t", "--storage", maker.storage,
         "--artifacts", str(maker.art), "--out", str(maker.out)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as proc:
        try:
            assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert temps(maker.out.parent) == [f".submission.csv.{proc.pid}.tmp"]  # killed mid-write
    assert {p.name: p.read_bytes() for p in maker.out.parent.iterdir()
            if not p.name.endswith(".tmp")} == before
    assert maker.cli() == 0  # --size 20 now: a different report
    assert temps(maker.out.parent) == []
    assert maker.out.with_suffix(".json").read_bytes() != before["submission.json"]


class BreaksAfter:
    """A reader that yields ``n`` bytes, then fails (a dying upload source)."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n, self.pos = data, n, 0

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.n:
            raise OSError("connection reset")
        chunk = self.data[self.pos:self.n]
        self.pos = self.n
        return chunk


def test_interrupted_artifact_upload_leaves_no_artifact(tmp_path):
    """Optuna records an artifact's id before copying the bytes; an upload that dies half-way
    must leave that id pointing at nothing (not at a truncated file a reader would trust)."""
    store = artifacts.open_store(tmp_path / "art")
    with pytest.raises(OSError, match="reset"):
        store.write("a1", BreaksAfter(b"x" * 1000, 400))
    with pytest.raises(ArtifactNotFound):
        store.open_reader("a1")
    assert list((tmp_path / "art").iterdir()) == []
    store.write("a1", io.BytesIO(b"whole"))
    with store.open_reader("a1") as r:
        assert r.read() == b"whole"


def test_temps_of_killed_uploads_are_removed_by_the_next_write(tmp_path):
    art = tmp_path / "art"
    store = artifacts.open_store(art)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (art / f".a1.{int(dead.stdout)}.tmp").write_bytes(b"half")  # a SIGKILLed upload's temp
    alive = art / f".a2.{os.getpid()}.tmp"  # an upload still running in a live process
    alive.write_bytes(b"in progress")
    store.write("b", io.BytesIO(b"ok"))
    assert sorted(p.name for p in art.iterdir()) == [alive.name, "b"]


def test_ensemble_during_a_running_search_reads_finished_trials_only(maker, capsys):
    """A search still writing: one trial RUNNING with half its artifacts (OOF saved, no eval
    yet), one WAITING. The ensemble uses the finished trials and writes the same submission as
    without them."""
    maker.add_pair()
    assert maker.cli() == 0
    before = maker.out.read_bytes()
    running = maker.study.ask()
    for key, value in maker.fps.items():
        running.set_user_attr(key, value)
    artifacts.save_array(running, maker.store, OOF, np.eye(18, dtype=np.float32)[maker.labels])
    maker.study.enqueue_trial({})
    capsys.readouterr()
    assert maker.cli() == 0
    assert maker.out.read_bytes() == before
    members = {m["trial"] for m in json.loads(maker.out.with_suffix(".json").read_text())
               ["members"]}
    assert running.number not in members


def test_bench_ensemble_variants_replays_the_clis_decision(maker, tmp_path, capsys):
    """bench.ensemble_variants reads a study folder as bench.quality leaves it and replays the
    CLI's recipe: its default ensemble-minus-best figure is the one the CLI wrote, and the
    complementary pair's blend is far ahead of either half held out."""
    from bench import ensemble_variants

    maker.add_pair()
    maker.add(member(maker.labels, maker.labels % 3 == 0, 7),
              member(maker.answers, maker.answers % 3 == 0, 8))
    assert maker.cli("--no-gradcam") == 0
    fig = json.loads(maker.out.with_suffix(".json").read_text())["figures"]
    folder = tmp_path / "seed0"
    folder.mkdir()
    (folder / "study.db").symlink_to(maker.db)
    (folder / "artifacts").symlink_to(maker.art)
    capsys.readouterr()
    got = ensemble_variants.run([folder])
    default = got["variants"]["default"][0]
    assert default["ensemble - best"] == pytest.approx(
        fig["ensemble_eval_f1"] - fig["best_single_argmax_eval_f1"])
    assert default["ensemble - best"] > 0.05
    assert default["submission"] == pytest.approx(fig["submission_eval_f1"])
    assert "seed0 (3 trials)" in capsys.readouterr().out
    # --first 1: the study as of its first trial, whose ensemble can only be that trial
    first = ensemble_variants.run([folder], first=1)["variants"]["default"][0]
    assert first["ensemble - best"] == pytest.approx(0.0)
    assert "seed0 (1 trials)" in capsys.readouterr().out
    assert ensemble_variants.main([str(tmp_path / "nowhere")]) == 2
    assert "no study.db" in capsys.readouterr().err
