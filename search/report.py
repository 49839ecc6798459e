"""CLI: ``python -m search.report --study NAME``: the whole study in one HTML file.

One self-contained page (every image embedded, no script, nothing fetched) to hand in or share:
the leaderboard, the history and Optuna's parameter importances, per-fold validation curves of
the best trials, the submission ensemble with its nested estimate, its out-of-fold confusion
matrix and per-class F1 (the ">=60" classes marked), face-crop statistics by box source, and
the best trial's Grad-CAM grid. Written to ``runs/<study>/report.html`` (temp name, then
rename); the path is printed.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure

from core.atomic import atomic_write
from core.cache import build_cache
from core.cli import Parser, run_cli
from core.errors import first_line
from core.labels import AGE_GROUP_NAMES, CLASS_NAMES, MASK_NAMES, decode
from core.metrics import macro_f1
from search import paths
from search.artifacts import OOF, finished_artifacts, load_array
from search.ensemble.submission import Submission
from search.finished_study import (
    FinishedStudy,
    add_study_flags,
    open_finished,
    study_rows,
)
from search.trial_plots import class_f1, confusion_png

CURVE_TRIALS = 5  # best trials whose fold curves are drawn
OLD = AGE_GROUP_NAMES[-1]  # ">=60": the rare group that decides macro F1


def png_tag(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def figure_tag(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    return png_tag(buf.getvalue(), alt)


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """Every trial, best first: number, state, value, minutes, params."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else float("nan"))
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "minutes": round(seconds / 60, 2),
                     **{k: (f"{v:.3g}" if isinstance(v, float) else v)
                        for k, v in t.params.items()}})
    table = pd.DataFrame(rows)
    return table.sort_values(["value", "trial"], ascending=[False, True], na_position="last")


