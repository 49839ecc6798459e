"""The search driver end to end on tiny synthetic data with the real engine.

One module fixture runs ``search.run`` twice (``--trials 2`` then ``--trials 3``) on the demo
study; most tests read what it left. Trials are enqueued with fixed small settings (the
fastest backbone, the smallest input) so the test time does not depend on the sampler.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from core.atomic import file_lock
from core.errors import DataError
from core.fingerprints import eval_fingerprint
from core.labels import CLASS_NAMES, NUM_CLASSES
from core.loader import RowView
from search import artifacts
from search.artifacts import CLASS_F1, CONFUSION, EVAL, OOF, checkpoint_name
from search.objective import Objective
from search.run import main
from search.study_settings import StudySettings
from search.worker.claims import retry_callback
from search.worker.retention import CheckpointRetention
from tests.conftest import FAST, STUDY_DATA_FOLDS

ROOT = Path(__file__).resolve().parents[1]
FOLDS, EPOCHS = STUDY_DATA_FOLDS, 2


def enqueue(url: str, name: str, n: int, **override) -> None:
    """Pre-create the study and queue ``n`` trials with the fast fixed settings."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize",
                                load_if_exists=True)
    for _ in range(n):
        study.enqueue_trial({**FAST, **override})


def args(name: str, url: str, art: Path, data: Path, trials: int, *extra: str) -> list[str]:
    return ["--study", name, "--storage", url, "--artifacts", str(art), "--data", str(data),
            "--trials", str(trials), "--folds", str(FOLDS), "--epochs", str(EPOCHS),
            "--seed", "0", *extra]


@pytest.fixture(scope="module")
def demo_run(tiny_data: Path, study_data, tmp_path_factory: pytest.TempPathFactory):
    """``--trials 2`` then ``--trials 3`` on one demo study, keeping checkpoints of the best 2."""
    root = tmp_path_factory.mktemp("run")
    url, art = f"sqlite:///{root / 'demo.db'}", root / "artifacts"
    enqueue(url, "demo", 3)
    common = ("--pruner", "none", "--keep-checkpoints", "2")
    assert main(args("demo", url, art, tiny_data, 2, *common)) == 0
    first = {t.number for t in optuna.load_study(study_name="demo", storage=url).trials
             if t.state.is_finished()}
    assert main(args("demo", url, art, tiny_data, 3, *common)) == 0
    study = optuna.load_study(study_name="demo", storage=url)
    return SimpleNamespace(url=url, art=art, study=study, first=first,
                           store=artifacts.open_store(art),
                           data=study_data)


@pytest.mark.slow
def test_trials_two_then_three_leaves_exactly_three(demo_run) -> None:
    trials = demo_run.study.trials
    assert demo_run.first == {0, 1}
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3  # no replays
    attrs = demo_run.study.user_attrs
    assert (attrs["n_folds"], attrs["epochs"], attrs["fold_seed"]) == (FOLDS, EPOCHS, 0)
    assert attrs["study_module"] == "studies.demo"


