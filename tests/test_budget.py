"""``--hours``: no trial starts that cannot finish, and the deadline stops a running trial at an
epoch boundary; a rerun with more time resumes it from its finished folds."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from optuna.trial import TrialState

from search import artifacts
from search.objective import Machine, Objective
from search.study_settings import StudySettings
from search.worker.budget import TIME_BUDGET, Budget
from search.worker.claims import claim_lock
from search.worker.trial_loop import ERROR_ATTR, run_worker
from studies import demo
from tests.conftest import FAST
from tests.test_search import fake_fit, fake_predict

EPOCHS, EPOCH_S = 3, 10.0


@pytest.mark.slow
def test_deadline_stops_the_trial_at_an_epoch_and_a_rerun_resumes_it(study_data, tmp_path,
                                                                      monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("search.worker.budget.time.time", lambda: clock[0])
    seen: list[int] = []
    fit_with_seen = fake_fit(seen)

    def fit(cfg, *args, on_epoch=None, **kwargs):
        def timed(epoch, value):
            clock[0] += EPOCH_S  # every epoch costs ten seconds of the budget
            return on_epoch(epoch, value)
        return fit_with_seen(cfg, *args, on_epoch=timed, **kwargs)

    url = f"sqlite:///{tmp_path / 'b.db'}"
    study = optuna.create_study(study_name="b", storage=url, direction="maximize")
    study.enqueue_trial(FAST)
    store = artifacts.open_store(tmp_path / "artifacts")

    def search(seconds: float) -> None:
        budget = Budget.of(seconds)
        objective = Objective(demo, study_data, store, StudySettings.of(study_data, EPOCHS),
                              Machine(budget=budget), fit=fit, predict_fn=fake_predict)
        run_worker(study, objective, 1, lock=claim_lock(study._storage, url, "b"),
                   budget=budget)

    # Fold 0 ends at 30 s; fold 1's second epoch ends at 50 s, past the 45 s deadline.
    search(45)
    first = study.trials[0]
    assert first.state == TrialState.FAIL and first.user_attrs[ERROR_ATTR] == TIME_BUDGET
    assert seen == [0, 1, 2, 0, 1]  # stopped right after an epoch, not mid-fold or at once
    assert [t.state for t in study.trials[1:]] == [TrialState.WAITING]  # queued for the rerun

    search(1000)
    retry = study.trials[1]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_folds"] == [0]
    assert seen[5:] == [0, 1, 2]  # only fold 1 trained again
    assert len(study.trials) == 2


def test_no_trial_starts_that_the_record_says_cannot_finish() -> None:
    study = optuna.create_study(direction="maximize")
    start = dt.datetime(2026, 1, 1)
    for number, minutes in enumerate((50, 60, 70)):
        study.add_trial(optuna.trial.FrozenTrial(
            number=number, trial_id=number, state=TrialState.COMPLETE, value=0.5,
            datetime_start=start, datetime_complete=start + dt.timedelta(minutes=minutes),
            params={}, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={}))
    assert Budget.of(59 * 60).expected_trial_s(study) == 60 * 60
    assert not Budget.of(59 * 60).can_start(study)
    assert Budget.of(61 * 60).can_start(study)
    assert Budget.of(1).can_start(optuna.create_study())  # no record yet: try one
