"""``search.run``'s promised flags through its ``main``, with a stand-in for training (the
objective and everything around it are real): ``--sampler``, ``--loader-workers`` and its
default, ``--max-retry``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

import search.run
import search.worker.budget
from search.objective import Objective
from search.worker.claims import OWNER_ATTR, claim, claim_lock, retried_from
from search.worker.storage import open_storage
from studies import demo
from tests.test_objective import RecordingFit, uniform_predict


@pytest.fixture(autouse=True)
def _runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path / "runs"))


@pytest.fixture
def fit(monkeypatch: pytest.MonkeyPatch) -> RecordingFit:
    """search.run's objective with a stand-in ``fit``/``predict`` (no training), and no
    confusion-matrix picture drawn (seconds per trial on a busy CPU; an empty file instead)."""
    fit = RecordingFit()
    monkeypatch.setattr("search.objective.confusion_png",
                        lambda labels, pred, path, title: Path(path).write_bytes(b""))

    def objective(*args, **kwargs) -> Objective:
        return Objective(*args, **kwargs, fit=fit, predict_fn=uniform_predict)

    monkeypatch.setattr(search.run, "Objective", objective)
    return fit


def url_in(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'demo.db'}"


def run_demo(folder: Path, data: Path, *extra: str) -> int:
    """``python -m search.run --study demo`` on ``data``, 2 folds x 1 epoch, storage in folder."""
    return search.run.main(["--study", "demo", "--storage", url_in(folder), "--artifacts",
                            str(folder / "art"), "--data", str(data), "--folds", "2",
                            "--epochs", "1", "--no-warm-start", *extra])


# ----------------------------------------------------------------------------- --sampler


@pytest.mark.parametrize(("flags", "kind"), [
    ((), optuna.samplers.TPESampler),
    (("--sampler", "tpe"), optuna.samplers.TPESampler),
    (("--sampler", "random"), optuna.samplers.RandomSampler),
    (("--sampler", "gp"), optuna.samplers.GPSampler),
])
def test_sampler_flag_picks_the_search_s_sampler(flags, kind, tiny_data, tmp_path, monkeypatch,
                                                 capsys):
    seen = []

    def search_here(run, loader_workers):  # where the trials would run: look, run none
        seen.append(run.study.sampler)
        return True

    monkeypatch.setattr(search.run, "search_here", search_here)
    assert run_demo(tmp_path, tiny_data, "--trials", "1", *flags) == 0
    capsys.readouterr()
    assert len(seen) == 1 and type(seen[0]) is kind


@pytest.mark.filterwarnings("ignore:PartialFixedSampler is experimental")
def test_random_sampler_with_a_seed_is_that_seeded_random_search(fit, tiny_data, tmp_path,
                                                                 capsys):
    """(One image size pinned, so one image cache serves every trial.)"""
    assert run_demo(tmp_path, tiny_data, "--trials", "3", "--sampler", "random",
                    "--seed", "5", "--fix", "image_size=48x32") == 0
    capsys.readouterr()
    got = [t.params for t in optuna.load_study(study_name="demo",
                                               storage=url_in(tmp_path)).trials]
    reference = optuna.create_study(sampler=optuna.samplers.PartialFixedSampler(
        {"image_size": "48x32"}, optuna.samplers.RandomSampler(seed=5)))
    for _ in range(3):
        trial = reference.ask()
        demo.space(trial)
        reference.tell(trial, 0.0)
    assert got == [t.params for t in reference.trials]


# ----------------------------------------------------------------------------- --loader-workers


@pytest.mark.parametrize(("flags", "cores", "expected"), [
    (("--device", "cpu", "--loader-workers", "5"), 8, 5),  # asked: used as asked
    (("--device", "cuda", "--loader-workers", "0"), 8, 0),
    (("--device", "cpu"), 8, 0),  # the default on the CPU: none
    (("--device", "cuda"), 8, 7),  # on CUDA: cores - 1 ...
    (("--device", "cuda"), 32, 12),  # ... at most 12
    (("--device", "cuda"), 1, 0),
])
def test_loader_workers_reach_training(flags, cores, expected, fit, tiny_data, tmp_path,
                                       monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert run_demo(tmp_path, tiny_data, "--trials", "1", *flags) == 0
    capsys.readouterr()
    assert [cfg.num_workers for cfg in fit.configs] == [expected, expected]  # both folds


@pytest.mark.parametrize(("flags", "cores", "expected"), [
    (("--workers", "3", "--device", "cuda"), 8, 1),  # each process: 8 // 3 - 1
    (("--gpus", "0,1"), 16, 7),  # one process per GPU: 16 // 2 - 1
    (("--gpus", "0,1,2,3"), 64, 12),  # 64 // 4 - 1 = 15, at most 12
    (("--workers", "2", "--loader-workers", "3"), 64, 3),
])
def test_each_worker_process_gets_its_share_of_loader_workers(flags, cores, expected, tiny_data,
                                                              tmp_path, monkeypatch, capsys):
    started = []

    def launch(argvs, envs):
        started.extend(argvs)
        return [0] * len(argvs)

    monkeypatch.setattr(search.run, "launch", launch)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a GPU machine
    run_demo(tmp_path, tiny_data, "--trials", "1", *flags)
    capsys.readouterr()
    assert started and all(argv[argv.index("--loader-workers") + 1] == str(expected)
                           for argv in started)


# ----------------------------------------------------------------------------- --max-retry


def _dead_owner() -> dict:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return {"host": socket.gethostname(), "pid": gone.pid, "start": None}


def _a_trial_that_killed_its_worker_twice(url: str) -> tuple[int, int]:
    """A study whose trial A died with its worker and whose retry B is dying the same way
    (RUNNING, owner gone): (A, B)."""
    storage = open_storage(url)
    study = optuna.create_study(study_name="demo", storage=storage, direction="maximize")
    first = study.ask()
    first.set_user_attr(OWNER_ATTR, _dead_owner())
    retry = claim(study, 10, claim_lock(storage, url, "demo"), max_retry=5)  # reaps A, runs B
    assert isinstance(retry, optuna.Trial) and retried_from(retry) == first.number
    retry.set_user_attr(OWNER_ATTR, _dead_owner())
    return first.number, retry.number


@pytest.mark.parametrize(("max_retry", "attempts"), [(1, 2), (2, 3)])
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the test's own ask()
def test_max_retry_bounds_the_attempts_of_a_trial_that_kills_its_worker(
        max_retry, attempts, fit, tiny_data, tmp_path, capsys) -> None:
    """A trial is tried at most 1 + --max-retry times; then it stays FAIL and the search goes on
    to N finished trials with new ones."""
    url = url_in(tmp_path)
    first, second = _a_trial_that_killed_its_worker_twice(url)
    assert run_demo(tmp_path, tiny_data, "--trials", "2", "--max-retry", str(max_retry)) == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name="demo", storage=url).trials
    chain = [t for t in trials if t.number == first or retried_from(t) == first]
    assert len(chain) == attempts
    assert [t.state for t in trials if t.number in (first, second)] == [TrialState.FAIL] * 2
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 2
    assert TrialState.RUNNING not in {t.state for t in trials}
    assert TrialState.WAITING not in {t.state for t in trials}


# ----------------------------------------------------------------------------- fixed settings


@pytest.fixture
def first_run(fit, tiny_data: Path, tmp_path: Path, capfd) -> Path:
    """A demo study made by one run (2 folds, 1 epoch, the data's corrections file)."""
    assert run_demo(tmp_path, tiny_data, "--trials", "1") == 0
    capfd.readouterr()
    return tmp_path


@pytest.mark.parametrize(("flags", "said"), [
    (("--epochs", "2"), "epochs=1; --epochs 2"),
    (("--corrections", "none"), "corrections='{data}/corrections.csv'; --corrections None"),
])
def test_a_rerun_with_other_epochs_or_corrections_is_refused(flags, said, first_run, tiny_data,
                                                             capfd):
    """Its trials would not be comparable with the study's: one line, exit 2, nothing stored."""
    before = optuna.load_study(study_name="demo", storage=url_in(first_run)).user_attrs
    assert run_demo(first_run, tiny_data, "--trials", "2", *flags) == 2
    said = said.format(data=tiny_data.resolve())
    assert capfd.readouterr().err == (
        f"error: study 'demo' was created with {said} would make its trials incomparable "
        "(use a new --study name, or drop the flag)\n")
    study = optuna.load_study(study_name="demo", storage=url_in(first_run))
    assert len(study.trials) == 1 and study.user_attrs == before


def test_a_rerun_keeps_the_study_s_fold_seed(first_run, tiny_data, study_data, monkeypatch,
                                             capfd):
    """The demo study's FOLD_SEED changed since the study was made (a new version, say): its
    later trials still see the folds its first trial saw, so their OOF rows line up."""
    from core.splits import person_folds

    assert not (person_folds(study_data.table, 2, seed=7) == study_data.folds).all()  # teeth
    monkeypatch.setattr(demo, "FOLD_SEED", 7)
    assert run_demo(first_run, tiny_data, "--trials", "2") == 0
    capfd.readouterr()
    study = optuna.load_study(study_name="demo", storage=url_in(first_run))
    assert study.user_attrs["fold_seed"] == 0
    prints = [t.user_attrs["folds_fingerprint"] for t in study.trials]
    assert len(prints) == 2 and prints[0] == prints[1]


# ----------------------------------------------------------------------------- --hours / --timeout


@pytest.mark.parametrize("flags", [("--timeout", "100"), ("--hours", str(100 / 3600))])
def test_the_time_budget_stops_the_run_at_an_epoch_and_the_summary_says_so(
        flags, fit, tiny_data, tmp_path, monkeypatch, capsys) -> None:
    """Every epoch costs 30 s of a 100 s budget (a fake clock): trial 0 ends at 60 s; trial 1
    can still start (trials take well under the 40 s left), passes the deadline in its second
    fold's epoch (120 s) and stops there, FAIL 'time budget' and queued for a rerun; no third
    trial starts; the summary says so."""
    clock = [1000.0]
    monkeypatch.setattr(search.worker.budget, "time", SimpleNamespace(time=lambda: clock[0]))

    def epoch_costs_30_s(fold: int, epoch: int) -> float:
        clock[0] += 30
        return 0.5

    fit.curve = epoch_costs_30_s
    assert run_demo(tmp_path, tiny_data, "--trials", "5", "--final", "0", *flags) == 0
    out = capsys.readouterr().out.splitlines()
    trials = optuna.load_study(study_name="demo", storage=url_in(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["error"] == "time budget"
    assert len(fit.configs) == 4 and clock[0] == 1120  # no epoch after the deadline's
    assert "time budget reached: no trial left that can finish in time; rerun with more --hours " \
           "to continue (a stopped trial resumes from its finished folds)" in out
    assert "trials     1 complete, 0 pruned, 1 failed (1 finished of 5 asked)" in out


@pytest.mark.parametrize(("final", "search_trials", "final_trials"),
                         [("1", 3, 1), ("0", 5, 0)])
def test_hours_keep_time_for_the_final_stage_and_use_the_rest(
        final, search_trials, final_trials, fit, tiny_data, tmp_path, monkeypatch,
        capsys) -> None:
    """A 310 s budget, every epoch 30 s of a fake clock, a search trial 2 folds x 1 epoch (60 s)
    and a final trial twice the epochs (120 s). ``--final 1`` keeps 120 s: search trials start
    while 60 s fit beside the reserve (t = 0, 60, 120), then the best configuration is
    retrained (t = 180..300); ``--final 0`` spends it all on search trials (t = 0..300). Both
    end with 10 s left, less than anything takes: 97% of the budget used."""
    clock = [1000.0]
    monkeypatch.setattr(search.worker.budget, "time", SimpleNamespace(time=lambda: clock[0]))
    # the record a real run would have: search trials take 60 s (trial datetimes are real time)
    monkeypatch.setattr(search.worker.budget.Budget, "expected_trial_s", lambda self, study: 60.0)

    def epoch_costs_30_s(fold: int, epoch: int) -> float:
        clock[0] += 30
        return 0.5

    fit.curve = epoch_costs_30_s
    assert run_demo(tmp_path, tiny_data, "--trials", "10", "--timeout", "310",
                    "--final", final) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="demo", storage=url_in(tmp_path))
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    finals = [t for t in done if t.user_attrs.get("stage") == "final"]
    assert len(done) - len(finals) == search_trials and len(finals) == final_trials
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * len(done)  # none cut
    assert clock[0] - 1000 == 300
    if finals:
        assert finals[0].user_attrs["refit_of"] == 0 and finals[0].user_attrs["refit_epochs"] == 2
        assert [c.epochs for c in fit.configs[-2:]] == [2, 2]
        assert "final stage: the 1 best configuration(s) at 2 epochs per fold" in out
