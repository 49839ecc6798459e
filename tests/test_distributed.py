"""Several workers on one study, against a real PostgreSQL server and the journal file storage.

The kill tests start ``search.run --workers 3`` on a tiny demo study, SIGKILL one worker after
its trial finished a fold, and check what users rely on: the study still ends with exactly
``--trials`` finished trials, the dead trial is FAIL and its retry COMPLETE, resumed from the
folds that had finished (same artifact ids, fewer epochs trained), and every artifact loads.

PostgreSQL: ``$MASK_SEARCH_PG_URL`` (``tools/test`` starts a server), else the server is started
with ``tools/postgres.sh``; if neither works the tests FAIL, they never skip. Each test session
gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from core.config import ConfigError
from core.labels import NUM_CLASSES
from core.study_data import load_study_data
from search import artifacts
from search.artifacts import (
    EVAL,
    OOF,
    checkpoint_name,
    eval_fold_name,
    fold_done_attr,
    oof_fold_name,
)
from search.run import main
from search.worker.claims import OWNER_ATTR, Claim, claim, claim_lock, reap, retried_from
from search.worker.storage import open_storage
from search.worker.trial_loop import (
    ERROR_ATTR,
    MAX_CONSECUTIVE_FAILURES,
    TooManyFailures,
    run_worker,
)
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
FOLDS, EPOCHS, TRIALS, WORKERS = 3, 2, 4, 3


def _start_postgres() -> str:
    """Start the throw-away server of ``tools/postgres.sh``; its URL, or pytest.fail."""
    script = ROOT / "tools" / "postgres.sh"
    proc = subprocess.run(["bash", "-c", f'source "{script}" && start_postgres >&2 && '
                                         'echo "$MASK_SEARCH_PG_URL"'],
                          capture_output=True, text=True, timeout=120)
    url = proc.stdout.strip()
    if proc.returncode != 0 or not url:
        pytest.fail("no PostgreSQL: MASK_SEARCH_PG_URL is unset and tools/postgres.sh could not "
                    f"start one: {proc.stderr.strip()[-500:]}")
    return url


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the test server (dropped at the end)."""
    import psycopg

    server = os.environ.get("MASK_SEARCH_PG_URL") or _start_postgres()
    base = make_url(server)
    name = f"mask_test_{uuid.uuid4().hex[:12]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def tiny(tiny_data: Path) -> Path:
    """``tiny_data`` with its 48x32 cache built once (workers then only read it)."""
    from core.cache import build_cache

    build_cache(tiny_data, (48, 32), workers=1, progress=False)
    return tiny_data


