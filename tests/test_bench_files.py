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


@pytest.mark.slow
def test_bench_search_races_at_equal_wall_time(tiny_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``--seconds S``: each arm searches for S seconds (the trial running at the deadline is
    cut at an epoch boundary), and the last line compares trials evaluated, not epochs."""
    import re

    from bench.search import main

    # a 3-fold, 1-epoch trial of the tiny set takes a few seconds on a quiet 2-core machine and
    # 11 s beside a benchmark: 20 s per arm holds one with room (8 s once failed under load)
    main(["--data", str(tiny_data), "--seconds", "20", "--seeds", "1", "--epochs", "1",
          "--arms", "median"])
    out = capsys.readouterr().out
    assert "demo study, 20 s per arm and seed" in out
    per_arm = re.findall(r"^seed 0 (\w+) +epochs +\d+ best \S+ evaluated +(\d+) pruned", out,
                         re.M)
    assert [name for name, _ in per_arm] == ["none", "median"]
    assert all(int(n) >= 1 for _, n in per_arm), out
    assert re.search(r"^median +\d+\.\d\d", out, re.M)
    assert re.fullmatch(r"search seconds=20 trials_ratio=\d+\.\d\d best_gap=[+-]\d\.\d{4} "
                        r"arm=median seeds=1", out.strip().splitlines()[-1])
