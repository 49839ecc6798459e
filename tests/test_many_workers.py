"""Many worker processes on one SQLite file (the default storage): no "database is locked"
failure, and exactly ``--trials`` finished trials, with fast stand-in trials so the claim lock
and the storage, not training, are what is exercised."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.worker.trial_loop import ERROR_ATTR

ROOT = Path(__file__).resolve().parents[1]
WORKERS, TRIALS = 6, 36

WORKER = textwrap.dedent("""
    import sys, time
    import optuna
    from search.worker.claims import claim_lock
    from search.worker.storage import open_storage
    from search.worker.trial_loop import run_worker

    url = sys.argv[1]
    storage = open_storage(url, heartbeat_interval=1, grace_period=30)
    study = optuna.load_study(study_name="many", storage=storage)

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        trial.report(x, 0)
        time.sleep(0.05)
        return x

    run_worker(study, objective, int(sys.argv[2]), lock=claim_lock(storage, url, "many"),
               poll_s=0.1)
""")


@pytest.mark.slow
def test_six_workers_on_one_sqlite_file_end_with_exactly_n(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'many.db'}"
    optuna.create_study(study_name="many", storage=url, direction="maximize")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(TRIALS)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(WORKERS)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * WORKERS, errs
    assert not any("database is locked" in e for e in errs), errs
    trials = optuna.load_study(study_name="many", storage=url).trials
    # Exactly N trials ever started, all COMPLETE: no (N + 1)-th started and failed 'surplus'
    # (the claim counts finished and running trials in one read: search.worker.claims.claim).
    others = [(t.number, t.state.name, t.user_attrs.get(ERROR_ATTR)) for t in trials
              if t.state != TrialState.COMPLETE]
    assert others == [] and len(trials) == TRIALS
