"""One worker's loop: claim a trial, run it with a heartbeat, tell Optuna, go on.

A trial that raises is that trial's failure (FAIL with the user attr ``error``), not the
search's; a config or data error every trial would hit stops the worker at once, and
``MAX_CONSECUTIVE_FAILURES`` failures in a row stop it too (a dead GPU, a full disk).
"""

from __future__ import annotations

import contextlib
import gc
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence

import optuna
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from core.config import ConfigError
from core.errors import DataError, first_line
from search.log import log
from search.worker.budget import TIME_BUDGET, Budget, TimeBudgetExceeded
from search.worker.claims import FINISHED, Claim, claim, heartbeats_on, retry_callback
from search.worker.stage import FINAL, SEARCH, search_trials

ERROR_ATTR = "error"  # user attr of a FAIL trial: why, in one line
#: Errors every trial would hit (a bad study space, bad data): they stop the worker at once.
FATAL: tuple[type[BaseException], ...] = (ConfigError, DataError)
#: Failed trials in a row after which a worker gives up (see ``run_worker``).
MAX_CONSECUTIVE_FAILURES = 5
#: The ``error`` of a trial that finished when the study already had its N finished trials.
SURPLUS = "surplus: the study already has its --trials finished trials"


#: What a database server that is restarting or gone raises (PostgreSQL; SQLite never does);
#: Optuna passes them on as such, or wrapped in a ``StorageInternalError`` (``is_outage``).
STORAGE_ERRORS: tuple[type[BaseException], ...] = (sqlalchemy.exc.OperationalError,
                                                   sqlalchemy.exc.InterfaceError)
#: How long a worker waits for its storage to come back before it gives up.
STORAGE_OUTAGE_S = 300
#: The ``error`` of a trial that was running when the storage went away.
STORAGE_LOST = "storage connection lost"


def is_outage(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) says the storage's server is unreachable."""
    while error is not None:
        if isinstance(error, STORAGE_ERRORS):
            return True
        error = error.__cause__ or error.__context__
    return False


class TooManyFailures(RuntimeError):
    """A worker's last trials all failed; the message says how many and the last error."""


class StorageUnreachable(RuntimeError):
    """The storage stayed unreachable for ``STORAGE_OUTAGE_S``; one line says so."""


