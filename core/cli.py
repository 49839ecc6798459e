"""The one way our command-line tools report expected problems.

Bad data, a bad configuration or an unusable path is the user's to fix, not a bug: print one
line on stderr and exit 2. ``--debug`` (or ``MASK_SEARCH_DEBUG=1``) lets the exception through
so Python prints the traceback. A flag mistake (``--trials 0``, a missing ``--study``, an unknown
flag) is the same: one ``error:`` line and exit 2 from ``Parser``, every CLI's parser, instead of
argparse's usage block.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from core.config import ConfigError
from core.errors import DataError

EXPECTED: tuple[type[Exception], ...] = (DataError, ConfigError)


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr and exit 2:
    ``error: MESSAGE (python -m PROG --help lists the flags)``. ``--help`` is unchanged."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"error: {text} ({self.prog} --help lists the flags)\n")


def run_cli(body: Callable[[], object], debug: bool = False,
            expected: tuple[type[Exception], ...] = EXPECTED) -> int:
    """Run ``body``; an ``expected`` error becomes ``error: MESSAGE`` and exit code 2.

    ``body`` returns its exit code, or anything else (None, a result) for success.
    """
    try:
        code = body()
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except expected as e:
        if debug or os.environ.get("MASK_SEARCH_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
