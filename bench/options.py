"""The top teams' options, one at a time, on the gauge's recipe: held-out gain, paired by seed.

``python -m bench.options [--seeds 3] [--arm NAME ...]`` trains the gauge (``bench.gauge``: the
seed author's recipe, once on 90% of the real-face set's training people) with one option of
``studies.top_teams`` switched on per arm, beside the same recipe without it, for each training
seed, interleaved (seed by seed, every arm), and scores each on the held-out answers: macro F1,
the ">=60" classes' F1, and the arm minus its reference with a paired bootstrap interval over
eval people (both predictions scored on the same resamples).

Why this design and not the search with ``--fix`` on and off: one option's effect inside a
six-trial search is buried under which configurations TPE happened to draw (the yardstick's
seeds spread by ~0.03); on one fixed recipe trained with the same seed, only the option differs,
and a run costs one training (~2 minutes on this CPU) instead of a search (~30). It says whether
the option helps a good recipe, which is what the default space needs to know; a search may
still combine it differently.

Arms and their reference: ``sampler`` (square-root-inverse weighted sampling) and ``soft_f1``
(0.4 soft macro-F1 + 0.6 focal, as the top team mixed it) and ``halfcut`` (half CutMix, p 0.5)
against the gauge; ``ordinal`` (the ordinal age head) against the gauge's recipe on the
three-head model (``multi``), since only that model has an age head. ``mtcnn`` is not a team's
option but the same kind of question (issue 29): the gauge on MTCNN's boxes alone, against the
gauge on the default boxes (YuNet first, MTCNN on its misses). ``pseudo`` (issue 28 item 5):
the gauge's recipe trained again with the eval images its reference (the gauge of the same
seed) is at least ``PSEUDO_THRESHOLD`` sure of, labelled with its predictions
(``search.pseudo_labels``, as ``search.refit --pseudo-labels`` does with a submission as the
teacher). ``faces`` is the gauge on crops made with other face settings, given as
``--face KEY=VALUE`` (repeatable, ``core.faces.FaceSettings`` fields: the margins and
``min_crop`` change only the crops, not the detection). Runs are cached per
(recipe, epochs, seed) under ``runs/options/`` (the gauge's own under ``runs/quality/seedN`` is
reused when ``bench.quality`` trained it). The last line is for scripts:
``options sampler=+0.0000 soft_f1=... halfcut=... ordinal=...`` (median paired held-out gain).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python bench/NAME.py): import from the checkout, not bench/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._quality_figures import median, task_f1
from bench.gauge import cached_gauge
from bench.quality import (
    STUDY,
    answers_and_people,
    check_weights_folder,
    prepare,
    protocol_parser,
)
from core.bootstrap import interval, people_bootstrap
from core.cli import run_cli
from core.errors import DataError
from search.pseudo_labels import confident

#: arm -> (its reference arm, the recipe's changes from the gauge).
ARMS: dict[str, tuple[str | None, dict]] = {
    "gauge": (None, {}),
    "sampler": ("gauge", {"sampler": "sqrt_inverse"}),
    "soft_f1": ("gauge", {"soft_f1": True, "soft_f1_weight": 0.4}),
    "halfcut": ("gauge", {"mix": "halfcut", "mix_prob": 0.5}),
    "multi": (None, {"head": "multi", "age_head": "classes"}),
    "ordinal": ("multi", {"head": "multi", "age_head": "ordinal"}),
    "mtcnn": ("gauge", {}),
    "pseudo": ("gauge", {}),
    "faces": ("gauge", {}),
}
#: ``pseudo``'s confidence threshold (what ``search.refit --pseudo-labels`` would be given).
PSEUDO_THRESHOLD = 0.9
#: arm -> its changes to the quality study's face settings (``core.faces.FaceSettings``).
FACE_CHANGES: dict[str, dict] = {"mtcnn": {"detectors": ["mtcnn"]}}


def recipe(arm: str) -> dict:
    """The gauge's recipe with ``arm``'s changes."""
    from studies import quality

    return {**quality.GAUGE, **ARMS[arm][1]}


def needed(arms: Sequence[str]) -> list[str]:
    """``arms`` and their references, references first, each once."""
    refs = [ARMS[a][0] for a in arms if ARMS[a][0]]
    return list(dict.fromkeys([*refs, *arms]))


def cache_path(runs: Path, arm: str, seed: int, faces: dict | None = None) -> Path:
    """Where a run is kept; the gauge reuses ``bench.quality``'s own training of it; a
    ``faces`` arm's name says its settings."""
    if arm == "gauge":
        return runs / STUDY / f"seed{seed}" / "gauge.npz"
    if arm == "faces":
        arm += re.sub(r"[^\w.=-]", "", "".join(f"-{k}={v}" for k, v in
                                               sorted((faces or {}).items())))
    return runs / "options" / f"{arm}-seed{seed}.npz"