@pytest.mark.slow
def test_artifacts_have_the_right_shapes(demo_run) -> None:
    data, store = demo_run.data, demo_run.store
    n_train, n_eval = len(data.table), len(data.eval_table)
    for t in demo_run.study.trials:
        oof = artifacts.load_array(t, store, OOF)
        ev = artifacts.load_array(t, store, EVAL)
        assert oof.shape == (n_train, NUM_CLASSES) and oof.dtype == np.float32
        assert ev.shape == (n_eval, NUM_CLASSES)
        np.testing.assert_allclose(oof.sum(axis=1), 1, atol=1e-4)
        np.testing.assert_allclose(ev.sum(axis=1), 1, atol=1e-4)
        # the value is macro F1 of ALL out-of-fold predictions against the TRUE labels
        from core.engine import macro_f1

        assert t.value == pytest.approx(macro_f1(data.labels, oof))
        assert len(t.user_attrs["fold_f1"]) == FOLDS
        assert all(f"fold_done_{k}" in t.user_attrs for k in range(FOLDS))
        assert t.user_attrs["images_per_s"] > 0
        assert t.user_attrs["config"]["backbone"] == "test_resnet"
        assert t.user_attrs["eval_fingerprint"] == eval_fingerprint(data.eval_table)
        png = demo_run.art / "confusion.png"
        artifacts.load_file(t, store, CONFUSION, png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()
        js = demo_run.art / "class_f1.json"
        artifacts.load_file(t, store, CLASS_F1, js)
        assert list(json.loads(js.read_text())) == list(CLASS_NAMES)
        js.unlink()


@pytest.mark.slow
def test_every_epoch_is_reported_once_at_its_own_step(demo_run) -> None:
    for t in demo_run.study.trials:
        assert sorted(t.intermediate_values) == list(range(FOLDS * EPOCHS))
        assert t.user_attrs["epochs_trained"] == FOLDS * EPOCHS


@pytest.mark.slow
def test_checkpoints_are_kept_for_the_best_k_only(demo_run) -> None:
    ranked = sorted(demo_run.study.trials, key=lambda t: (-t.value, t.number))
    for rank, t in enumerate(ranked):
        for k in range(FOLDS):
            dest = demo_run.art / f"ckpt_{t.number}_{k}.pt"
            if rank < 2:
                artifacts.load_file(t, demo_run.store, checkpoint_name(k), dest)
                state = torch.load(dest, weights_only=True)
                assert state and all(isinstance(v, torch.Tensor) for v in state.values())
                dest.unlink()
            else:
                with pytest.raises(DataError, match="removed"):
                    artifacts.load_file(t, demo_run.store, checkpoint_name(k), dest)
        assert artifacts.load_array(t, demo_run.store, OOF).shape[1] == NUM_CLASSES


@pytest.mark.slow
def test_a_rerun_with_other_folds_is_refused(demo_run, tiny_data: Path, capsys) -> None:
    argv = args("demo", demo_run.url, demo_run.art, tiny_data, 4, "--pruner", "none")
    argv[argv.index("--folds") + 1] = "3"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "n_folds=2" in err and "--folds" in err and len(err.splitlines()) == 1
    assert len(optuna.load_study(study_name="demo", storage=demo_run.url).trials) == 3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Fixed parameter lr:UserWarning")  # absurd on purpose
def test_diverging_trial_is_pruned(demo_run, tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({**FAST, "lr": 1e6})
    obj = Objective(__import__("studies.demo", fromlist=["x"]), demo_run.data,
                    artifacts.open_store(tmp_path / "a"), StudySettings.of(demo_run.data, EPOCHS))
    study.optimize(obj, n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["epochs_trained"] < FOLDS * EPOCHS
    assert "pruned_because" in t.user_attrs


@pytest.mark.slow
def test_the_pruner_stops_training_after_the_first_bad_epoch(demo_run, tmp_path: Path) -> None:
    """A pruner saying 'prune' at step 0 ends the trial after one epoch, checkpoints dropped."""
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study.enqueue_trial(FAST)
    obj = Objective(__import__("studies.demo", fromlist=["x"]), demo_run.data,
                    artifacts.open_store(tmp_path / "a"), StudySettings.of(demo_run.data, EPOCHS))
    study.optimize(obj, n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED
    assert list(t.intermediate_values) == [0]
    assert t.user_attrs["epochs_trained"] == 1


def fake_fit(epochs_seen: list):
    """A stand-in for ``fit_fold`` that reports a fixed curve (plumbing tests only)."""
    from core.engine import FoldResult

    def fit(cfg, tr_x, tr_y, va_x, va_y, on_epoch=None, progress=False):
        # the objective hands views on the cache's memmap, never copies of the fold's images
        assert isinstance(tr_x, RowView) and isinstance(va_x, RowView)
        history = []
        for e in range(cfg.epochs):
            history.append({"epoch": e, "val_f1": 0.1 * (e + 1), "images_per_s": 1.0})
            epochs_seen.append(e)
            if on_epoch and on_epoch(e, 0.1 * (e + 1)):
                break
        probs = np.full((len(va_x), NUM_CLASSES), 1 / NUM_CLASSES, np.float32)
        return FoldResult(best_f1=0.1, best_epoch=0, history=history, val_probs=probs,
                          state_dict={"w": torch.zeros(1)}, selected_epoch=len(history) - 1,
                          selected_f1=history[-1]["val_f1"])

    return fit


def fake_predict(state_dict, cfg, images):
    assert isinstance(images, RowView)  # the eval set is not copied per trial either
    return np.full((len(images), NUM_CLASSES), 1 / NUM_CLASSES, np.float32)


def test_wilcoxon_mode_reports_one_value_per_fold(study_data, tmp_path: Path) -> None:
    seen: list = []
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(FAST)
    obj = Objective(__import__("studies.demo", fromlist=["x"]), study_data,
                    artifacts.open_store(tmp_path / "a"),
                    StudySettings.of(study_data, 3, per_fold=True),
                    fit=fake_fit(seen), predict_fn=fake_predict)
    study.optimize(obj, n_trials=1)
    assert sorted(study.trials[0].intermediate_values) == list(range(FOLDS))
    assert len(seen) == 3 * FOLDS
    # each fold counts with its SELECTED epoch's score (the last, 0.3), not its best_f1 (0.1)
    assert study.trials[0].user_attrs["fold_f1"] == pytest.approx([0.3] * FOLDS)
    assert list(study.trials[0].intermediate_values.values()) == pytest.approx([0.3] * FOLDS)


@pytest.mark.parametrize("flags", [{}, {"storage": "postgresql://u@db host:5432/mask",
                                           "artifacts": "s3://bucket/mask"}])
def test_summary_ends_with_the_next_commands_for_this_study(flags: dict) -> None:
    """The last two lines are the dashboard and ensemble commands, carrying exactly the
    non-default flags, and each parses with that CLI's own parser to the same study."""
    from search import dashboard
    from search.ensemble import cli as ensemble
    from search.run import summary

    study = optuna.create_study(study_name="mine", direction="maximize")
    last = summary(study, 1.0, 5, **flags).splitlines()[-2:]
    commands = (("search.dashboard", dashboard), ("search.ensemble", ensemble))
    for line, (name, cli) in zip(last, commands, strict=True):
        head, _, command = line.partition("python -m ")
        module, *argv = shlex.split(command)
        assert module == name  # search.ensemble's parser is in search.ensemble.cli
        parsed = cli.build_parser().parse_args(argv)
        assert (parsed.study, parsed.storage, parsed.artifacts) == (
            "mine", flags.get("storage"), flags.get("artifacts"))


def test_cli_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))
    assert main(["--study", "nope", "--trials", "1"]) == 2
    assert "known studies: demo, mask" in capsys.readouterr().err
    assert main(["--study", "../evil", "--trials", "1"]) == 2
    assert "study name" in capsys.readouterr().err
    assert main(["--study", "demo", "--trials", "1", "--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            main(["--study", "demo", "--trials", bad])
        assert e.value.code == 2
    assert "--trials" in capsys.readouterr().err


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "search.run", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tiny_data: Path, tmp_path: Path) -> None:
    url, art = f"sqlite:///{tmp_path / 'two.db'}", tmp_path / "art"
    enqueue(url, "demo", 4, image_size="48x32")
    argv = args("demo", url, art, tiny_data, 2, "--pruner", "none")
    argv[argv.index("--epochs") + 1] = "1"
    procs = [subprocess.Popen(_cli(*argv), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "locked" not in err
    trials = optuna.load_study(study_name="demo", storage=url).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2  # --trials is the total, also with several processes
    stuck = [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials
             if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert not stuck, (stuck, [err[-1500:] for _out, err in outs])  # seen once under load
    assert len({t.number for t in trials}) == len(trials)


@pytest.mark.slow
def test_ctrl_c_fails_the_running_trial_and_prints_the_summary(tiny_data: Path,
                                                               tmp_path: Path) -> None:
    url, art = f"sqlite:///{tmp_path / 'int.db'}", tmp_path / "art"
    enqueue(url, "demo", 3)
    argv = args("demo", url, art, tiny_data, 3, "--pruner", "none")
    argv[argv.index("--epochs") + 1] = "50"
    argv[argv.index("--folds") + 1] = "2"
    proc = subprocess.Popen(_cli(*argv), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    study = optuna.load_study(study_name="demo", storage=url)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        running = study.get_trials(states=(TrialState.RUNNING,))
        if running and running[0].intermediate_values:  # inside fold training
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "wall time" in out and "interrupted" in err
    states = [t.state for t in optuna.load_study(study_name="demo", storage=url).trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.FAIL) == 1


def test_checkpoint_retention_frees_failed_trials_unless_a_retry_needs_them(tmp_path) -> None:
    store = artifacts.open_store(tmp_path / "a")
    study = optuna.create_study(direction="maximize")
    keeper = CheckpointRetention(store, keep=1)

    def with_checkpoint(trial, fold: int = 0) -> str:
        return artifacts.save_array(trial, store, checkpoint_name(fold), np.zeros(2))

    def present(artifact_id: str) -> bool:
        return (tmp_path / "a" / artifact_id).exists()

    best, worse, origin, lost = (study.ask() for _ in range(4))
    ids = {name: with_checkpoint(t) for name, t in
           (("best", best), ("worse", worse), ("origin", origin), ("lost", lost))}
    study.tell(best, 0.9)
    study.tell(worse, 0.5)
    study.tell(origin, state=TrialState.FAIL)
    study.tell(lost, state=TrialState.FAIL)
    # a waiting retry of `origin` inheriting its attrs (as RetryFailedTrialCallback makes it)
    study.enqueue_trial({}, user_attrs=study.trials[origin.number].user_attrs)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    study._storage.set_trial_system_attr(waiting._trial_id, "failed_trial", origin.number)

    keeper(study, study.trials[worse.number])
    assert present(ids["best"]) and present(ids["origin"])
    assert not present(ids["worse"]) and not present(ids["lost"])

    retry = study.ask()  # the retry runs, then dies for good: nothing refers to the fold now
    assert retry.number == waiting.number
    study.tell(retry, state=TrialState.FAIL)
    keeper(study, study.trials[retry.number])
    assert present(ids["best"]) and not present(ids["origin"])


def test_retention_waits_for_a_reaper_between_failing_a_trial_and_queueing_its_retry(
        tmp_path) -> None:
    """The reaper writes FAIL, then the retry, under the claim lock. Retention run by another
    worker in between must not take the dead trial's saved fold (its retry resumes from it):
    this once failed the PostgreSQL kill test with 'checkpoint_fold0 is not in the store'."""
    store = artifacts.open_store(tmp_path / "a")
    study = optuna.create_study(direction="maximize")
    dead = study.ask()
    saved = artifacts.save_array(dead, store, checkpoint_name(0), np.zeros(2))
    lock = functools.partial(file_lock, tmp_path / "claim.lock")
    failed = threading.Event()

    def reaper() -> None:  # what ``claims.reap`` does for a dead owner, slowed between writes
        with lock():
            study._storage.set_trial_state_values(dead._trial_id, state=TrialState.FAIL)
            failed.set()
            time.sleep(0.5)
            retry_callback(None)(study, study._storage.get_trial(dead._trial_id))

    thread = threading.Thread(target=reaper)
    thread.start()
    assert failed.wait(10)
    CheckpointRetention(store, keep=1, lock=lock)(study, study.trials[dead.number])
    thread.join()
    assert (tmp_path / "a" / saved).exists()
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs[artifacts.attr_name(checkpoint_name(0))] == saved


def test_a_pruned_trial_drops_every_checkpoint_it_holds(tmp_path) -> None:
    store = artifacts.open_store(tmp_path / "a")
    trial = optuna.create_study().ask()
    saved = [artifacts.save_array(trial, store, checkpoint_name(k), np.zeros(2)) for k in (0, 2)]
    with pytest.raises(optuna.TrialPruned, match="pruner at fold 1"):  # fold 2 inherited
        Objective(None, None, store, None)._prune(trial, "pruner at fold 1, epoch 0")
    assert trial.user_attrs["pruned_because"] == "pruner at fold 1, epoch 0"
    assert not any((tmp_path / "a" / i).exists() for i in saved)
    assert not any(trial.user_attrs[artifacts.attr_name(checkpoint_name(k))] for k in (0, 2))