def _start_workers(url: str, art: Path, data: Path, *extra: str, workers: int = WORKERS,
                   epochs: int = EPOCHS, new: bool = True) -> subprocess.Popen:
    """``search.run`` on a demo study of ``TRIALS`` fast enqueued trials (made when ``new``)."""
    if new:
        study = optuna.create_study(study_name="demo", storage=open_storage(url),
                                    direction="maximize")
        for _ in range(TRIALS):
            study.enqueue_trial(FAST)
    argv = ["--study", "demo", "--storage", url, "--artifacts", str(art), "--data", str(data),
            "--trials", str(TRIALS), "--folds", str(FOLDS), "--epochs", str(epochs),
            "--pruner", "none", "--seed", "0", "--workers", str(workers), *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "search.run", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_trial(proc: subprocess.Popen, storage) -> FrozenTrial:
    """SIGKILL the worker of a RUNNING trial that finished fold 0 but not its last fold."""
    study = optuna.load_study(study_name="demo", storage=storage)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = t.user_attrs
            if fold_done_attr(0) in attrs and fold_done_attr(FOLDS - 1) not in attrs:
                os.kill(int(attrs[OWNER_ATTR]["pid"]), signal.SIGKILL)
                return study._storage.get_trial(t._trial_id)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    pytest.fail(f"no running trial with a finished fold was seen: {err[-2000:]}")


def _check_kill_run(proc: subprocess.Popen, storage, art: Path, data: Path) -> None:
    try:
        killed = _kill_mid_trial(proc, storage)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hang: SIGTERM reaches the workers through the parent
            proc.terminate()
            proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "killed by signal 9" in err
    _check_resumed(storage, art, data, killed)


def _check_resumed(storage, art: Path, data: Path, killed: FrozenTrial) -> None:
    """Exactly N finished; the killed trial FAIL, its one retry COMPLETE from its saved folds;
    every complete trial's artifacts load and agree with its value."""
    trials = optuna.load_study(study_name="demo", storage=storage).trials
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == TRIALS  # exactly N, no overshoot, although a worker died
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)
                and retried_from(t) is not None]
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL

    retries = [t for t in trials if retried_from(t) == killed.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == dead.params
    # resumed from the folds that had finished: their artifacts are the dead trial's own
    # (the dead trial's final attrs: a commit sent just before the kill may land after it)
    done = [k for k in range(FOLDS) if fold_done_attr(k) in dead.user_attrs]
    assert fold_done_attr(0) in killed.user_attrs
    assert done and done == list(range(len(done))) and len(done) < FOLDS
    assert retry.user_attrs["resumed_folds"] == done
    for k in done:
        for name in (oof_fold_name(k), eval_fold_name(k), checkpoint_name(k)):
            assert retry.user_attrs[artifacts.attr_name(name)] == \
                dead.user_attrs[artifacts.attr_name(name)]
    assert retry.user_attrs["epochs_trained"] == (FOLDS - len(done)) * EPOCHS
    assert sorted(retry.intermediate_values) == list(range(FOLDS * EPOCHS))
    assert len(retry.user_attrs["fold_f1"]) == FOLDS

    table = load_study_data(data, data / "corrections.csv", FOLDS, 0)
    store = artifacts.open_store(art)
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
        oof = artifacts.load_array(t, store, OOF)
        assert oof.shape == (len(table.table), NUM_CLASSES)
        np.testing.assert_allclose(oof.sum(axis=1), 1, atol=1e-4)
        assert artifacts.load_array(t, store, EVAL).shape == (len(table.eval_table),
                                                               NUM_CLASSES)
        from core.engine import macro_f1

        assert t.value == pytest.approx(macro_f1(table.labels, oof))
        for k in range(FOLDS):
            dest = art.parent / f"ckpt_{t.number}_{k}.pt"
            artifacts.load_file(t, store, checkpoint_name(k), dest)
            assert torch.load(dest, weights_only=True)
            dest.unlink()


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_worker_killed_mid_trial_is_retried_from_its_folds(
        pg_url: str, tiny: Path, tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    proc = _start_workers(pg_url, art, tiny, "--heartbeat-interval", "1", "--grace-period", "8")
    storage = open_storage(pg_url)
    try:
        _check_kill_run(proc, storage, art, tiny)
    finally:
        storage.engine.dispose()  # close the pool before the fixture drops the database


def _restart_postgres() -> None:
    script = ROOT / "tools" / "postgres.sh"
    done = subprocess.run(["bash", "-c", f'source "{script}" && restart_postgres'],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_restart_while_two_workers_run_ends_with_exactly_n(
        pg_url: str, tiny: Path, tmp_path: Path) -> None:
    """``pg_ctl restart`` (fast: every connection is cut) while 2 workers train: they wait for
    the server, the trials the cut broke are FAIL and retried from their saved folds, and the
    search ends by itself with exactly N finished and nothing run twice."""
    art = tmp_path / "artifacts"
    with contextlib.suppress(KeyError):  # the module's database: the kill test's study
        optuna.delete_study(study_name="demo", storage=pg_url)
    proc = _start_workers(pg_url, art, tiny, "--heartbeat-interval", "1", "--grace-period", "8",
                          workers=2)
    storage = open_storage(pg_url)
    try:
        study = optuna.load_study(study_name="demo", storage=storage)
        deadline = time.monotonic() + 150
        cut: list[int] = []  # the trials running with a saved fold when the server goes
        while time.monotonic() < deadline and proc.poll() is None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            cut = [t.number for t in running if fold_done_attr(0) in t.user_attrs]
            if cut:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        storage.engine.dispose()  # our own connections are cut too
        _restart_postgres()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]  # the workers waited for the server
        trials = optuna.load_study(study_name="demo", storage=storage).trials
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == TRIALS, [(t.number, t.state.name) for t in trials]
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        # every finished trial is a different enqueued one or the retry of a failed one
        origin = [retried_from(t) if retried_from(t) is not None else t.number
                  for t in finished]
        assert len(set(origin)) == len(origin), origin
        # what the README promises of a cut trial: FAIL, and its retry resumes its saved folds
        # (or, when the server was back before it next wrote, it simply finished)
        assert cut
        for number in cut:
            was = trials[number]
            if was.state in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            assert was.state == TrialState.FAIL, (number, was.state.name)
            (retry,) = [t for t in finished if retried_from(t) == number]
            saved = [k for k in range(FOLDS) if fold_done_attr(k) in was.user_attrs]
            assert saved and retry.user_attrs["resumed_folds"] == saved
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=60)
        storage.engine.dispose()


@pytest.mark.slow
def test_lone_search_killed_mid_trial_then_rerun_resumes_it(tiny: Path, tmp_path: Path) -> None:
    """The most common crash: one default process (SQLite, no --workers) SIGKILLed mid-trial,
    then the same command again."""
    url, art = f"sqlite:///{tmp_path / 'lone.db'}", tmp_path / "artifacts"
    proc = _start_workers(url, art, tiny, workers=1)
    try:
        killed = _kill_mid_trial(proc, url)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rerun = _start_workers(url, art, tiny, workers=1, new=False)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "worker gone, marked FAIL and queued for retry" in err
    _check_resumed(open_storage(url), art, tiny, killed)


@pytest.mark.slow
def test_journal_worker_killed_mid_trial_is_retried_from_its_folds(
        tiny: Path, tmp_path: Path) -> None:
    url, art = str(tmp_path / "demo.log"), tmp_path / "artifacts"
    proc = _start_workers(url, art, tiny)
    _check_kill_run(proc, open_storage(url), art, tiny)


@pytest.mark.slow
def test_ctrl_c_reaches_every_worker_and_the_summary_prints_once(tiny: Path,
                                                                 tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'int.db'}"
    proc = _start_workers(url, tmp_path / "artifacts", tiny, workers=2, epochs=50)
    study = optuna.load_study(study_name="demo", storage=url)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and proc.poll() is None:
        running = study.get_trials(states=(TrialState.RUNNING,))
        if len(running) == 2 and all(t.intermediate_values for t in running):
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert out.count("wall time") == 1
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert states.count(TrialState.FAIL) == 2


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # the test's own ask()
def test_one_machine_storages_reap_a_dead_owner_and_claim_its_retry_first(
        kind: str, tmp_path: Path) -> None:
    url = str(tmp_path / "j.log") if kind == "journal" else f"sqlite:///{tmp_path / 'j.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="s", storage=storage)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    dead.set_user_attr(OWNER_ATTR, {"host": os.uname().nodename, "pid": gone.pid,
                                    "start": None})
    mine = study.ask()
    mine.set_user_attr(OWNER_ATTR, {"host": os.uname().nodename, "pid": os.getpid(),
                                    "start": None})
    study.enqueue_trial({"x": 0.25})  # older than the retry: the retry still goes first
    assert reap(study, max_retry=1) == [dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == TrialState.FAIL and states[mine.number] == TrialState.RUNNING
    got = claim(study, 10, claim_lock(storage, url, "s"), max_retry=1)
    assert isinstance(got, optuna.Trial)
    frozen = storage.get_trial(got._trial_id)
    assert retried_from(frozen) == dead.number and frozen.params == dead.params
    assert got.user_attrs[OWNER_ATTR]["pid"] == os.getpid()
    assert reap(study, max_retry=1) == []  # live owners are left alone


def test_claims_stop_at_n_counting_running_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="c", storage=storage)
    lock = claim_lock(storage, url, "c")
    first = claim(study, 2, lock, max_retry=0)
    second = claim(study, 2, lock, max_retry=0)
    assert isinstance(first, optuna.Trial) and isinstance(second, optuna.Trial)
    assert claim(study, 2, lock, max_retry=0) is Claim.WAIT  # both slots running: do not ask
    study.tell(first, 1.0)
    study.tell(second, state=TrialState.FAIL)  # a failed trial frees its slot
    third = claim(study, 2, lock, max_retry=0)
    assert isinstance(third, optuna.Trial)
    study.tell(third, 2.0)
    assert claim(study, 2, lock, max_retry=0) is Claim.DONE
    assert len(study.trials) == 3


