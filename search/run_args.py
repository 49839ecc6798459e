"""The command line of ``python -m search.run``: every flag, its type and its help."""

from __future__ import annotations

import argparse

from core.cli import Parser
from core.weights import WEIGHTS_ENV
from search.study_settings import PRUNERS, SAMPLERS
from search.tracking import INSTALL, TRACKERS
from search.worker.final_stage import DEFAULT_FINAL, EPOCHS_FACTOR
from search.worker.retention import DEFAULT_KEEP_CHECKPOINTS
from search.worker.storage import DEFAULT_GRACE_S, DEFAULT_HEARTBEAT_S, DEFAULT_MAX_RETRY
from studies import STUDIES

DESCRIPTION = "Create or resume a study and run trials until it has N finished ones."


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def gpu_list(text: str) -> list[str]:
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(
            f"expected distinct GPU numbers like 0,1,2,3, got {text!r}")
    return gpus


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def fraction(text: str) -> float:
    """A probability above 0 and at most 1."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {value}")
    return value


def add_data_flag(p: argparse.ArgumentParser) -> None:
    """``--data``: where the study's data lives (a study's own is stored on it)."""
    p.add_argument("--data", help="data folder (default: the study's; mask: $MASK_DATA)")


def add_machine_flags(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--weights``: where training runs and where pretrained weights are."""
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--weights", help=f"folder of pretrained weights named by timm model name "
                                     f"(DIR/resnet34.safetensors; from python -m search.weights); "
                                     f"default ${WEIGHTS_ENV}, else the Hugging Face cache")


def add_loader_flags(p: argparse.ArgumentParser) -> None:
    """``--loader-workers`` and ``--keep-checkpoints``: per-process loading and disk use."""
    p.add_argument("--loader-workers", type=non_negative_int,
                   help="DataLoader worker processes per training process (default: on CUDA "
                        "(cores / processes) - 1, at most 12; on the CPU 0)")
    p.add_argument("--keep-checkpoints", type=non_negative_int, default=DEFAULT_KEEP_CHECKPOINTS,
                   help="keep fold checkpoints of the best K complete trials (default %(default)s)")


def add_liveness_flags(p: argparse.ArgumentParser) -> None:
    """``--heartbeat-interval``, ``--grace-period``, ``--max-retry``: how a dead worker's trial
    is found and retried from its finished folds."""
    p.add_argument("--heartbeat-interval", type=positive_int, default=DEFAULT_HEARTBEAT_S,
                   help="SQLite/PostgreSQL: seconds between a running trial's heartbeats "
                        "(default %(default)s)")
    p.add_argument("--grace-period", type=positive_int, default=DEFAULT_GRACE_S,
                   help="seconds without a heartbeat before a trial counts as dead, is marked "
                        "FAIL and retried (default %(default)s)")
    p.add_argument("--max-retry", type=non_negative_int, default=DEFAULT_MAX_RETRY,
                   help="retries of a trial whose worker died (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.run", description=DESCRIPTION)
    p.add_argument("--study", required=True, help=f"study name, one of: {', '.join(STUDIES)}")
    p.add_argument("--trials", type=positive_int, required=True,
                   help="finished (complete + pruned) trials the study should end with")
    add_data_flag(p)
    p.add_argument("--storage", help="sqlite:///FILE, postgresql://..., or FILE.log (journal); "
                                     "default sqlite:///runs/<study>.db")
    p.add_argument("--artifacts", help="artifact folder or s3://bucket/prefix "
                                       "(default runs/artifacts)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=positive_float,
                        help="time budget: no trial starts that the study's record says cannot "
                             "finish in time, and at the deadline the running trial stops at "
                             "its next epoch (FAIL 'time budget', resumed by a rerun)")
    budget.add_argument("--timeout", type=positive_float, help="the same budget in seconds")
    p.add_argument("--final", type=non_negative_int, default=DEFAULT_FINAL, metavar="K",
                   help="with --hours/--timeout: keep time for the final stage, the K best "
                        f"configurations retrained at {EPOCHS_FACTOR}x the epochs on the same "
                        "folds (as search.refit does) once the search has used its share, then "
                        "search on in what is left; 0: off (default %(default)s)")
    p.add_argument("--pruner", choices=PRUNERS,
                   help="default: median for a new study; on a rerun, the study's own pruner "
                        "(its report mode is fixed when it is created: wilcoxon reports per "
                        "fold, the others per epoch)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--seed", type=int, help="sampler seed (default: random)")
    p.add_argument("--folds", type=positive_int,
                   help="folds (fixed when the study is created; default the study's)")
    p.add_argument("--epochs", type=positive_int,
                   help="epochs per fold (fixed when the study is created; default the study's)")
    add_machine_flags(p)
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a parameter of the study's space and search the rest (repeatable; "
                        "fixed when the study is created)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="do not enqueue the study's known-good recipes as its first trials")
    p.add_argument("--corrections", metavar="FILE|none",
                   help="label corrections CSV, or none (fixed when the study is created; "
                        "default the study's: mask uses the shipped public list)")
    add_loader_flags(p)
    many = p.add_mutually_exclusive_group()
    many.add_argument("--workers", type=positive_int, default=1,
                      help="worker processes on the CPU, sharing its cores (default 1)")
    many.add_argument("--gpus", type=gpu_list,
                      help="one worker process per GPU, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES)")
    add_liveness_flags(p)
    p.add_argument("--worker-id", type=non_negative_int, help=argparse.SUPPRESS)
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    p.add_argument("--log-to", action="append", default=[], choices=list(TRACKERS),
                   help="also log each finished trial (params, value, state, per-epoch curve, "
                        "confusion plot) to W&B (offline: runs/<study>/wandb) or MLflow "
                        "($MLFLOW_TRACKING_URI, else runs/mlflow.db); repeatable; "
                        f"needs {INSTALL}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    return p


