"""The final stage (``search.refit``) and the stage marks it relies on (``search.worker.stage``).

One module fixture runs a tiny demo search (3 trials, 3 folds, 1 epoch, real engine), refits its
2 best configurations, runs the refit again (nothing to do), then asks ``search.run`` for one
more trial; most tests read what it left. The kill test refits a copy of that study.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from core.labels import NUM_CLASSES
from search import artifacts, refit
from search import run as search_run
from search.artifacts import checkpoint_name, eval_fold_name, fold_done_attr, oof_fold_name
from search.ensemble import cli as ensemble
from search.study_settings import StudySettings, create_pruner
from search.worker import final_stage
from search.worker.claims import OWNER_ATTR, Claim, claim, claim_lock, retried_from
from search.worker.stage import (
    EPOCHS_ATTR,
    FINAL,
    REFIT_OF_ATTR,
    STAGE_ATTR,
    final_attrs,
    is_final,
)
from search.worker.storage import open_storage
from tests.conftest import FAST
from tests.test_distributed import FOLDS, _kill_mid_trial  # 3 folds: a kill lands mid-trial
from tests.test_search import fake_fit, fake_predict

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, TOP = 1, 2


pytestmark = pytest.mark.usefixtures("quiet_optuna")


def flags(url: str, art: Path) -> list[str]:
    return ["--study", "demo", "--storage", url, "--artifacts", str(art)]


def search_argv(url: str, art: Path, data: Path, trials: int) -> list[str]:
    return [*flags(url, art), "--data", str(data), "--trials", str(trials), "--folds",
            str(FOLDS), "--epochs", str(EPOCHS), "--pruner", "none", "--seed", "0",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def refitted(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """search.run (3 trials), refit --top 2, refit --top 2 again, search.run --trials 4."""
    root = tmp_path_factory.mktemp("refit")
    mp = pytest.MonkeyPatch()
    mp.setenv("MASK_SEARCH_RUNS", str(root / "runs"))
    url, art = f"sqlite:///{root / 'demo.db'}", root / "artifacts"
    study = optuna.create_study(study_name="demo", storage=url, direction="maximize")
    for _ in range(3):
        study.enqueue_trial(FAST)
    assert search_run.main(search_argv(url, art, tiny_data, 3)) == 0
    searched = [t.number for t in optuna.load_study(study_name="demo", storage=url).trials]
    outputs = []
    for _ in range(2):  # module fixtures cannot take capsys
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = refit.main([*flags(url, art), "--top", str(TOP), "--device", "cpu"])
        assert code == 0, out.getvalue()
        outputs.append(out.getvalue())
    assert search_run.main(search_argv(url, art, tiny_data, 4)) == 0
    yield SimpleNamespace(root=root, url=url, art=art, data=tiny_data, searched=searched,
                          outputs=outputs,
                          study=optuna.load_study(study_name="demo", storage=url))
    mp.undo()


@pytest.mark.slow
def test_refit_adds_final_trials_with_the_same_params_and_more_epochs(refitted) -> None:
    trials = refitted.study.trials
    search = sorted((t for t in trials if t.number in refitted.searched),
                    key=lambda t: (-t.value, t.number))
    finals = [t for t in trials if is_final(t)]
    assert [t.user_attrs[REFIT_OF_ATTR] for t in finals] == [t.number for t in search[:TOP]]
    for f in finals:
        origin = trials[f.user_attrs[REFIT_OF_ATTR]]
        assert f.state == TrialState.COMPLETE
        assert f.params == origin.params
        assert f.user_attrs[STAGE_ATTR] == FINAL and f.user_attrs[EPOCHS_ATTR] == 2 * EPOCHS
        assert f.user_attrs["config"] == {**origin.user_attrs["config"], "epochs": 2 * EPOCHS}
        assert f.user_attrs["epochs_trained"] == FOLDS * 2 * EPOCHS
        assert sorted(f.intermediate_values) == list(range(FOLDS * 2 * EPOCHS))  # the curve
        for key in ("data_fingerprint", "folds_fingerprint", "eval_fingerprint"):
            assert f.user_attrs[key] == origin.user_attrs[key]  # the same rows, folds, images
    assert "queued" in refitted.outputs[0]
    assert "python -m search.ensemble --study demo" in refitted.outputs[0]


@pytest.mark.slow
def test_the_ensemble_takes_the_final_trials_as_candidates(refitted) -> None:
    out = refitted.root / "out" / "submission.csv"
    assert ensemble.main([*flags(refitted.url, refitted.art), "--out", str(out),
                          "--no-gradcam"]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["candidates"] == len(refitted.study.trials)  # 4 search + 2 final trials
    store = artifacts.open_store(refitted.art)
    for f in (t for t in refitted.study.trials if is_final(t)):
        oof = artifacts.load_array(f, store, artifacts.OOF)
        assert oof.shape[1] == NUM_CLASSES
        np.testing.assert_allclose(oof.sum(axis=1), 1, atol=1e-4)


@pytest.mark.slow
def test_a_second_refit_refits_nothing_again(refitted) -> None:
    finals = [t for t in refitted.study.trials if is_final(t)]
    assert len(finals) == TOP  # the rerun queued none
    assert refitted.outputs[1].count("already refitted by trial") == TOP
    assert "queued" not in refitted.outputs[1]


@pytest.mark.slow
def test_search_run_trials_does_not_count_final_trials(refitted) -> None:
    """``--trials 4`` after 3 search and 2 final trials ran exactly one more search trial."""
    trials = refitted.study.trials
    search = [t for t in trials if not is_final(t)]
    assert [t.state for t in search] == [TrialState.COMPLETE] * 4
    assert len(trials) == 4 + TOP
    assert not is_final(trials[-1])


def _study(tmp_path: Path) -> tuple[optuna.Study, str]:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    return optuna.create_study(study_name="c", storage=open_storage(url),
                               direction="maximize"), url


def _add(study: optuna.Study, x: float, value: float, curve: dict[int, float] | None = None,
         **attrs) -> None:
    study.add_trial(create_trial(value=value, params={"x": x},
                                 distributions={"x": FloatDistribution(0, 1)},
                                 user_attrs=attrs, intermediate_values=curve or {}))


def test_a_search_worker_neither_counts_nor_claims_final_trials(tmp_path: Path) -> None:
    study, url = _study(tmp_path)
    lock = claim_lock(study._storage, url, "c")
    _add(study, 0.1, 0.5)
    _add(study, 0.2, 0.6)
    for origin in (0, 1):
        _add(study, 0.1 * (origin + 1), 0.9, **final_attrs(origin, 4))
    study.enqueue_trial({"x": 0.2}, user_attrs=final_attrs(1, 6))  # a queued final trial
    got = claim(study, 3, lock, max_retry=0)  # 2 of 3 search trials: room for one
    assert isinstance(got, optuna.Trial)
    assert not is_final(got)  # a new search trial; the queued final trial is left waiting
    assert [t.state for t in study.trials if is_final(t)][-1] == TrialState.WAITING
    study.tell(got, 0.7)
    assert claim(study, 3, lock, max_retry=0) is Claim.DONE  # 3 search trials, 5 complete
    assert "3 complete, 0 pruned, 0 failed (3 finished of 3 asked)" in search_run.summary(
        study, 1.0, 3)
    final = claim(study, 3, lock, max_retry=0, stage=FINAL)
    assert isinstance(final, optuna.Trial) and is_final(final)
    assert claim(study, 3, lock, max_retry=0, stage=FINAL) is Claim.WAIT  # it may die: wait
    study.tell(final, 0.95)
    assert claim(study, 3, lock, max_retry=0, stage=FINAL) is Claim.DONE  # its queue is empty


def test_search_trials_are_pruned_against_search_trials_only() -> None:
    """Median pruning at a step compares the search's trials at that step: three final trials
    (longer curves, so step 1 is another epoch) would have pruned a trial the search keeps."""
    study = optuna.create_study(direction="maximize")
    for x in (0.1, 0.2, 0.3):
        _add(study, x, 0.5, {0: 0.4, 1: 0.5})
    for origin in range(3):
        _add(study, 0.1, 0.9, {0: 0.8, 1: 0.9, 2: 0.95}, **final_attrs(origin, 3))
    running = study.ask()
    running.report(0.55, 0)
    running.report(0.6, 1)
    frozen = study._storage.get_trial(running._trial_id)
    assert optuna.pruners.MedianPruner(n_warmup_steps=1).prune(study, frozen)  # what it avoids
    pruner = create_pruner("median", n_steps=6, n_folds=3)
    assert not pruner.prune(study, frozen)
    weak_final = study.ask()
    weak_final.set_user_attr(STAGE_ATTR, FINAL)
    weak_final.report(0.0, 1)
    assert not pruner.prune(study, study._storage.get_trial(weak_final._trial_id))


def test_a_final_trial_trains_its_own_epochs_and_is_never_pruned(study_data,
                                                                 tmp_path: Path) -> None:
    """A pruner that prunes everything stops the search trial at its first epoch; the final
    trial trains all its epochs in every fold and completes."""
    from search.objective import Objective
    from studies import demo

    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study.enqueue_trial(FAST, user_attrs=final_attrs(0, 3))
    study.enqueue_trial(FAST)
    seen: list[int] = []
    base = fake_fit(seen)

    def fit(cfg, *args, on_epoch, **kwargs):  # says it stopped early, as fit_fold does
        asked: list[bool] = []
        result = base(cfg, *args, on_epoch=lambda e, v: asked.append(on_epoch(e, v)) or
                      asked[-1], **kwargs)
        result.stopped_early = any(asked)
        return result

    obj = Objective(demo, study_data, artifacts.open_store(tmp_path / "a"),
                    StudySettings.of(study_data, 1), fit=fit, predict_fn=fake_predict)
    study.optimize(obj, n_trials=2)
    final, search = study.trials
    assert final.state == TrialState.COMPLETE and search.state == TrialState.PRUNED
    assert final.user_attrs["config"]["epochs"] == 3
    assert seen == [0, 1, 2] * study_data.n_folds + [0]
    assert sorted(final.intermediate_values) == list(range(3 * study_data.n_folds))


def test_a_failed_final_trial_is_queued_again_as_its_retry_and_a_config_once(
        tmp_path: Path) -> None:
    """Ctrl-C (or an error) left a final trial FAIL with a finished fold: the next refit queues
    its retry, which resumes that fold (the objective's retry path), not a fresh trial; two
    search trials with the same params are one configuration."""
    study, _ = _study(tmp_path)
    study.set_user_attr("n_folds", 2)
    for value in (0.6, 0.6, 0.5):  # trials 0 and 1: the same params
        _add(study, 0.5 if value == 0.6 else 0.2, value, fold_f1=[value] * 2)
    study.add_trial(create_trial(state=TrialState.FAIL, params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)},
                                 user_attrs={**final_attrs(0, 4), fold_done_attr(0): {"f1": 0.6}}))
    chosen = final_stage.best_configurations(study, 2)
    lines = final_stage.queue_final(study, chosen, 4)
    assert [t.number for t in chosen] == [0, 2]
    assert "queued again as its retry" in lines[0] and lines[1].endswith("queued")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [retried_from(t) for t in waiting] == [3, None]
    assert all(is_final(t) and t.user_attrs[EPOCHS_ATTR] == 4 for t in waiting)
    assert waiting[0].user_attrs[fold_done_attr(0)] == {"f1": 0.6}  # what the retry resumes
    again = final_stage.queue_final(study, chosen, 4)
    assert all("already queued" in line for line in again)
    assert len(study.trials) == 6


def _one_line_error(capfd) -> str:
    out, err = capfd.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    return err


def test_refit_refuses_a_study_without_a_complete_trial_in_one_line(tmp_path: Path,
                                                                     capfd) -> None:
    study, url = _study(tmp_path)
    study.add_trial(create_trial(state=TrialState.PRUNED, params={}, distributions={}))
    argv = ["--study", "c", "--storage", url, "--artifacts", str(tmp_path / "art")]
    assert refit.main(argv) == 2
    assert "study 'c' has no complete trial yet" in _one_line_error(capfd)
    missing = tmp_path / "none.db"
    assert refit.main(["--study", "demo", "--storage", f"sqlite:///{missing}",
                       "--artifacts", str(tmp_path / "art")]) == 2
    assert "does not exist" in _one_line_error(capfd)
    assert not missing.exists()  # nothing created


def test_refit_flag_mistakes_are_one_line(capfd) -> None:
    with pytest.raises(SystemExit) as exit_info:
        refit.main([])
    assert exit_info.value.code == 2
    assert _one_line_error(capfd) == ("error: the following arguments are required: --study "
                                      "(python -m search.refit --help lists the flags)\n")


@pytest.mark.slow
def test_a_refit_killed_mid_trial_resumes_its_folds_when_run_again(refitted,
                                                                   tmp_path: Path) -> None:
    """SIGKILL the refit while its final trial is between folds; the same command again finds
    the trial dead, runs its retry from the finished folds, and queues nothing twice."""
    db = tmp_path / "demo.db"
    shutil.copy(refitted.root / "demo.db", db)
    art = Path(shutil.copytree(refitted.art, tmp_path / "artifacts"))
    url, epochs = f"sqlite:///{db}", 4
    argv = [*flags(url, art), "--top", "1", "--epochs", str(epochs), "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MASK_SEARCH_RUNS": str(tmp_path / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "search.refit", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _kill_mid_trial(proc, url)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert is_final(killed) and killed.user_attrs[OWNER_ATTR]["pid"] == proc.pid
    rerun = subprocess.run([sys.executable, "-m", "search.refit", *argv], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already queued" in rerun.stdout  # the retry reap queued, not a second trial

    trials = optuna.load_study(study_name="demo", storage=url).trials
    mine = [t for t in trials if is_final(t) and t.user_attrs[EPOCHS_ATTR] == epochs]
    dead, retry = mine  # the killed trial and its one retry, nothing else
    assert dead.number == killed.number and dead.state == TrialState.FAIL
    assert retry.state == TrialState.COMPLETE and retried_from(retry) == dead.number
    assert retry.params == dead.params
    done = [k for k in range(FOLDS) if fold_done_attr(k) in dead.user_attrs]
    assert done and done == list(range(len(done))) and len(done) < FOLDS
    assert retry.user_attrs["resumed_folds"] == done
    for k in done:
        for name in (oof_fold_name(k), eval_fold_name(k), checkpoint_name(k)):
            assert retry.user_attrs[artifacts.attr_name(name)] == \
                dead.user_attrs[artifacts.attr_name(name)]
    assert retry.user_attrs["epochs_trained"] == (FOLDS - len(done)) * epochs
    assert sorted(retry.intermediate_values) == list(range(FOLDS * epochs))