def face_changes(items: Sequence[str]) -> dict:
    """``--face KEY=VALUE`` items as changes to the face settings (an unknown field or bad
    value is one line)."""
    from core.train_fold import build_faces, parse_set

    settings = build_faces(list(items))  # checks the names and values
    return {k: getattr(settings, k) for k in parse_set(list(items))}


def paired(answers: np.ndarray, people: np.ndarray, ref: np.ndarray, arm: np.ndarray) -> dict:
    """Held-out figures of ``arm`` and its gain over ``ref`` with a paired 95% interval."""
    a, r = task_f1(answers, arm), task_f1(answers, ref)
    boot = people_bootstrap(answers, [ref, arm], people)
    return {"f1": a["f1"], "old_classes": a["old_classes"], "gain": a["f1"] - r["f1"],
            "gain_interval": interval(boot[:, 1] - boot[:, 0]),
            "old_classes_gain": a["old_classes"] - r["old_classes"]}


def run(args: argparse.Namespace) -> dict:
    from search import paths

    unknown = [a for a in args.arm or [] if a not in ARMS]
    if unknown:
        raise DataError(f"--arm {unknown[0]!r}: not one of {', '.join(ARMS)}")
    args.weights = check_weights_folder(args.weights)
    runs = paths.runs_dir()
    data, _, _ = prepare(args, runs)
    arms = needed(args.arm or [a for a in ARMS if ARMS[a][0] and a != "faces"])
    changes = {**FACE_CHANGES, "faces": face_changes(args.face or [])}
    if "faces" in arms and not args.face:
        raise DataError("--arm faces needs the settings to try: --face KEY=VALUE (repeatable)")
    answers = people = None
    rows: list[dict] = []
    probs_of: dict[str, np.ndarray] = {}
    for seed in range(args.seed, args.seed + args.seeds):  # interleaved: every arm per seed
        preds, taken = {}, None
        for arm in arms:
            path = cache_path(runs, arm, seed, changes.get(arm))
            path.parent.mkdir(parents=True, exist_ok=True)
            if arm == "pseudo":  # its reference's eval predictions, where they are sure
                teacher = probs_of[ARMS[arm][0]]
                taken = confident(teacher, teacher.argmax(axis=1), PSEUDO_THRESHOLD)
                print(f"seed {seed} pseudo: {(taken >= 0).mean():.0%} of the eval images at "
                      f">= {PSEUDO_THRESHOLD}", flush=True)
            g = cached_gauge(path, data, args.weights, args.epochs, args.device, seed, recipe(arm),
                             changes.get(arm), taken if arm == "pseudo" else None)
            probs_of[arm] = g["eval_probs"]
            preds[arm] = g["eval_probs"].argmax(axis=1)
            if answers is None:
                from core.dataset import load_eval_table

                answers, people = answers_and_people(data, load_eval_table(data)["ImageID"])
            took = "reused" if g.get("reused") else f"{g['seconds']:.0f} s"
            print(f"seed {seed} {arm}: {task_f1(answers, preds[arm])['f1']:.4f} ({took})",
                  flush=True)
        for arm in arms:
            ref = ARMS[arm][0]
            if ref:
                rows.append({"seed": seed, "arm": arm, "reference": ref,
                             **paired(answers, people, preds[ref], preds[arm])})
    for r in rows:
        lo, hi = r["gain_interval"]
        print(f"seed {r['seed']} {r['arm']} - {r['reference']}: {r['gain']:+.4f} "
              f"[{lo:+.3f}, {hi:+.3f}], '>=60' {r['old_classes_gain']:+.3f}")
    summary = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        gains = [r["gain"] for r in rows if r["arm"] == arm]
        old = [r["old_classes_gain"] for r in rows if r["arm"] == arm]
        summary[arm] = {"gain": median(gains), "spread": float(np.ptp(gains)),
                        "old_classes_gain": median(old), "seeds": len(gains)}
        print(f"{arm}: median gain {median(gains):+.4f} (spread {np.ptp(gains):.4f}), "
              f"'>=60' {median(old):+.3f}, {len(gains)} seed(s)")
    out = runs / "options" / ("options.json" if not args.arm
                              else f"options-{'-'.join(args.arm)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")
    print("options " + " ".join(f"{a}={s['gain']:+.4f}" for a, s in summary.items()), flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = protocol_parser("python -m bench.options", __doc__.split("\n")[0], search=False)
    p.add_argument("--arm", action="append",
                   help=f"an arm to run (repeatable; default all but faces): {', '.join(ARMS)}")
    p.add_argument("--face", action="append", metavar="KEY=VALUE",
                   help="the faces arm's face settings (repeatable), e.g. yunet_margin=0.18")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)  # run's result (a dict) means success


if __name__ == "__main__":
    sys.exit(main())
