"""Write a synthetic data set in exactly the competition layout (see DESIGN.md, "The data").

Why: the demo study and the tests need data with the real set's shape and traps (mixed
extensions, macOS junk, a ``-1`` id, one id shared by two people, label errors fixed by a
corrections file, 61% female, 7% aged exactly 60, 5:1:1 mask kinds) but no one may ship the
real photos. Faces are drawn with PIL at varying position and scale on cluttered backgrounds,
with cues a small CNN can learn even at 64x48:

- mask: a large surgical mask (white, light blue, blue or black: far from every skin tone) that
  is worn = from just under the eyes over nose, mouth and chin; incorrect = pulled under the nose
  (nose and dark nostrils fully visible) or, for a quarter of people, down to the chin (mouth
  visible too); not worn = nose and open mouth visible. The gaps between the three are large
  so the state shows at 48x32 face crops (``bench/synth_learnability.py`` measures it);
- gender: long hair down to the shoulders (female) or a short cap (male);
- age (continuous 18..60): hair turns gray and forehead/eye lines darken smoothly with age, so
  58 and 59 look almost like 60 and age-threshold relabeling matters.

The layout around the photos (ids, traps, junk, tables) is ``core.synth_layout``, shared with
the real-face generator ``core.synth_faces`` (``--faces DIR``). Same arguments -> same bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core import synth_layout as L
from core.cli import Parser
from core.synth_layout import OLDEST, Person

FEMALE_SHARE = 0.61
AGE60_SHARE = 0.07
#: Share of the people younger than 60 in each age band (the real set: many students, many 50s).
AGE_BANDS: tuple[tuple[int, int, float], ...] = ((18, 29, 0.50), (30, 49, 0.15), (50, 59, 0.35))

Color = tuple[int, int, int]
SKIN: tuple[Color, ...] = ((241, 204, 178), (224, 183, 150), (198, 152, 118), (168, 120, 90),
                           (232, 196, 160))
HAIR: tuple[Color, ...] = ((20, 16, 14), (45, 30, 22), (70, 45, 30), (30, 26, 30), (95, 62, 38))
GRAY: Color = (205, 205, 200)
#: Surgical/cloth mask colours far from every skin tone: white, light blue, blue, black.
MASK_COLORS: tuple[Color, ...] = ((244, 244, 244), (170, 210, 240), (90, 150, 215), (28, 28, 32))
#: Top edge of the mask (face-relative, 0 = forehead, 1 = chin) per state: worn covers the nose
#: up to just under the eyes; incorrect is pulled under the nose (nose fully visible) or down to
#: the chin (mouth visible too). The gaps are large so the state shows at 48x32 face crops.
MASK_TOP_WORN = 0.47
MASK_TOP_UNDER_NOSE = 0.71
MASK_TOP_CHIN = 0.87
#: Share of people whose incorrect mask sits on the chin rather than under the nose.
LOW_INCORRECT_SHARE = 0.25


@dataclass(frozen=True)
class DrawnLook:
    """How one drawn person looks (``Person.look`` of this generator)."""

    skin: Color
    hair: Color
    gray: float  # 0..1 share of gray in the hair, grows with age
    cx: float  # face centre and width as fractions of the image width/height
    cy: float
    fw: float
    low_incorrect: bool  # incorrect mask on the chin (mouth visible) instead of under the nose


def _largest_remainder(total: int, shares: Sequence[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``shares`` (exact balance, small N)."""
    raw = np.asarray(shares, float) / float(np.sum(shares)) * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _attributes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Genders and ages with the real set's balance, exact counts so small sets hit every group.

    The age-60 people are split between genders (both present once there are two of them), so
    each gender x age-group class exists whenever the counts allow.
    """
    n_female = round(FEMALE_SHARE * n)
    gender = np.array([1] * n_female + [0] * (n - n_female))
    rng.shuffle(gender)
    n60 = max(1, round(AGE60_SHARE * n))
    f60 = round(n60 * FEMALE_SHARE)
    if n60 >= 2:
        f60 = min(max(f60, 1), n60 - 1)
    age = np.zeros(n, int)
    for g, k60 in ((1, f60), (0, n60 - f60)):
        idx = rng.permutation(np.flatnonzero(gender == g))
        k60 = min(k60, len(idx))
        age[idx[:k60]] = OLDEST
        rest = idx[k60:]
        counts = _largest_remainder(len(rest), [b[2] for b in AGE_BANDS])
        start = 0
        for (lo, hi, _), c in zip(AGE_BANDS, counts, strict=True):
            age[rest[start:start + c]] = rng.integers(lo, hi + 1, c)
            start += c
    return gender, age


def _people(n: int, rng: np.random.Generator) -> list[Person]:
    """``n`` people with true attributes and per-person looks (no ids yet)."""
    gender, age = _attributes(n, rng)
    out = []
    for g, a in zip(gender.tolist(), age.tolist(), strict=True):
        t = (a - 18) / (OLDEST - 18)
        look = DrawnLook(
            skin=SKIN[rng.integers(len(SKIN))],
            hair=HAIR[rng.integers(len(HAIR))],
            gray=float(np.clip(t ** 1.5 + rng.normal(0, 0.04), 0, 1)),
            cx=float(rng.uniform(0.40, 0.60)), cy=float(rng.uniform(0.40, 0.52)),
            fw=float(rng.uniform(0.40, 0.52)),
            low_incorrect=bool(rng.random() < LOW_INCORRECT_SHARE),
        )
        out.append(Person(gender=g, age=a, look=look, ext=L.random_ext(rng)))
    return out


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _drawn_mask(d: ImageDraw.ImageDraw, P: Callable[[float, float], tuple[float, float]],
                box: Callable[..., tuple[float, float, float, float]], look: DrawnLook,
                mask_state: int, rng: np.random.Generator, fw: float, lw: int) -> None:
    """The surgical mask of a drawn face: worn, under the nose or on the chin (``MASK_TOP_*``)."""
    col = MASK_COLORS[rng.integers(len(MASK_COLORS))]
    edge = _mix(col, (0, 0, 0), 0.45) if sum(col) > 200 else (150, 150, 155)
    if mask_state == 0:
        top = MASK_TOP_WORN
    else:
        top = MASK_TOP_CHIN if look.low_incorrect else MASK_TOP_UNDER_NOSE
    top += rng.uniform(-0.015, 0.015)
    bottom = max(top + 0.4, 1.12)  # a lowered mask hangs over the chin and neck
    d.rounded_rectangle(box(-0.06, top, 1.06, bottom), radius=fw * 0.1, fill=col,
                        outline=edge, width=lw)
    for k in (1, 2):  # pleats
        v = top + (bottom - top) * k / 3
        d.line((*P(0.08, v), *P(0.92, v)), fill=edge, width=max(1, lw // 2))
    for u in (0.0, 1.0):  # ear loops
        d.line((*P(u, top + 0.04), *P(u, 0.42)), fill=edge, width=max(1, lw // 2))


def _draw(person: Person, mask_state: int, rng: np.random.Generator, size: tuple[int, int]
          ) -> tuple[Image.Image, None]:
    """One photo of ``person`` with mask kind ``mask_state`` (0 wear, 1 incorrect, 2 none)."""
    h, w = size
    look: DrawnLook = person.look
    img = L.background(rng, w, h)
    d = ImageDraw.Draw(img)
    fw = look.fw * w * rng.uniform(0.92, 1.08)
    fh = fw * 1.3
    cx = (look.cx + rng.uniform(-0.04, 0.04)) * w
    cy = (look.cy + rng.uniform(-0.03, 0.03)) * h
    x0, y0 = cx - fw / 2, cy - fh / 2

    def P(u: float, v: float) -> tuple[float, float]:  # face-relative -> pixel
        return (x0 + u * fw, y0 + v * fh)

    def box(u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        return (*P(u0, v0), *P(u1, v1))

    lw = max(1, round(fw * 0.035))
    hair = _mix(look.hair, GRAY, look.gray)
    cloth = tuple(int(v) for v in rng.integers(0, 256, 3))
    # shoulders and neck
    d.polygon([P(-0.55, 1.45), P(-0.25, 1.05), P(1.25, 1.05), P(1.55, 1.45), P(1.6, 3.0),
               P(-0.6, 3.0)], fill=cloth)
    d.rectangle(box(0.35, 0.85, 0.65, 1.12), fill=_mix(look.skin, (0, 0, 0), 0.12))
    if person.gender == 1:  # long hair behind the head, down over the shoulders
        d.rounded_rectangle(box(-0.14, 0.05, 1.14, 1.45), radius=fw * 0.3, fill=hair)
    d.ellipse(box(0, 0, 1, 1), fill=look.skin)
    # hair cap (both genders) and a fringe; female fringe is longer at the sides
    d.pieslice(box(-0.06, -0.08, 1.06, 0.62), 180, 360, fill=hair)
    d.rectangle(box(0.02, 0.2, 0.98, 0.25), fill=hair)
    # age lines: darker and more of them with age (continuous in age)
    t = (person.age - 18) / (OLDEST - 18)
    line_col = _mix(look.skin, (70, 40, 30), 0.15 + 0.75 * t)
    for k in range(1 + int(t * 2.99)):
        v = 0.29 + 0.035 * k
        d.line((*P(0.28, v), *P(0.72, v)), fill=line_col, width=max(1, lw // 2))
    for u in (0.14, 0.86):
        d.line((*P(u, 0.40), *P(u + (0.05 if u < 0.5 else -0.05), 0.46)), fill=line_col,
               width=max(1, lw // 2))
    # eyes and brows
    for u in (0.32, 0.68):
        d.ellipse(box(u - 0.08, 0.39, u + 0.08, 0.47), fill=(250, 250, 250))
        d.ellipse(box(u - 0.04, 0.39, u + 0.04, 0.47), fill=(25, 20, 20))
        d.line((*P(u - 0.1, 0.345), *P(u + 0.1, 0.345)), fill=hair, width=lw)
    # nose with dark nostrils and an open mouth: high-contrast parts a mask hides or shows
    d.polygon([P(0.5, 0.47), P(0.37, 0.66), P(0.63, 0.66)],
              fill=_mix(look.skin, (90, 50, 40), 0.6))
    for u in (0.44, 0.56):
        d.ellipse(box(u - 0.04, 0.615, u + 0.04, 0.665), fill=(40, 20, 20))
    d.ellipse(box(0.30, 0.71, 0.70, 0.84), fill=(120, 20, 35))
    d.line((*P(0.35, 0.775), *P(0.65, 0.775)), fill=(235, 225, 215), width=max(1, lw // 2))
    if mask_state != 2:
        _drawn_mask(d, P, box, look, mask_state, rng, fw, lw)
    # light and sensor noise
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.15)
    arr += rng.normal(0, rng.uniform(2, 8), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), None


def generate(out_dir: str | Path, people: int = 60, eval_people: int = 10, seed: int = 0,
             size: tuple[int, int] = (512, 384), *, overwrite: bool = False,
             progress: bool | None = None, label_noise: float = 0.0) -> Path:
    """Write the synthetic data set to ``out_dir`` and return its path.

    ``size`` is (height, width); the real set is (512, 384). ``out_dir`` must be absent or
    empty unless ``overwrite`` (then it must hold an earlier synthetic set: ``train/train.csv``).
    The tree is built in a sibling temp folder and renamed into place, so a crash never leaves
    half a data set. ``progress`` None shows a bar from 200 people on. ``label_noise`` (default
    0: off) plants that share of train people with a label error of each kind and writes their
    truth to ``planted_errors.csv`` (``core.label_noise.plant_label_noise``).
    """
    people, eval_people, seed = int(people), int(eval_people), int(seed)
    h, w = (int(v) for v in size)
    L.check_counts(people, eval_people, seed, (h, w), label_noise)
    if progress is None:
        progress = people + eval_people >= 200

    def write(tmp: Path) -> None:
        train = _people(people, np.random.default_rng([seed, L.ROLE_TRAIN]))
        evals = _people(eval_people, np.random.default_rng([seed, L.ROLE_EVAL]))
        L.write_tree(tmp, train, evals, seed, lambda p, k, rng: _draw(p, k, rng, (h, w)),
                     bool(progress), label_noise)

    return L.install(out_dir, write, overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m core.synth --out DIR --people N --eval-people M --seed S [--faces DIR]
    [--label-noise SHARE]``."""
    from core.cli import EXPECTED, run_cli
    from core.synth_faces import FACES_ENV, default_faces_dir

    ap = Parser(prog="python -m core.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder to create (absent or empty)")
    ap.add_argument("--faces", nargs="?", type=Path, const=default_faces_dir(), default=None,
                    metavar="DIR", help="paste real face photos from DIR (faces.csv, photos/) "
                    f"instead of drawing faces; bare --faces: ${FACES_ENV} or ../shared/faces")
    ap.add_argument("--people", type=int, default=60, help="training people (7 images each)")
    ap.add_argument("--eval-people", type=int, default=10, help="eval people (7 images each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--label-noise", type=float, default=0.0, metavar="SHARE",
                    help="plant this share of train people with each kind of label error "
                         "(gender, age group, normal/incorrect_mask swap) and write their truth "
                         "to planted_errors.csv (default 0: off)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier synthetic set in --out")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for expected errors")
    args = ap.parse_args(argv)

    def body() -> None:
        size = (args.height, args.width)
        kwargs = {"overwrite": args.overwrite, "progress": sys.stderr.isatty(),
                  "label_noise": args.label_noise}
        if args.faces is None:
            out = generate(args.out, args.people, args.eval_people, args.seed, size, **kwargs)
        else:
            from core.synth_faces import generate as generate_faces

            out = generate_faces(args.out, args.faces, args.people, args.eval_people,
                                 args.seed, size, **kwargs)
        print(out)

    return run_cli(body, args.debug, expected=(*EXPECTED, ValueError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