def history_tag(study: optuna.Study) -> str:
    done = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    x = [t.number for t in done]
    y = [t.value for t in done]
    ax.scatter(x, y, s=12, label="complete trial")
    ax.step(x, np.maximum.accumulate(y), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("OOF macro F1")
    ax.legend(fontsize=8)
    return figure_tag(fig, "history")


def importance_tag(study: optuna.Study) -> str:
    """Optuna's own importance evaluator (fANOVA); a note when it cannot say (too few trials)."""
    try:
        imp = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
        return f"<p>No parameter importances yet: {html.escape(first_line(e))}</p>"
    if not imp:
        return "<p>No parameter importances yet (no parameter varied).</p>"
    fig = Figure(figsize=(6, 0.35 * len(imp) + 1))
    ax = fig.add_subplot()
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    return figure_tag(fig, "parameter importances")


def curves_tag(found: FinishedStudy, trials: list) -> str:
    """Validation macro F1 per epoch of each fold (``fold_done_<k>`` curves) of the best trials."""
    fig = Figure(figsize=(3 * len(trials), 2.6))
    for i, t in enumerate(trials):
        ax = fig.add_subplot(1, len(trials), i + 1)
        for k in range(found.n_folds):
            curve = (t.user_attrs.get(f"fold_done_{k}") or {}).get("curve", [])
            ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=f"fold {k}")
        ax.set_title(f"trial {t.number}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    fig.axes[0].set_ylabel("val macro F1", fontsize=8)
    fig.axes[0].legend(fontsize=7)
    return figure_tag(fig, "fold curves")


def ensemble_oof(found: FinishedStudy, sub: Submission) -> np.ndarray:
    """The submission's in-sample OOF classes: its members' OOF, blended and decided as the
    submission's JSON says."""
    return sub.classes([load_array(found.trial(m.trial), found.store, OOF)
                        for m in sub.members])[1]


def submission_section(found: FinishedStudy, sub: Submission, labels: np.ndarray) -> str:
    f = sub.figures
    members = pd.DataFrame([vars(m) for m in sub.members])[["trial", "weight", "oof_f1",
                                                             "value"]]
    figures = pd.DataFrame(
        [("ensemble, nested cross-fitted", f["ensemble_cross_fitted_f1"]),
         ("best single trial, nested cross-fitted", f["best_single_cross_fitted_f1"]),
         ("ensemble, in-sample OOF (optimistic)", f["ensemble_oof_f1_in_sample"]),
         *[(f"eval answers: {k}", f[f"{k}_eval_f1"]) for k in ("ensemble", "best_single")
           if f"{k}_eval_f1" in f]], columns=["figure", "macro F1"])
    pred = ensemble_oof(found, sub)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "confusion.png"
        confusion_png(labels, pred, png, "submission, out-of-fold (in-sample)")
        matrix = png_tag(png.read_bytes(), "confusion matrix")
    per_class = pd.DataFrame({"class": list(CLASS_NAMES),
                              "F1": list(class_f1(labels, pred).values())})
    per_class[">=60"] = [("yes" if AGE_GROUP_NAMES[a] == OLD else "")
                         for a in decode(np.arange(len(CLASS_NAMES)))[2]]
    return (f"<p>The submission uses {html.escape(sub.what_it_uses())}; out-of-fold macro "
            f"F1 of what it submits: {macro_f1(labels, pred):.4f} (in-sample).</p>"
            + figures.to_html(index=False, float_format="%.4f") + members.to_html(
                index=False, float_format="%.4f") + matrix
            + per_class.to_html(index=False, float_format="%.4f", na_rep="-",
                                classes="per-class"))


def crops_section(found: FinishedStudy, table: pd.DataFrame, data_dir: Path,
                  image_size: Sequence[int]) -> str:
    """Share of images per box source: train by mask state, and eval, from the study's cache."""
    index = build_cache(data_dir, tuple(image_size), found.faces, progress=False).index
    train = index[index["split"] == "train"].merge(table[["file", "mask"]], on="file")
    train["group"] = ["train " + MASK_NAMES[int(m)] for m in train["mask"]]
    ev = index[index["split"] == "eval"].assign(group="eval (all)")
    both = pd.concat([train[["group", "box_source"]], ev[["group", "box_source"]]])
    shares = pd.crosstab(both["group"], both["box_source"], normalize="index")
    return ("<p>Where each face crop came from (yunet / mtcnn: the detector that found it, "
            "YuNet first, MTCNN on its misses; retry: MTCNN's second pass; dataset / center: "
            "the fallback box).</p>"
            + shares.to_html(float_format="%.3f"))


def gradcam_section(found: FinishedStudy, number: int) -> str:
    from search.explain import gradcam_name  # lazy: search.explain imports grad-cam (~4 s)

    for meta in finished_artifacts(found.study, found.trial(number)).values():
        if meta["filename"] == gradcam_name(number):
            with found.store.open_reader(meta["artifact_id"]) as f:
                return png_tag(f.read(), "Grad-CAM")
    return (f"<p>No Grad-CAM grid for trial {number} yet: python -m search.explain --study "
            f"{html.escape(found.name)} --trial {number}</p>")


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%;display:block;margin:1em 0}"""


def page(found: FinishedStudy) -> str:
    study = found.study
    submitted = found.submission()
    best = found.complete()
    data_dir, table, _ = study_rows(study)
    labels = table["label"].to_numpy(np.int64)
    board = leaderboard(study)
    parts = [
        f"<h1>Study {html.escape(found.name)}</h1>",
        f"<p>{len(board)} trials: " + ", ".join(
            f"{n} {s.lower()}" for s, n in board["state"].value_counts().items())
        + f". Best trial {best[0].number}: OOF macro F1 {best[0].value:.4f}.</p>",
        "<h2>Submission</h2>", submission_section(found, submitted, labels),
        "<h2>History</h2>", history_tag(study),
        "<h2>Parameter importances</h2>", importance_tag(study),
        "<h2>Validation curves (best trials, each fold)</h2>",
        curves_tag(found, best[:CURVE_TRIALS]),
        "<h2>Face crops</h2>",
        crops_section(found, table, data_dir, best[0].user_attrs["config"]["image_size"]),
        f"<h2>Grad-CAM, trial {best[0].number}</h2>", gradcam_section(found, best[0].number),
        "<h2>Leaderboard</h2>", board.to_html(index=False, float_format="%.4f", na_rep=""),
    ]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Study "
            f"{html.escape(found.name)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m search.report", description=__doc__.split("\n")[0])
    add_study_flags(p)
    p.add_argument("--out", type=Path, help="HTML file (default runs/<study>/report.html)")
    return p


def run(args: argparse.Namespace) -> Path:
    found = open_finished(args)
    text = page(found)
    out = args.out or paths.study_dir(args.study) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"wrote {out}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