class _Heartbeat:
    """Records the trial's heartbeat every interval in a thread (what ``optimize`` does)."""

    def __init__(self, storage: BaseStorage, trial_id: int) -> None:
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if heartbeats_on(self.storage):
            interval = self.storage.get_heartbeat_interval()  # type: ignore[attr-defined]
            self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]

            def beat() -> None:
                while not self.stop.wait(interval):
                    try:
                        self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
                    except Exception as e:  # a server restart: beat again next time
                        if not is_outage(e):
                            raise

            self.thread = threading.Thread(target=beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def run_one(study: optuna.Study, trial: optuna.Trial,
            objective: Callable[[optuna.Trial], float],
            fatal: tuple[type[BaseException], ...] = FATAL,
            seal: Callable[[], bool] | None = None) -> FrozenTrial:
    """Run and tell one claimed trial; an exception marks it FAIL.

    Most exceptions (CUDA out of memory in one config, a numerical blow-up) belong to that
    trial: one warning line, the traceback at debug level, the trial's user attr ``error``, and
    the FAIL trial is returned, so an overnight search goes on. A ``fatal`` one (a config or
    data problem every trial would hit) and Ctrl-C propagate. ``seal`` (see ``run_worker``)
    says whether a finished result may still be told as finished.
    """
    with _Heartbeat(study._storage, trial._trial_id):  # noqa: SLF001
        try:
            value = objective(trial)
        except optuna.TrialPruned as e:
            if seal is not None and not seal():
                return _fail(study, trial, SURPLUS)
            frozen = study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned. %s", trial.number, e)
            return frozen
        except TimeBudgetExceeded:  # FAIL and queued again: a rerun resumes its finished folds
            retry_callback(None)(study, _fail(study, trial, TIME_BUDGET))
            raise
        except fatal:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as e:  # noqa: BLE001  (one trial's failure, not the search's)
            if is_outage(e):  # the storage's, not the trial's: run_worker waits it out
                raise
            return _fail(study, trial, first_line(e), exc_info=True)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    if value is None or not math.isfinite(value):
        return _fail(study, trial, f"objective returned {value!r}")
    if seal is not None and not seal():
        return _fail(study, trial, SURPLUS)
    frozen = study.tell(trial, value)
    log.info("trial %d finished with value %.4f", trial.number, value)
    return frozen


def _room_for_one(study: optuna.Study, n_total: int,
                  lock: Callable[[], contextlib.AbstractContextManager]) -> bool:
    """Whether the study has fewer than ``n_total`` finished trials, checked under the claim
    lock at the moment a trial would finish. The claim made the same check when the trial
    started, but a retry can be queued after that for a trial that was wrongly judged dead (a
    heartbeat starved on a loaded machine) and still finishes: without this second check the
    study would end with N + 1 (seen once in the PostgreSQL kill test under load). Final-stage
    trials are not counted (``search.worker.stage``)."""
    with lock():
        return len(search_trials(study, FINISHED)) < n_total


def _fail(study: optuna.Study, trial: optuna.Trial, why: str,
          exc_info: bool = False) -> FrozenTrial:
    log.warning("trial %d failed: %s", trial.number, why)
    if exc_info:
        log.debug("trial %d traceback:", trial.number, exc_info=True)
    with contextlib.suppress(UpdateFinishedTrialError):  # reaped meanwhile: still record why
        trial.set_user_attr(ERROR_ATTR, why)
    return study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def run_worker(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_total: int, *,
               lock: Callable[[], contextlib.AbstractContextManager],
               callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
               budget: Budget | None = None, max_retry: int | None = None,
               poll_s: float = 2.0, fatal: tuple[type[BaseException], ...] = FATAL,
               max_failures: int = MAX_CONSECUTIVE_FAILURES, stage: str = SEARCH) -> int:
    """Claim and run trials until the study has ``n_total`` finished ones, or the ``budget``
    says no trial can finish in the time left (a trial running at the deadline stops at its
    next epoch boundary: that is the objective's part, ``Budget.check``). ``stage`` ``final``
    (``search.refit``): run the queued final-stage trials instead, until none is left.

    Returns the number of trials this worker ran. Raises ``TooManyFailures`` after
    ``max_failures`` failed trials in a row: then every trial is failing (a dead GPU, a full
    disk) and going on would only fill the study with FAIL trials.
    """
    ran, failed_in_a_row = 0, []
    while budget is None or budget.can_start(study, stage):
        got = None
        try:
            got = claim(study, n_total, lock, max_retry, stage=stage)
            if got is Claim.DONE:
                break
            if got is Claim.WAIT:
                time.sleep(poll_s)
                continue
            frozen = run_one(study, got, objective, fatal,
                             seal=None if stage == FINAL else
                             lambda: _room_for_one(study, n_total, lock))
        except TimeBudgetExceeded:
            return ran + 1
        except Exception as e:  # a server restart: wait, fail the cut trial, queue it again
            if not is_outage(e):
                raise
            _ride_out_outage(study, got if isinstance(got, optuna.Trial) else None, lock, e)
            continue
        ran += 1
        for callback in callbacks:
            callback(study, frozen)
        gc.collect()
        if frozen.state != TrialState.FAIL:
            failed_in_a_row = []
            continue
        _release_accelerator_memory()
        failed_in_a_row.append(frozen)
        if len(failed_in_a_row) >= max_failures:
            numbers = ", ".join(str(t.number) for t in failed_in_a_row)
            raise TooManyFailures(
                f"{len(failed_in_a_row)} trials in a row failed (trials {numbers}; last: "
                f"{frozen.user_attrs.get(ERROR_ATTR, 'unknown')}); this worker stops, since "
                "something breaks every trial (see the warnings above; --debug shows tracebacks)")
    return ran


def _ride_out_outage(study: optuna.Study, trial: optuna.Trial | None,
                     lock: Callable[[], contextlib.AbstractContextManager],
                     error: BaseException) -> None:
    """Wait for the storage to answer again; then the trial it cut (if still RUNNING: another
    worker may have reaped it meanwhile) is FAIL and queued for a retry, which resumes from its
    saved folds. Gives up with ``StorageUnreachable`` after ``STORAGE_OUTAGE_S``."""
    log.warning("storage connection lost (%s); waiting up to %d s for it", first_line(error),
                STORAGE_OUTAGE_S)
    deadline = time.monotonic() + STORAGE_OUTAGE_S
    while True:
        try:
            with lock():
                if trial is not None and study._storage.get_trial(  # noqa: SLF001
                        trial._trial_id).state == TrialState.RUNNING:  # noqa: SLF001
                    retry_callback(None)(study, _fail(study, trial, STORAGE_LOST))
            log.warning("storage is back")
            return
        except Exception as e:
            if not is_outage(e):
                raise
            if time.monotonic() > deadline:
                raise StorageUnreachable(
                    f"the storage stayed unreachable for {STORAGE_OUTAGE_S} s ({first_line(e)}); "
                    "start it and run the same command again: finished folds are kept") from None
            time.sleep(2)


def _release_accelerator_memory() -> None:
    """After a failed trial (often CUDA out of memory), hand cached blocks back to the driver."""
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
