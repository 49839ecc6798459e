"""Files over 350 lines and functions over 70 lines in core/, search/ and studies/.

    python tools/code_size.py          # lists offenders; exit 1 when there are any

Why: a file or function past these sizes does more than one job (the team's rule, issue 16).
Lines are physical lines; a function's length runs from its ``def`` to its last line.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "search", "studies")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 350, 70


def offenders(root: Path = ROOT) -> list[str]:
    """One line per file or function over its limit, longest first within each kind."""
    files, functions = [], []
    for path in sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(root)
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            files.append((n, f"{rel}: {n} lines (limit {MAX_FILE_LINES})"))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    functions.append((length, f"{rel}:{node.lineno} {node.name}: {length} lines "
                                              f"(limit {MAX_FUNCTION_LINES})"))
    return [line for _, line in sorted(files, reverse=True) + sorted(functions, reverse=True)]


if __name__ == "__main__":
    found = offenders()
    print("\n".join(found) if found else "every file and function is within the limits")
    sys.exit(1 if found else 0)
