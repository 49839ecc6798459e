"""CLI: ``python -m search.dashboard --study NAME`` opens optuna-dashboard on a study.

It finds the study's storage and artifact folder the same way ``search.run`` does, so one name
is enough, and binds to 127.0.0.1 unless ``--host`` says otherwise (the dashboard can edit
studies and has no login).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from typing import BinaryIO

from optuna.artifacts.exceptions import ArtifactNotFound

from core.cli import EXPECTED, Parser, run_cli
from core.config import ConfigError
from search import paths
from search.artifacts import open_store
from search.worker.storage import open_existing_storage, study_names


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.dashboard", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="study name (finds runs/<study>.db)")
    p.add_argument("--storage", help="storage URL (default sqlite:///runs/<study>.db)")
    p.add_argument("--artifacts", help="artifact folder (default runs/artifacts)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


#: What the dashboard serves for an artifact that checkpoint retention has deleted.
REMOVED = (b"This artifact was removed by checkpoint retention: search.run keeps fold checkpoints "
           b"of the best --keep-checkpoints complete trials only.\n")


class RemovedSaysSo:
    """The artifact store as the dashboard reads it: a removed artifact answers a short note.

    Optuna keeps a finished trial's artifact list read-only, so the dashboard still lists a
    checkpoint that retention deleted, and a missing file would be a 500 error page; the note
    says what happened instead.
    """

    def __init__(self, store) -> None:
        self._store = store

    def open_reader(self, artifact_id: str) -> BinaryIO:
        try:
            return self._store.open_reader(artifact_id)
        except ArtifactNotFound:
            return io.BytesIO(REMOVED)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        self._store.write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._store.remove(artifact_id)


def run(args: argparse.Namespace) -> int:
    name = paths.check_study_name(args.study)
    url = args.storage or paths.default_storage_url(name)
    storage = open_existing_storage(url)
    known = study_names(storage)
    if name not in known:
        raise ConfigError(f"study {name!r} is not in {url}; studies there: "
                          f"{', '.join(known) or 'none'}")
    store = open_store(args.artifacts or paths.default_artifacts_dir())
    from optuna_dashboard import run_server  # lazy: importing it costs seconds

    print(f"optuna-dashboard for study {name!r}: http://{args.host}:{args.port}/dashboard "
          "(Ctrl-C to stop)", flush=True)
    try:
        run_server(storage, host=args.host, port=args.port,
                   artifact_store=RemovedSaysSo(store))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug, (*EXPECTED, OSError))


if __name__ == "__main__":
    sys.exit(main())
