"""Score a submission against true answers: ``python -m search.ensemble.score SUB ANSWERS``.

Why a command: synthetic data (the demo, ``core.synth``) ship ``eval_answers.csv``, and the
ensemble's last line tells the user how to check its submission on them with the one macro F1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from core.answers import read_answers
from core.cli import Parser, run_cli
from core.errors import DataError
from core.metrics import macro_f1


def score(submission: str | Path, answers: str | Path) -> float:
    """Macro F1 of the submission's ``ans`` against the answers', matched on ImageID."""
    sub, truth = read_answers(submission), read_answers(answers)
    missing = truth.index.difference(sub.index)
    if len(missing):
        raise DataError(f"{submission}: no row for ImageID {missing[0]!r} "
                        f"({len(missing)} missing)")
    return macro_f1(truth.to_numpy(), sub.loc[truth.index].to_numpy())


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="python -m search.ensemble.score",
               description="Macro F1 of a submission CSV on true answers.")
    p.add_argument("submission", help="ImageID,ans CSV (search.ensemble's output)")
    p.add_argument("answers", help="ImageID,ans CSV with the true classes")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    return run_cli(lambda: print(f"macro F1 {score(args.submission, args.answers):.4f}"),
                   args.debug)


if __name__ == "__main__":
    sys.exit(main())
