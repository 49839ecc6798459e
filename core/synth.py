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

Same arguments -> same bytes: every random draw comes from ``numpy.random.default_rng`` seeded
by (seed, role, index); JPEG quality and PNG compression are fixed; nothing reads the clock.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from core.labels import GENDER_NAMES, IMAGE_STEMS, MASK_BY_STEM, age_group, encode

FEMALE_SHARE = 0.61
AGE60_SHARE = 0.07
#: Share of the people younger than 60 in each age band (the real set: many students, many 50s).
AGE_BANDS: tuple[tuple[int, int, float], ...] = ((18, 29, 0.50), (30, 49, 0.15), (50, 59, 0.35))
OLDEST = 60
#: Extension per person folder: mostly .jpg, as in the real set.
EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
EXT_WEIGHTS: tuple[float, ...] = (0.8, 0.1, 0.1)
JPEG_QUALITY = 90
PNG_COMPRESS = 6
RACE = "Asian"
#: Bytes of a macOS AppleDouble ``._*`` file (magic 0x00051607); not an image.
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(16)
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(24)
#: People the traps need: two gender flips, a mask swap, an age typo, a shared id (two people).
MIN_PEOPLE = 6
MIN_SIDE = 16

_ROLE_TRAIN, _ROLE_EVAL, _ROLE_IMAGE, _ROLE_EVAL_IMAGE, _ROLE_META = range(5)

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
class Person:
    """One synthetic person: true attributes (drawn) and what train.csv says (written)."""

    gender: int
    age: int
    skin: Color
    hair: Color
    gray: float  # 0..1 share of gray in the hair, grows with age
    cx: float  # face centre and width as fractions of the image width/height
    cy: float
    fw: float
    low_incorrect: bool  # incorrect mask on the chin (mouth visible) instead of under the nose
    ext: str = ".jpg"
    id: str = ""
    written_gender: int = -1
    written_age: int = -1
    swap_normal_incorrect: bool = False

    @property
    def folder(self) -> str:
        return f"{self.id}_{GENDER_NAMES[self.written_gender]}_{RACE}_{self.written_age}"


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
        out.append(Person(
            gender=g, age=a,
            skin=SKIN[rng.integers(len(SKIN))],
            hair=HAIR[rng.integers(len(HAIR))],
            gray=float(np.clip(t ** 1.5 + rng.normal(0, 0.04), 0, 1)),
            cx=float(rng.uniform(0.40, 0.60)), cy=float(rng.uniform(0.40, 0.52)),
            fw=float(rng.uniform(0.40, 0.52)),
            low_incorrect=bool(rng.random() < LOW_INCORRECT_SHARE),
            ext=EXTENSIONS[rng.choice(len(EXTENSIONS), p=EXT_WEIGHTS)],
        ))
    return out


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Clutter: a gradient, random shapes and lines, so the face is not the only structure."""
    c0, c1 = rng.integers(30, 226, 3), rng.integers(30, 226, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    grad = (c0 + (c1 - c0) * ramp).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).copy())
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 16))):
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * w)
        y0, y1 = sorted(rng.uniform(-0.2, 1.2, 2) * h)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            d.rectangle((x0, y0, x1, y1), fill=col)
        elif kind == 1:
            d.ellipse((x0, y0, x1, y1), fill=col)
        else:
            d.line((x0, y0, x1, y1), fill=col, width=max(1, int(rng.uniform(0.005, 0.03) * w)))
    return img


def _draw(person: Person, mask_state: int, rng: np.random.Generator, size: tuple[int, int]
          ) -> Image.Image:
    """One photo of ``person`` with mask kind ``mask_state`` (0 wear, 1 incorrect, 2 none)."""
    h, w = size
    img = _background(rng, w, h)
    d = ImageDraw.Draw(img)
    fw = person.fw * w * rng.uniform(0.92, 1.08)
    fh = fw * 1.3
    cx = (person.cx + rng.uniform(-0.04, 0.04)) * w
    cy = (person.cy + rng.uniform(-0.03, 0.03)) * h
    x0, y0 = cx - fw / 2, cy - fh / 2

    def P(u: float, v: float) -> tuple[float, float]:  # face-relative -> pixel
        return (x0 + u * fw, y0 + v * fh)

    def box(u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        return (*P(u0, v0), *P(u1, v1))

    lw = max(1, round(fw * 0.035))
    hair = _mix(person.hair, GRAY, person.gray)
    cloth = tuple(int(v) for v in rng.integers(0, 256, 3))
    # shoulders and neck
    d.polygon([P(-0.55, 1.45), P(-0.25, 1.05), P(1.25, 1.05), P(1.55, 1.45), P(1.6, 3.0),
               P(-0.6, 3.0)], fill=cloth)
    d.rectangle(box(0.35, 0.85, 0.65, 1.12), fill=_mix(person.skin, (0, 0, 0), 0.12))
    if person.gender == 1:  # long hair behind the head, down over the shoulders
        d.rounded_rectangle(box(-0.14, 0.05, 1.14, 1.45), radius=fw * 0.3, fill=hair)
    d.ellipse(box(0, 0, 1, 1), fill=person.skin)
    # hair cap (both genders) and a fringe; female fringe is longer at the sides
    d.pieslice(box(-0.06, -0.08, 1.06, 0.62), 180, 360, fill=hair)
    d.rectangle(box(0.02, 0.2, 0.98, 0.25), fill=hair)
    # age lines: darker and more of them with age (continuous in age)
    t = (person.age - 18) / (OLDEST - 18)
    line_col = _mix(person.skin, (70, 40, 30), 0.15 + 0.75 * t)
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
              fill=_mix(person.skin, (90, 50, 40), 0.6))
    for u in (0.44, 0.56):
        d.ellipse(box(u - 0.04, 0.615, u + 0.04, 0.665), fill=(40, 20, 20))
    d.ellipse(box(0.30, 0.71, 0.70, 0.84), fill=(120, 20, 35))
    d.line((*P(0.35, 0.775), *P(0.65, 0.775)), fill=(235, 225, 215), width=max(1, lw // 2))
    if mask_state != 2:
        col = MASK_COLORS[rng.integers(len(MASK_COLORS))]
        edge = _mix(col, (0, 0, 0), 0.45) if sum(col) > 200 else (150, 150, 155)
        if mask_state == 0:
            top = MASK_TOP_WORN
        else:
            top = MASK_TOP_CHIN if person.low_incorrect else MASK_TOP_UNDER_NOSE
        top += rng.uniform(-0.015, 0.015)
        bottom = max(top + 0.4, 1.12)  # a lowered mask hangs over the chin and neck
        d.rounded_rectangle(box(-0.06, top, 1.06, bottom), radius=fw * 0.1, fill=col,
                            outline=edge, width=lw)
        for k in (1, 2):  # pleats
            v = top + (bottom - top) * k / 3
            d.line((*P(0.08, v), *P(0.92, v)), fill=edge, width=max(1, lw // 2))
        for u in (0.0, 1.0):  # ear loops
            d.line((*P(u, top + 0.04), *P(u, 0.42)), fill=edge, width=max(1, lw // 2))
    # light and sensor noise
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.15)
    arr += rng.normal(0, rng.uniform(2, 8), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, ext: str) -> bytes:
    """Image -> file bytes, deterministic (fixed quality, no metadata)."""
    buf = io.BytesIO()
    if ext == ".png":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS)
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: crisp small cues
    return buf.getvalue()


def _assign_ids_and_traps(people: list[Person], rng: np.random.Generator
                          ) -> tuple[list[Person], list[tuple[str, str, str]]]:
    """Give train people ids and plant the real set's traps; return people and corrections.

    Traps: a person truly male written as female (fixed by folder), one truly female written as
    male whose id has a ``-1`` suffix (fixed by id, like ``001498-1``), one whose ``normal`` and
    ``incorrect_mask`` photos are swapped, one with an age typo (digits swapped or +10), and one
    id shared by two people (different folder names). At least one .jpeg and one .png folder.
    """
    n = len(people)
    ids = np.cumsum(rng.integers(1, 4, n)) + int(rng.integers(0, 300))
    people = [replace(p, id=f"{int(i):06d}", written_gender=p.gender, written_age=p.age)
              for p, i in zip(people, ids, strict=True)]
    order = rng.permutation(n).tolist()

    def pick(cond, exclude: set[int]) -> int:
        k = next(i for i in order if i not in exclude and cond(people[i]))
        exclude.add(k)
        return k

    used: set[int] = set()
    f2m = pick(lambda p: p.gender == 0, used)
    people[f2m] = replace(people[f2m], written_gender=1)
    m2f = pick(lambda p: p.gender == 1, used)
    people[m2f] = replace(people[m2f], id=people[m2f].id + "-1", written_gender=0)
    swap = pick(lambda p: True, used)
    people[swap] = replace(people[swap], swap_normal_incorrect=True)
    aged = pick(lambda p: p.age < OLDEST, used)
    age = people[aged].age
    typo = int(str(age)[::-1])
    if typo == age or not 18 <= typo <= OLDEST:
        typo = age + 10 if age < 45 else age - 20
    people[aged] = replace(people[aged], written_age=typo)
    # the shared id may not be one a correction targets by id (it would hit both folders)
    free = {m2f, aged}
    a = pick(lambda p: True, free)
    b = pick(lambda p: (p.written_gender, p.written_age) != (people[a].written_gender,
                                                           people[a].written_age), free)
    people[b] = replace(people[b], id=people[a].id)
    fixes = [(people[f2m].folder, "gender", GENDER_NAMES[0]),
             (people[m2f].id, "gender", GENDER_NAMES[1]),
             (people[swap].folder, "mask_swap", "incorrect_mask:normal"),
             (people[aged].id, "age", str(age))]
    # mixed extensions: at least one .jpeg and one .png folder
    for ext in (".jpeg", ".png"):
        if not any(p.ext == ext for p in people):
            k = order[-1 if ext == ".png" else -2]
            people[k] = replace(people[k], ext=ext)
    return people, fixes


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(header)
        wr.writerows(rows)


def _photo_masks(person: Person) -> list[int]:
    """Mask kind drawn for each of the 7 stems (swapped for a mislabeled person)."""
    kinds = [MASK_BY_STEM[s] for s in IMAGE_STEMS]
    if person.swap_normal_incorrect:
        i, j = IMAGE_STEMS.index("normal"), IMAGE_STEMS.index("incorrect_mask")
        kinds[i], kinds[j] = kinds[j], kinds[i]
    return kinds


def _write_tree(root: Path, people: int, eval_people: int, seed: int, size: tuple[int, int],
                progress: bool) -> None:
    meta = np.random.default_rng([seed, _ROLE_META])
    train, fixes = _assign_ids_and_traps(
        _people(people, np.random.default_rng([seed, _ROLE_TRAIN])), meta)
    evals = _people(eval_people, np.random.default_rng([seed, _ROLE_EVAL]))
    images = root / "train" / "images"
    images.mkdir(parents=True)
    junk_apple = set(meta.choice(people, size=min(3, people), replace=False).tolist())
    junk_ds = set(meta.choice(people, size=min(2, people), replace=False).tolist())
    bar = tqdm(total=people + eval_people, desc="synthetic people", unit="person",
               disable=not progress)
    for i, p in enumerate(train):
        folder = images / p.folder
        folder.mkdir()
        for j, (stem, kind) in enumerate(zip(IMAGE_STEMS, _photo_masks(p), strict=True)):
            img = _draw(p, kind, np.random.default_rng([seed, _ROLE_IMAGE, i, j]), size)
            (folder / f"{stem}{p.ext}").write_bytes(_encode(img, p.ext))
        if i in junk_apple:
            (folder / f"._{IMAGE_STEMS[0]}.jpg").write_bytes(APPLEDOUBLE)
        if i in junk_ds:
            (folder / ".DS_Store").write_bytes(DS_STORE)
        bar.update()
    rows = sorted(((p.id, GENDER_NAMES[p.written_gender], RACE, p.written_age, p.folder)
                   for p in train), key=lambda r: (r[0], r[4]))
    _write_csv(root / "train" / "train.csv", ("id", "gender", "race", "age", "path"), rows)
    _write_csv(root / "corrections.csv", ("target", "field", "value"), fixes)

    eval_dir = root / "eval" / "images"
    eval_dir.mkdir(parents=True)
    answers = []
    for i, p in enumerate(evals):
        for j, stem in enumerate(IMAGE_STEMS):
            rng = np.random.default_rng([seed, _ROLE_EVAL_IMAGE, i, j])
            image_id = rng.bytes(20).hex() + ".jpg"  # like the competition's sha1-named files
            kind = MASK_BY_STEM[stem]
            (eval_dir / image_id).write_bytes(_encode(_draw(p, kind, rng, size), ".jpg"))
            answers.append((image_id, int(encode(kind, p.gender, age_group(p.age)))))
        bar.update()
    bar.close()
    answers = [answers[k] for k in meta.permutation(len(answers))]
    _write_csv(root / "eval" / "info.csv", ("ImageID", "ans"), [(a, "") for a, _ in answers])
    _write_csv(root / "eval_answers.csv", ("ImageID", "ans"), answers)


def generate(out_dir: str | Path, people: int = 60, eval_people: int = 10, seed: int = 0,
             size: tuple[int, int] = (512, 384), *, overwrite: bool = False,
             progress: bool | None = None) -> Path:
    """Write the synthetic data set to ``out_dir`` and return its path.

    ``size`` is (height, width); the real set is (512, 384). ``out_dir`` must be absent or
    empty unless ``overwrite`` (then it must hold an earlier synthetic set: ``train/train.csv``).
    The tree is built in a sibling temp folder and renamed into place, so a crash never leaves
    half a data set. ``progress`` None shows a bar from 200 people on.
    """
    people, eval_people, seed = int(people), int(eval_people), int(seed)
    h, w = (int(v) for v in size)
    if people < MIN_PEOPLE:
        raise ValueError(f"people must be >= {MIN_PEOPLE} (the planted label errors and shared "
                         f"id need that many), got {people}")
    if eval_people < 0:
        raise ValueError(f"eval_people must be >= 0, got {eval_people}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"size must be (height, width) with each >= {MIN_SIDE}, got {size}")
    out = Path(out_dir)
    old = None
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a folder")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out}: folder is not empty (pass overwrite=True / "
                                      f"--overwrite to replace an earlier synthetic set)")
            if not (out / "train" / "train.csv").is_file():
                raise FileExistsError(f"{out}: not replaced: it does not look like a synthetic "
                                      f"data set (no train/train.csv)")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if progress is None:
            progress = people + eval_people >= 200
        _write_tree(tmp, people, eval_people, seed, (h, w), progress)
        if old is not None:
            os.replace(out, old)
        elif out.exists():
            out.rmdir()  # empty
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None and old.exists():
            shutil.rmtree(old)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m core.synth --out DIR --people N --eval-people M --seed S``."""
    ap = argparse.ArgumentParser(prog="python -m core.synth", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder to create (absent or empty)")
    ap.add_argument("--people", type=int, default=60, help="training people (7 images each)")
    ap.add_argument("--eval-people", type=int, default=10, help="eval people (7 images each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an earlier synthetic set in --out")
    args = ap.parse_args(argv)
    try:
        out = generate(args.out, args.people, args.eval_people, args.seed,
                       (args.height, args.width), overwrite=args.overwrite,
                       progress=sys.stderr.isatty())
    except (ValueError, FileExistsError) as e:
        print(f"core.synth: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
