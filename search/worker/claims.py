"""Who runs which trial: claiming without overshoot, trial owners, reaping dead workers.

Why not ``study.optimize``: with several processes, "check the count, then ask" races, and a
study asked for N trials ends with up to N + workers - 1. Here a worker claims a trial under a
study-wide lock (PostgreSQL advisory lock; a lock file next to an SQLite or journal file):
it counts finished + RUNNING trials and asks only while that is below N. A worker that finds
all slots taken by RUNNING trials waits instead of leaving, because a running trial may die and
need a retry. So the study ends with exactly N finished trials.

Dead workers: with RDB storages Optuna's heartbeats find them (``fail_stale_trials``, called
here before every claim) and ``RetryHeartbeatStaleTrialCallback`` queues a retry. The journal
storage has no heartbeats, so each trial records its owner (host, pid, process start time) in
the user attr ``worker``; a RUNNING trial whose owner process on THIS host is gone is failed and
re-queued the same way. Owners on other hosts cannot be checked: the journal is for one machine.
Retries are claimed before other waiting trials, and resume from their finished folds.

Stages (``search.worker.stage``): a search worker counts, claims and waits for search-stage
trials only; ``search.refit`` claims final-stage trials only, from the queue it filled. Neither
takes the other's waiting trials, so a final trial's retry is resumed by the final stage, not by
a search.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import text

from core.atomic import file_lock, pid_alive, proc_stat
from search.log import log
from search.worker.stage import FINAL, SEARCH, is_final, search_trials
from search.worker.storage import journal_path

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER_ATTR = "worker"
RETRY_OF = "failed_trial"  # system attr written by RetryHeartbeatStaleTrialCallback


class Claim(enum.Enum):
    """What ``claim`` says when it starts no trial."""

    WAIT = "wait"  # every slot is taken by a RUNNING trial, which may die and need a retry: poll
    DONE = "done"  # the study has its N finished trials (final stage: none left to run): stop


def _start_time(pid: int) -> str | None:
    """Process start time (Linux /proc), so a reused pid is not mistaken for the owner."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def owner_record() -> dict:
    """This process as a trial owner: host name, pid, start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def owner_alive(owner: dict | None) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told (other host, no attr)."""
    if not owner or owner.get("host") != socket.gethostname():
        return None
    pid = int(owner["pid"])
    if not pid_alive(pid):  # gone, or killed and not yet waited for by its parent
        return False
    started = owner.get("start")
    return started is None or _start_time(pid) in (None, started)


def retried_from(trial: FrozenTrial | optuna.Trial) -> int | None:
    """The number of the trial this one retries (the first of the chain), or None."""
    if isinstance(trial, optuna.Trial):  # a running Trial has no system_attrs of its own
        trial = trial.storage.get_trial(trial._trial_id)  # noqa: SLF001
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return Retry.retried_trial_number(trial)


def heartbeats_on(storage: BaseStorage) -> bool:
    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None


def reap(study: optuna.Study, max_retry: int | None) -> list[int]:
    """Fail (and queue a retry of) RUNNING trials whose worker is dead; their numbers.

    RDB storages with heartbeats: Optuna's stale-heartbeat check. Journal and SQLite (one
    machine, so every owner is checkable): also the owner pid check, which needs no grace period.
    """
    storage = study._storage  # noqa: SLF001  (Optuna's own helpers take the study)
    failed: list[int] = []
    if heartbeats_on(storage):
        before = {t.number for t in
                  study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                  if t.number in before]
        if storage.engine.url.get_backend_name() != "sqlite":  # type: ignore[attr-defined]
            return sorted(failed)
    retry = retry_callback(max_retry)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if owner_alive(t.user_attrs.get(OWNER_ATTR)) is not False:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue
        failed.append(t.number)
        retry(study, storage.get_trial(t._trial_id))
    return sorted(failed)


def retry_callback(max_retry: int | None) -> Retry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return Retry(max_retry=max_retry)