def test_a_trial_finishing_while_a_claim_counts_is_not_missed(tmp_path: Path,
                                                               monkeypatch) -> None:
    """The overshoot's root cause: trials are told finished outside the claim lock, so the
    claim's count must be one snapshot. Here the study has 1 finished and 1 running of N = 2,
    and the running one finishes right after the claim's first read of the trials (another
    worker's ``tell``): the claim must not start a third trial. Counting finished and running
    trials in two reads (the old code) saw 1 finished and 0 running, and asked for one more."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="r", storage=storage)
    lock = claim_lock(storage, url, "r")
    done = claim(study, 2, lock, max_retry=0)
    study.tell(done, 1.0)
    running = claim(study, 2, lock, max_retry=0)
    real = study.get_trials

    def get_trials(*args, **kwargs):
        out = real(*args, **kwargs)
        states = kwargs.get("states") or ()
        if TrialState.COMPLETE in states and running.number not in \
                {t.number for t in real(states=(TrialState.COMPLETE,))}:
            study.tell(running, 2.0)  # finishes right after the count was read
        return out

    monkeypatch.setattr(study, "get_trials", get_trials)
    got = claim(study, 2, lock, max_retry=0)
    assert not isinstance(got, optuna.Trial), f"trial {got.number} started: N + 1"
    monkeypatch.undo()
    assert len(study.trials) == 2
    assert claim(study, 2, lock, max_retry=0) is Claim.DONE  # now both are finished


def _run_fake(tmp_path: Path, objective, n_total: int) -> optuna.Study:
    """One worker running a fake objective on a fresh SQLite study until ``n_total``."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    storage = open_storage(url)
    study = optuna.create_study(study_name="f", storage=storage, direction="maximize")
    run_worker(study, objective, n_total, lock=claim_lock(storage, url, "f"), poll_s=0.01)
    return study


