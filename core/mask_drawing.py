"""Draw a face mask onto a real face photo: worn, or one of the ways it is worn wrong.

Why our own drawing: the real-face development set (``core.synth_faces``) needs the three mask
states on photos that have none, with the variety a model must not shortcut on: several shapes
(surgical, KN95, cloth), colours and patterns (plain, stripes, dots, checks). Positions are
relative to the aligned face square (UTKFace crops: eyes near 0.3 of its height, nose tip near
0.55, mouth near 0.7, chin near 0.95):

- ``worn``: from the nose bridge over nose, mouth and chin;
- ``under_nose``: top edge below the nose (nose visible, mouth covered);
- ``chin``: pulled down onto the chin (nose and mouth visible);
- ``side``: worn height but pushed to one side, half of nose and mouth showing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

Color = tuple[int, int, int]
SHAPES: tuple[str, ...] = ("surgical", "kn95", "cloth")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks")
PATTERN_WEIGHTS: tuple[float, ...] = (0.55, 0.15, 0.15, 0.15)
COLORS: tuple[Color, ...] = (
    (244, 244, 244), (170, 210, 240), (90, 150, 215), (28, 28, 32), (120, 120, 125),
    (235, 170, 190), (30, 40, 90), (215, 200, 170), (90, 140, 100), (180, 40, 45),
)
#: (top edge, bottom edge) as fractions of the face square's height, per mode.
PLACES: dict[str, tuple[float, float]] = {
    "worn": (0.40, 1.04), "under_nose": (0.62, 1.06), "chin": (0.80, 1.12), "side": (0.42, 1.04),
}
PUSH_RANGE = (0.28, 0.38)  # how far a pushed-aside mask moves, in face widths


def _shape(kind: str, box: tuple[float, float, float, float]) -> tuple[str, list]:
    """(primitive, points) of a mask outline in pixel coordinates of its bounding box."""
    x0, y0, x1, y1 = box
    mid, hh = (x0 + x1) / 2, y1 - y0
    if kind == "kn95":
        return "polygon", [(x0, y0 + 0.18 * hh), (mid, y0), (x1, y0 + 0.18 * hh),
                           (x1 - 0.06 * (x1 - x0), y1 - 0.2 * hh), (mid, y1),
                           (x0 + 0.06 * (x1 - x0), y1 - 0.2 * hh)]
    radius = 0.35 * hh if kind == "cloth" else 0.1 * hh
    return "rounded", [x0, y0, x1, y1, radius]


def _pattern(size: tuple[int, int], base: Color, other: Color, kind: str,
             rng: np.random.Generator) -> Image.Image:
    """The mask's fabric: ``base`` with stripes, dots or checks of ``other`` (or plain)."""
    w, h = size
    img = Image.new("RGB", size, base)
    if kind == "plain":
        return img
    d = ImageDraw.Draw(img)
    step = max(4, int(min(w, h) * rng.uniform(0.1, 0.2)))
    if kind == "stripes":
        for x in range(-h, w, step):
            d.line((x, 0, x + h, h), fill=other, width=max(1, step // 3))
    elif kind == "dots":
        r = max(1, step // 4)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                d.ellipse((x - r, y - r, x + r, y + r), fill=other)
    else:
        for y in range(0, h, step):
            for x in range((y // step) % 2 * step, w, 2 * step):
                d.rectangle((x, y, x + step - 1, y + step - 1), fill=other)
    return img


def draw_mask(img: Image.Image, face: tuple[int, int, int, int], mode: str, push: int,
              rng: np.random.Generator) -> None:
    """Draw one mask on ``img`` (in place) over the face square ``face`` in ``mode``."""
    fx0, fy0, fx1, fy1 = face
    fw, fh = fx1 - fx0, fy1 - fy0
    top, bottom = PLACES[mode]
    top += rng.uniform(-0.02, 0.02)
    shift = push * rng.uniform(*PUSH_RANGE) * fw if mode == "side" else 0.0
    box = (fx0 + 0.04 * fw + shift, fy0 + top * fh, fx1 - 0.04 * fw + shift, fy0 + bottom * fh)
    kind = SHAPES[rng.integers(len(SHAPES))]
    base = COLORS[rng.integers(len(COLORS))]
    other = COLORS[rng.integers(len(COLORS))]
    fabric = PATTERNS[rng.choice(len(PATTERNS), p=PATTERN_WEIGHTS)]
    edge = tuple(int(c * 0.6) for c in base) if sum(base) > 200 else (150, 150, 155)
    lw = max(1, round(fw * 0.015))
    d = ImageDraw.Draw(img)
    for ux, uy in ((box[0], fy0 + 0.38 * fh), (box[2], fy0 + 0.38 * fh)):  # ear loops
        ear = fx0 - 0.01 * fw if ux < (box[0] + box[2]) / 2 else fx1 + 0.01 * fw
        d.line((ux, box[1] + 0.08 * fh, ear, uy), fill=edge, width=lw)
    prim, pts = _shape(kind, box)
    x0, y0 = int(box[0]), int(box[1])
    size = (int(box[2]) - x0 + 1, int(box[3]) - y0 + 1)
    alpha = Image.new("L", size, 0)
    da = ImageDraw.Draw(alpha)
    local = [(x - x0, y - y0) for x, y in pts] if prim == "polygon" else \
        [pts[0] - x0, pts[1] - y0, pts[2] - x0, pts[3] - y0]
    if prim == "polygon":
        da.polygon(local, fill=255)
    else:
        da.rounded_rectangle(local, radius=pts[4], fill=255)
    img.paste(_pattern(size, base, other, fabric, rng), (x0, y0), alpha)
    if prim == "polygon":
        d.polygon(pts, outline=edge, width=lw)
        d.line(((box[0] + box[2]) / 2, box[1], (box[0] + box[2]) / 2, box[3]), fill=edge,
               width=lw)
    else:
        d.rounded_rectangle(box, radius=pts[4], outline=edge, width=lw)
        hh = box[3] - box[1]
        for k in (1, 2):  # pleats or seams
            y = box[1] + hh * k / 3
            d.line((box[0] + 0.08 * fw, y, box[2] - 0.08 * fw, y), fill=edge, width=lw)
