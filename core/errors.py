"""Errors for expected problems: a CLI prints the message as one line and exits non-zero."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file or field and what is wrong."""
