"""Every benchmark starts both ways a newcomer tries: ``python -m bench.NAME`` from the checkout
and ``python bench/NAME.py`` (the form the file's own path suggests), from another folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHES)
def test_a_benchmark_runs_as_a_file_from_anywhere(name: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--help"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage:")
