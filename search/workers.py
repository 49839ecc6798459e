"""Many workers on one study: claiming trials without overshoot, reaping dead workers, launching.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
from optuna.trial import FrozenTrial, TrialState

from core.atomic import pid_alive
from core.config import ConfigError
from core.errors import DataError
from search.budget import TIME_BUDGET, Budget, TimeBudgetExceeded
from search.storage import journal_path

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OWNER_ATTR = "worker"
ERROR_ATTR = "error"  # user attr of a FAIL trial: why, in one line
#: Errors every trial would hit (a bad study space, bad data): they stop the worker at once.
FATAL: tuple[type[BaseException], ...] = (ConfigError, DataError)
#: Failed trials in a row after which a worker gives up (see ``run_worker``).
MAX_CONSECUTIVE_FAILURES = 5
RETRY_OF = "failed_trial"  # system attr written by RetryHeartbeatStaleTrialCallback
#: Under Optuna's logger, so trial lines look like Optuna's and follow its verbosity.
log = optuna.logging.get_logger("optuna.mask_search")


class TooManyFailures(RuntimeError):
    """A worker's last trials all failed; the message says how many and the last error."""


# -- who owns a trial ------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    """Process start time (Linux /proc), so a reused pid is not mistaken for the owner."""
    fields = _stat(pid)
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


# -- reaping dead workers ----------------------------------------------------------------------

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
    retry = _retry_callback(max_retry)
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


def _retry_callback(max_retry: int | None) -> Retry:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return Retry(max_retry=max_retry)


# -- the study-wide claim lock -----------------------------------------------------------------

@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _pg_lock(storage: RDBStorage, key: int) -> Iterator[None]:
    """Session advisory lock; a killed holder's connection closes and the lock goes with it."""
    from sqlalchemy import text

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
        return lambda: _file_lock(path)
    if isinstance(storage, RDBStorage):
        backend = storage.engine.url.get_backend_name()
        database = storage.engine.url.database or ""
        if backend == "postgresql":
            digest = hashlib.sha256(f"mask-search:{study_name}".encode()).digest()
            key = int.from_bytes(digest[:8], "big", signed=True)
            return lambda: _pg_lock(storage, key)
        if backend == "sqlite" and database and database != ":memory:":
            path = Path(database).with_name(f"{Path(database).name}.{study_name}.claim")
            return lambda: _file_lock(path)
    lock = threading.Lock()  # one process (in-memory storages, other backends): a plain lock
    return lambda: lock


# -- one worker's loop -------------------------------------------------------------------------

def _claim_waiting_retry(study: optuna.Study) -> optuna.Trial | None:
    """Start a queued retry (oldest first) before any other waiting trial: it has work saved."""
    storage = study._storage  # noqa: SLF001
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if RETRY_OF not in t.system_attrs:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def claim(study: optuna.Study, n_total: int, lock: Callable[[], contextlib.AbstractContextManager],
          max_retry: int | None) -> optuna.Trial | bool:
    """A started trial, True (all slots RUNNING: wait), or False (N finished: stop)."""
    with lock():
        reaped = reap(study, max_retry)
        if reaped:
            log.warning("trial(s) %s: worker gone, marked FAIL and queued for retry", reaped)
        finished = len(study.get_trials(deepcopy=False, states=FINISHED))
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished >= n_total:
            return False
        if finished + running >= n_total:
            return True
        with warnings.catch_warnings():  # we beat ourselves (``_Heartbeat``), as optimize does
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            trial = _claim_waiting_retry(study) or study.ask()
        trial.set_user_attr(OWNER_ATTR, owner_record())
        return trial


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
                    self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]

            self.thread = threading.Thread(target=beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def run_one(study: optuna.Study, trial: optuna.Trial,
            objective: Callable[[optuna.Trial], float],
            fatal: tuple[type[BaseException], ...] = FATAL) -> FrozenTrial:
    """Run and tell one claimed trial; an exception marks it FAIL.

    Most exceptions (CUDA out of memory in one config, a numerical blow-up) belong to that
    trial: one warning line, the traceback at debug level, the trial's user attr ``error``, and
    the FAIL trial is returned, so an overnight search goes on. A ``fatal`` one (a config or
    data problem every trial would hit) and Ctrl-C propagate.
    """
    with _Heartbeat(study._storage, trial._trial_id):  # noqa: SLF001
        try:
            value = objective(trial)
        except optuna.TrialPruned as e:
            frozen = study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned. %s", trial.number, e)
            return frozen
        except TimeBudgetExceeded:  # FAIL and queued again: a rerun resumes its finished folds
            _retry_callback(None)(study, _fail(study, trial, TIME_BUDGET))
            raise
        except fatal:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except Exception as e:  # noqa: BLE001  (one trial's failure, not the search's)
            return _fail(study, trial, _first_line(e), exc_info=True)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
    if value is None or not math.isfinite(value):
        return _fail(study, trial, f"objective returned {value!r}")
    frozen = study.tell(trial, value)
    log.info("trial %d finished with value %.4f", trial.number, value)
    return frozen


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
               max_failures: int = MAX_CONSECUTIVE_FAILURES) -> int:
    """Claim and run trials until the study has ``n_total`` finished ones, or the ``budget``
    says no trial can finish in the time left (a trial running at the deadline stops at its
    next epoch boundary: that is the objective's part, ``Budget.check``).

    Returns the number of trials this worker ran. Raises ``TooManyFailures`` after
    ``max_failures`` failed trials in a row: then every trial is failing (a dead GPU, a full
    disk) and going on would only fill the study with FAIL trials.
    """
    ran, failed_in_a_row = 0, []
    while budget is None or budget.can_start(study):
        got = claim(study, n_total, lock, max_retry)
        if got is False:
            break
        if got is True:
            time.sleep(poll_s)
            continue
        try:
            frozen = run_one(study, got, objective, fatal)
        except TimeBudgetExceeded:
            return ran + 1
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


def _release_accelerator_memory() -> None:
    """After a failed trial (often CUDA out of memory), hand cached blocks back to the driver."""
    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the parent: one process per GPU or per CPU share -------------------------------------------

def worker_envs(gpus: Sequence[str] | None, workers: int) -> list[dict[str, str]]:
    """Environment overrides per worker: one GPU each, or an equal share of the CPU cores."""
    if gpus:
        return [{"CUDA_VISIBLE_DEVICES": g} for g in gpus]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    cpu = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return [dict(cpu) for _ in range(workers)]


def launch(argvs: Sequence[Sequence[str]], envs: Sequence[dict[str, str]]) -> list[int]:
    """Start ``python -m search.run ARGV`` per worker, wait for all; their exit codes.

    Workers run in their own sessions, so Ctrl-C reaches them once, through this parent:
    it forwards SIGINT (and SIGTERM, as SIGINT), then waits for them to mark their running
    trials FAIL and exit.
    """
    procs = [subprocess.Popen([sys.executable, "-m", "search.run", *argv],
                              env={**os.environ, **env}, start_new_session=True)
             for argv, env in zip(argvs, envs, strict=True)]

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)  # workers mark their trials FAIL and stop

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes: dict[int, int] = {}
        while len(codes) < len(procs):  # poll all, so a dead worker is reported (and reaped) now
            for i, p in enumerate(procs):
                if i in codes or (code := p.poll()) is None:
                    continue
                codes[i] = code
                if code < 0:
                    print(f"worker {i} (pid {p.pid}) was killed by signal {-code}",
                          file=sys.stderr, flush=True)
            time.sleep(0.2)
        return [codes[i] for i in range(len(procs))]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
