"""Errors for expected problems: a CLI prints the message as one line and exits non-zero."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file or field and what is wrong."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut to ``limit``): an error as one log line."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
