"""Open an Optuna storage from a URL: SQLite with a busy timeout, PostgreSQL, or a journal file.

SQLite is the zero-setup default; several processes on one file need a busy timeout or they
die with "database is locked". A path ending in ``.log``/``.journal`` (or ``journal:PATH``)
selects Optuna's ``JournalFileBackend`` for many processes on one machine without a server.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from core.config import ConfigError

SQLITE_TIMEOUT_S = 60
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


def _journal_path(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:"))
    if "://" not in url and url.endswith(JOURNAL_SUFFIXES):
        return Path(url)
    return None


def open_storage(url: str) -> BaseStorage:
    """The storage behind ``url``; a bad or unreachable URL is one ``ConfigError`` line."""
    journal = _journal_path(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal)))
    if "://" not in url:
        raise ConfigError(
            f"storage {url!r}: expected sqlite:///FILE, postgresql://USER@HOST/DB, "
            "or a journal file ending in .log"
        )
    kwargs: dict = {}
    if url.startswith("sqlite:"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        return RDBStorage(url, engine_kwargs=kwargs)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"storage {url!r}: cannot open ({first})") from None


def study_names(storage: BaseStorage) -> list[str]:
    """Names of the studies in ``storage``, sorted (for 'unknown study' messages)."""
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    return sorted(s.study_name for s in summaries)
