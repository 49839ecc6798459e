"""The team's size rule (``tools/code_size.py``: files <= 350 lines, functions <= 70 in core/,
search/ and studies/) holds, so a file that grows past one job is split when it grows, not
rounds later."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_size():
    spec = importlib.util.spec_from_file_location("code_size", ROOT / "tools" / "code_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_file_or_function_over_the_limits() -> None:
    assert _code_size().offenders() == []


def test_the_rule_sees_an_oversized_function(tmp_path: Path) -> None:
    code_size = _code_size()
    pkg = tmp_path / "core"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(code_size.MAX_FUNCTION_LINES))
    (pkg / "big.py").write_text(f"def grown():\n{body}\n")
    for name in ("search", "studies"):
        (tmp_path / name).mkdir()
    assert code_size.offenders(tmp_path) == [
        f"core/big.py:1 grown: {code_size.MAX_FUNCTION_LINES + 1} lines "
        f"(limit {code_size.MAX_FUNCTION_LINES})"]