@contextlib.contextmanager
def _pg_lock(storage: RDBStorage, key: int) -> Iterator[None]:
    """Session advisory lock; a killed holder's connection closes and the lock goes with it."""
    with storage.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def claim_lock(storage: BaseStorage, url: str,
               study_name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the lock every worker of ``study_name`` takes to claim a trial."""
    journal = journal_path(url)
    if isinstance(storage, JournalStorage) and journal is not None:
        path = journal.with_name(f"{journal.name}.{study_name}.claim")
        return lambda: file_lock(path)
    if isinstance(storage, RDBStorage):
        backend = storage.engine.url.get_backend_name()
        database = storage.engine.url.database or ""
        if backend == "postgresql":
            digest = hashlib.sha256(f"mask-search:{study_name}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            return lambda: _pg_lock(storage, key)
        if backend == "sqlite" and database and database != ":memory:":
            path = Path(database).with_name(f"{Path(database).name}.{study_name}.claim")
            return lambda: file_lock(path)
    lock = threading.Lock()  # one process (in-memory storages, other backends): a plain lock
    return lambda: lock


def _claim_waiting(study: optuna.Study, final: bool, retries: bool) -> optuna.Trial | None:
    """Start the oldest waiting trial of this stage (``final``): only retries (``retries``), which
    have work saved and go first, or any."""
    storage = study._storage  # noqa: SLF001
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if is_final(t) != final or (retries and RETRY_OF not in t.system_attrs):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def _ask_search(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` for a search worker. Optuna's ``ask`` starts the oldest waiting trial,
    whatever it is; while a final-stage trial waits (``search.refit``'s), the search's next trial
    is the oldest waiting search trial or a new one, made as ``ask`` makes it."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not any(is_final(t) for t in waiting):
        return study.ask()
    trial = _claim_waiting(study, final=False, retries=False)
    if trial is not None:
        return trial
    study._thread_local.cached_all_trials = None  # noqa: SLF001  (what ask does first)
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))  # noqa: SLF001


def _claim_final(study: optuna.Study) -> optuna.Trial | Claim:
    """A waiting final-stage trial (retries first), ``Claim.WAIT`` while one still runs (it may
    die and be retried), ``Claim.DONE`` when the final stage's queue is empty."""
    trial = (_claim_waiting(study, final=True, retries=True)
             or _claim_waiting(study, final=True, retries=False))
    if trial is not None:
        return trial
    running = any(is_final(t) for t in study.get_trials(deepcopy=False,
                                                         states=(TrialState.RUNNING,)))
    return Claim.WAIT if running else Claim.DONE


def claim(study: optuna.Study, n_total: int, lock: Callable[[], contextlib.AbstractContextManager],
          max_retry: int | None, stage: str = SEARCH) -> optuna.Trial | Claim:
    """A started trial, ``Claim.WAIT`` (all slots RUNNING: wait), or ``Claim.DONE`` (N finished:
    stop).

    ``stage`` ``final``: a waiting final-stage trial instead, ``Claim.WAIT`` while a final trial
    still runs, and ``Claim.DONE`` when none is left (``n_total`` is not used: final trials are
    not counted).
    """
    with lock():
        reaped = reap(study, max_retry)
        if reaped:
            log.warning("trial(s) %s: worker gone, marked FAIL and queued for retry", reaped)
        if stage == FINAL:
            got = _claim_final(study)
        else:
            # One read for both counts: trials are told finished outside this lock, and one
            # that finished between two reads was counted in neither, so a claim started an
            # (N + 1)-th trial (seen as FAIL 'surplus' with six workers on SQLite).
            counted = search_trials(study, (*FINISHED, TrialState.RUNNING))
            finished = sum(t.state in FINISHED for t in counted)
            running = len(counted) - finished
            if finished >= n_total:
                return Claim.DONE
            if finished + running >= n_total:
                return Claim.WAIT
            with warnings.catch_warnings():  # we beat ourselves (``_Heartbeat``), as optimize does
                warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
                got = _claim_waiting(study, final=False, retries=True) or _ask_search(study)
        if isinstance(got, optuna.Trial):
            got.set_user_attr(OWNER_ATTR, owner_record())
        return got
