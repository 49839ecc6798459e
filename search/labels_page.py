"""The review page of ``search.labels``: each suspect's photos with given and suggested labels.

One self-contained HTML file beside ``suspects.csv``: thumbnails are embedded as small base64
JPEGs (a few KB each), not linked, because the page is written under ``runs/`` while the photos
live in the data folder, often on another disk or machine: relative links would break as soon
as either moves or the page is mailed to whoever reviews. No script and nothing fetched, like
``search.report``. A reviewer reads a card (the photos, what the model says of each) and keeps
or deletes the row with the same rank in the CSV.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from core.errors import DataError
from core.images import read_rgb

THUMB = (96, 128)  # (width, height) at most; the competition's photos are 384x512
STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1250px}
.card{border:1px solid #ccc;border-radius:6px;margin:0 0 1em;padding:.5em .8em}
.card.flagged{border-left:6px solid #c0392b}.card.ranked{border-left:6px solid #aaa}
.head{font-size:14px;margin-bottom:.4em}.head b{font-size:15px}
.given{color:#555}.suggested{color:#c0392b;font-weight:bold}
.photos{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;text-align:center;font-size:11px;width:104px}
figure img{display:block;margin:0 auto 2px;border:1px solid #ddd}
.bad{width:96px;height:128px;background:#eee;display:flex;align-items:center;
justify-content:center;color:#a00;font-size:10px}"""


def thumbnail(path: Path) -> str:
    """An ``<img>`` of the photo as a small embedded JPEG, or the reason it cannot be shown."""
    try:
        img = Image.fromarray(read_rgb(path))
    except DataError as e:
        return f'<div class="bad">{html.escape(getattr(e, "reason", str(e)))}</div>'
    img.thumbnail(THUMB)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return (f'<img alt="{html.escape(path.name)}" width="{img.width}" height="{img.height}" '
            f'src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">')


def card(rank: int, row: pd.Series, files: np.ndarray, data_dir: Path) -> str:
    figures = "".join(
        f"<figure>{thumbnail(data_dir / files[r])}<figcaption>"
        f"{html.escape(Path(files[r]).stem)}<br>{html.escape(note)}</figcaption></figure>"
        for r, note in zip(row["rows"], row["notes"], strict=True))
    return (f'<div class="card {row["status"]}"><div class="head"><b>#{rank} '
            f'{html.escape(row["target"])}</b> &middot; {html.escape(row["field"])}: '
            f'<span class="given">{html.escape(row["given"])}</span> &rarr; '
            f'<span class="suggested">{html.escape(row["suggested"])}</span> '
            f'(score {row["score"]:.3f}, {row["status"]}; correction value '
            f'{html.escape(row["value"])})</div><div class="photos">{figures}</div></div>')


def page(study: str, suspects: pd.DataFrame, table: pd.DataFrame, data_dir: Path,
         source: str) -> str:
    """The whole page for ``suspects`` (``search.labels.find_suspects`` rows, in file order)."""
    files = table["file"].to_numpy()
    cards = [card(i + 1, row, files, data_dir) for i, row in suspects.iterrows()]
    intro = (f"<p>{len(suspects)} suspect(s), from {html.escape(source)}. Rank = row order in "
             "suspects.csv (after the study's own corrections, if any). Keep the rows you "
             "accept, delete the others, pass the file with --corrections to a new study. "
             "Scores near 1: the model's out-of-fold probabilities contradict the label.</p>")
    body = "\n".join(cards) if cards else "<p>No suspects: nothing to review.</p>"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Label suspects: "
            f"{html.escape(study)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Label suspects: study {html.escape(study)}</h1>{intro}{body}</body></html>")
