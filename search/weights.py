"""CLI: fetch, once and on a machine with internet, the pretrained weights a study can pick.

``python -m search.weights --study mask --out weights/`` downloads (timm's own hub loading) the
ImageNet weights of every pretrained backbone the study's space can pick (``--fix backbone=X``
narrows it) and writes ``weights/<timm model name>.safetensors``, each under a temporary name
and renamed when complete, so an interrupted download is never taken for a file. Copy the folder
to the GPU machine and pass ``--weights weights/`` to ``search.run`` (or set
``$MASK_SEARCH_WEIGHTS``); nothing there touches the network. Files already there are kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import timm
from safetensors.torch import save_file
from tqdm.auto import tqdm

from core.atomic import atomic_write, remove_dead_temps
from core.cli import Parser, run_cli
from core.config import ConfigError
from core.errors import first_line
from core.weights import weights_file
from search.space import explore, parse_fixes
from studies import STUDIES, get_study


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.weights", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help=f"study name, one of: {', '.join(STUDIES)}")
    p.add_argument("--out", required=True, help="folder to write <model>.safetensors into")
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="only the backbones the space can pick with these fixed (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


def fetch(backbone: str, out: Path) -> Path:
    """Download ``backbone``'s default pretrained weights and write them to ``out`` atomically."""
    try:
        model = timm.create_model(backbone, pretrained=True)
    except Exception as e:  # hub/network errors come in many types; all mean "no download"
        raise ConfigError(f"could not download pretrained weights for {backbone!r} "
                          f"({first_line(e)}); this needs internet access to the Hugging Face "
                          "Hub") from e
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = out / f"{backbone}.safetensors"
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def run(args: argparse.Namespace) -> list[Path]:
    module = get_study(args.study)
    backbones = explore(module, parse_fixes(module, args.fix)).pretrained_backbones()
    if not backbones:
        print(f"study {args.study!r} picks no pretrained backbone: nothing to fetch")
        return []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out)
    written = []
    for backbone in tqdm(backbones, desc="weights", unit="model"):
        have = weights_file(out, backbone)
        written.append(have if have is not None else fetch(backbone, out))
    for path in written:
        print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB")
    print(f"next: copy {out} to the training machine and pass --weights {out} to "
          f"python -m search.run --study {args.study}")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
