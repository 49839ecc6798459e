"""Open an Optuna storage from a URL: SQLite with a busy timeout, PostgreSQL, or a journal file.

SQLite is the zero-setup default; several processes on one file need a busy timeout or they
die with "database is locked". A path ending in ``.log``/``.journal`` (or ``journal:PATH``)
selects Optuna's ``JournalFileBackend`` for many processes on ONE machine without a server.
PostgreSQL (``postgresql://USER@HOST:PORT/DB``) is for several machines.

RDB storages (SQLite, PostgreSQL) get heartbeats: a running trial whose worker stops beating
for ``grace_period`` seconds is marked FAIL and re-queued by ``RetryHeartbeatStaleTrialCallback``
(the retry resumes from the failed trial's finished folds, see ``search.objective``). The
journal has no heartbeats in Optuna; ``search.worker.claims`` reaps dead workers there by pid.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import URL, make_url

from core.config import ConfigError

SQLITE_TIMEOUT_S = 60
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
#: SQLAlchemy backends we accept (``postgresql+psycopg://`` etc. are the same backends).
RDB_BACKENDS = ("sqlite", "postgresql", "mysql")
DEFAULT_HEARTBEAT_S = 30
DEFAULT_GRACE_S = 120
DEFAULT_MAX_RETRY = 3
FORMS = ("expected sqlite:///FILE, postgresql://USER@HOST:PORT/DB, "
         "or a journal file ending in .log")


def journal_path(url: str) -> Path | None:
    """The journal file named by ``url`` (``journal:PATH`` or ``PATH.log``), else None."""
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        return Path(url)
    return None


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL of an RDB storage; unknown scheme or malformed -> one ConfigError."""
    if "://" not in url:
        raise ConfigError(f"storage {url!r}: {FORMS}")
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018  (a non-numeric port only fails when read)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise ConfigError(f"storage {url!r}: malformed URL ({e}); {FORMS}") from None
    if parsed.get_backend_name() not in RDB_BACKENDS:
        scheme = url.split("://", 1)[0]
        hint = " (write postgresql://)" if scheme == "postgres" else ""
        raise ConfigError(f"storage {url!r}: unknown scheme {scheme!r}{hint}; {FORMS}")
    return parsed


def _connect_error(url: URL, error: Exception) -> ConfigError:
    shown = url.render_as_string(hide_password=True)
    text = str(getattr(error, "orig", None) or error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if url.get_backend_name() != "sqlite" and "refused" in text.lower():
        where = f"{url.host or 'localhost'}:{url.port or 5432}"
        return ConfigError(f"storage {shown}: cannot connect to {where} (connection refused); "
                           "start the database server there or check the URL")
    return ConfigError(f"storage {shown}: cannot open ({first})")


def _make_parent(url: str, path: Path) -> None:
    """Create the folder of a file storage; a path through a file is one clear line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"storage {url!r}: cannot create folder {path.parent} "
                          f"({e.strerror or e})") from None


def open_storage(url: str, *, heartbeat_interval: int | None = DEFAULT_HEARTBEAT_S,
                 grace_period: int | None = DEFAULT_GRACE_S,
                 max_retry: int | None = DEFAULT_MAX_RETRY) -> BaseStorage:
    """The storage behind ``url``; a bad or unreachable URL is one ``ConfigError`` line.

    ``heartbeat_interval=None`` turns heartbeats (and so the automatic retry) off.
    """
    journal = journal_path(url)
    if journal is not None:
        _make_parent(url, journal)
        return JournalStorage(JournalFileBackend(str(journal)))
    parsed = parse_url(url)
    kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database or ""
        if path and path != ":memory:":
            _make_parent(url, Path(path))
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:  # a server restart cuts pooled connections: test each one before it is used
        kwargs = {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", ExperimentalWarning)
            beats: dict = {}
            if heartbeat_interval is not None:
                beats = {"heartbeat_interval": int(heartbeat_interval),
                         "grace_period": int(grace_period) if grace_period else None,
                         "heartbeat_stale_trial_callback":
                             RetryHeartbeatStaleTrialCallback(max_retry=max_retry)}
            return RDBStorage(url, engine_kwargs=kwargs, **beats)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        raise _connect_error(parsed, e) from None


def open_existing_storage(url: str) -> BaseStorage:
    """``open_storage`` for readers (ensemble, dashboard): a missing SQLite file is an error.

    Opening it would create an empty database and then report "no such study" about it.
    """
    if journal_path(url) is None and parse_url(url).get_backend_name() == "sqlite":
        db = parse_url(url).database or ""
        if db and db != ":memory:" and not Path(db).is_file():
            raise ConfigError(f"storage {url}: database file {db} does not exist (run search.run "
                              "first, or pass --storage)")
    return open_storage(url)


def study_names(storage: BaseStorage) -> list[str]:
    """Names of the studies in ``storage``, sorted (for 'unknown study' messages)."""
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    return sorted(s.study_name for s in summaries)
