"""The one place that knows the ``runs/`` layout, and that study names cannot escape it.

Everything a search writes by default lives under one runs folder (``./runs``, or
``$MASK_SEARCH_RUNS``): ``<study>.db`` (SQLite storage), ``artifacts/`` (Optuna artifact store),
``<study>/`` (ensemble outputs), ``demo_data/`` (the demo study's synthetic data). A study name
becomes part of file names, so it is checked here: letters, digits, ``._-`` only, never ``..``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from core.config import ConfigError

RUNS_ENV = "MASK_SEARCH_RUNS"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def runs_dir() -> Path:
    """The runs folder (absolute), from ``$MASK_SEARCH_RUNS`` or ``./runs``; not created here."""
    return Path(os.environ.get(RUNS_ENV) or "runs").resolve()


def check_study_name(name: str) -> str:
    """Return ``name`` when it is safe inside file names; else one-line ``ConfigError``."""
    # fullmatch, not match: "$" would let a trailing newline through ("demo\n.db").
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"study name {name!r}: use letters, digits, '.', '_' or '-' (no '/', no '..'), "
            "at most 100 characters"
        )
    return name


def study_dir(name: str) -> Path:
    """Per-study output folder (``runs/<study>/``): ensemble submission and reports."""
    return runs_dir() / check_study_name(name)


def default_storage_url(name: str) -> str:
    """SQLite file ``runs/<study>.db`` as an SQLAlchemy URL (absolute path)."""
    return f"sqlite:///{runs_dir() / (check_study_name(name) + '.db')}"


def default_artifacts_dir() -> Path:
    """The shared artifact store folder (``runs/artifacts``)."""
    return runs_dir() / "artifacts"


def inside(base: Path, path: str | Path) -> Path:
    """``base / path`` resolved, refusing anything that resolves outside ``base`` (``../``)."""
    base = Path(base).resolve()
    p = (base / path).resolve()
    if p != base and base not in p.parents:
        raise ConfigError(f"path {str(path)!r} escapes {base}")
    return p