@pytest.mark.slow
def test_one_failing_trial_does_not_end_the_search(tmp_path: Path, caplog) -> None:
    """CUDA out of memory in one config (here a RuntimeError in trial 1): one warning line, the
    trial is FAIL with the reason, and the worker goes on to N finished trials."""
    def objective(trial: optuna.Trial) -> float:
        if trial.number == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return trial.suggest_float("x", 0, 1)

    with caplog.at_level("WARNING", logger="optuna.mask_search"):
        study = _run_fake(tmp_path, objective, 4)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 4 and states[1] == TrialState.FAIL
    assert study.trials[1].user_attrs[ERROR_ATTR] == \
        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["trial 1 failed: RuntimeError: CUDA out of memory. Tried to allocate "
                      "2.00 GiB"]


@pytest.mark.slow
def test_failing_trials_in_a_row_stop_the_worker(tmp_path: Path) -> None:
    calls = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        if trial.number == 0:
            return 0.5
        raise OSError(f"disk full ({trial.number})")

    with pytest.raises(TooManyFailures) as e:
        _run_fake(tmp_path, objective, 20)
    assert len(calls) == 1 + MAX_CONSECUTIVE_FAILURES  # stopped at once, not at 20 trials
    assert f"{MAX_CONSECUTIVE_FAILURES} trials in a row failed" in str(e.value)
    assert f"OSError: disk full ({MAX_CONSECUTIVE_FAILURES})" in str(e.value)


def test_a_config_error_in_a_trial_stops_the_worker_at_once(tmp_path: Path) -> None:
    """A study space every trial would fail on is the user's to fix: no five tries."""
    calls = []

    def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        raise ConfigError("config field 'backbone': unknown")

    url = f"sqlite:///{tmp_path / 'c.db'}"
    study = optuna.create_study(study_name="c", storage=url)
    with pytest.raises(ConfigError):
        run_worker(study, objective, 5, lock=claim_lock(open_storage(url), url, "c"))
    assert calls == [0] and study.trials[0].state == TrialState.FAIL


@pytest.mark.parametrize(("url", "expect"), [
    ("postgresql://postgres@127.0.0.1:1/db",
     "cannot connect to 127.0.0.1:1 (connection refused); start the database server"),
    ("postgres://u@h/db", "unknown scheme 'postgres' (write postgresql://)"),
    ("foo://bar", "unknown scheme 'foo'"),
    ("postgresql://u@h:notaport/db", "malformed URL"),
    ("runs/study.txt", "expected sqlite:///FILE"),
])
def test_bad_storage_urls_are_one_line(url: str, expect: str, tmp_path: Path, capsys,
                                       monkeypatch) -> None:
    monkeypatch.setenv("MASK_SEARCH_RUNS", str(tmp_path))
    assert main(["--study", "demo", "--trials", "1", "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err
    assert not (tmp_path / "demo_data").exists()  # nothing made before the storage opened


def test_gpus_start_one_worker_per_device_and_workers_share_the_cores() -> None:
    from search.run import build_parser, child_argv
    from search.worker.launcher import worker_envs

    argv = ["--study", "demo", "--trials", "8", "--gpus", "0,2"]
    assert build_parser().parse_args(argv).gpus == ["0", "2"]
    assert child_argv(argv, 1, gpu=True) == ["--study", "demo", "--trials", "8",
                                             "--worker-id", "1", "--device", "cuda"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs(["0", "2"], 2)] == ["0", "2"]
    envs = worker_envs(None, 2)
    assert all(e["CUDA_VISIBLE_DEVICES"] == "" for e in envs)
    assert {e["OMP_NUM_THREADS"] for e in envs} == {str(max(1, (os.cpu_count() or 1) // 2))}
    for bad in (["--gpus", "0,0"], ["--gpus", "a"], ["--gpus", "0", "--workers", "2"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--study", "demo", "--trials", "1", *bad])


def test_a_trial_finishing_after_the_study_reached_n_is_failed_not_counted(tmp_path) -> None:
    """While this worker's trial ran, another process finished the N-th trial (a retry of a
    trial wrongly judged dead, say): telling this one COMPLETE would make N + 1."""
    from search.worker.trial_loop import SURPLUS

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
        return 0.5

    run_worker(study, objective, 1, lock=claim_lock(study._storage, url, "s"))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 1
    ours = study.trials[0]
    assert ours.state == TrialState.FAIL and ours.user_attrs[ERROR_ATTR] == SURPLUS
