"""tools/mutate.py's breaks still apply to today's code: each text to break occurs exactly once
in its file and each names a test that exists. Without this, a refactor that moved the code
would turn a break into a no-op (and a "MISSED" that means nothing) or point at a test renamed
away. Running the breaks themselves takes minutes: ``python tools/mutate.py``."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
mutate = sys.modules["mutate"] = importlib.util.module_from_spec(_spec)  # dataclass needs it
_spec.loader.exec_module(mutate)


def _test_functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


@pytest.mark.parametrize("brk", mutate.BREAKS, ids=lambda b: b.promise[:40])
def test_each_break_applies_once_and_names_a_test_that_exists(brk) -> None:
    text = (ROOT / brk.file).read_text()
    assert text.count(brk.old) == 1, f"{brk.file}: {brk.old!r}"
    assert brk.new != brk.old
    file, _, name = brk.test.partition("::")
    assert (ROOT / file).is_file()
    assert not name or name in _test_functions(ROOT / file)


def test_apply_replaces_the_text_in_a_copy_and_refuses_a_text_not_found(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("a = 1\nb = 2\n")
    mutate.apply(mutate.Break("b", "m.py", "b = 2", "b = 3", "t.py"), tmp_path)
    assert (tmp_path / "m.py").read_text() == "a = 1\nb = 3\n"
    with pytest.raises(SystemExit, match="m.py: the text to break occurs 0 times"):
        mutate.apply(mutate.Break("b", "m.py", "b = 2", "b = 4", "t.py"), tmp_path)
