"""Write the competition layout from real face photos (``python -m core.synth --faces DIR``).

Why: drawn faces carry cues made learnable on purpose, so they cannot say whether face crops,
the search space or the ensemble help on real faces, where MTCNN misses masked faces and age is
hard. This paints real photos (a faces folder: ``faces.csv`` with ``file,gender,age`` and
``photos/``, see ``/work/shared/faces/README.md``) into competition-style 384x512 photos: each
face photo is one person, pasted as a square at a varied size and place over a cluttered
background and a body, with the mask state drawn on (``core.mask_drawing``). The layout around
the photos (ids, traps, junk, tables) is ``core.synth_layout``, the same as the drawn set's.

The square each face was pasted into is that image's true face box; ``true_boxes.csv`` (beside
``eval_answers.csv``, outside ``train/`` and ``eval/``) lists it per image, in photo pixels, with
the mask state drawn. People are split into train and eval without overlap, stratified on
gender x age group (scikit-learn's ``train_test_split``). Same photos and seed -> same bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from sklearn.model_selection import train_test_split

from core import synth_layout as L
from core.dataset import _line, _read_csv
from core.errors import DataError
from core.labels import GENDER_CODES, NUM_AGE, age_group
from core.mask_drawing import draw_mask
from core.synth_layout import Box, Person

FACES_ENV = "MASK_SEARCH_FACES"
FACES_CSV = "faces.csv"
PHOTOS = "photos"
FACES_COLUMNS = ("file", "gender", "age")
YOUNGEST = L.YOUNGEST
#: How an incorrectly worn mask sits, per person: under the nose, on the chin, pushed aside.
INCORRECT_MODES: tuple[str, ...] = ("under_nose", "chin", "side")
INCORRECT_WEIGHTS: tuple[float, ...] = (0.5, 0.25, 0.25)


def default_faces_dir() -> Path:
    """``$MASK_SEARCH_FACES``, else ``shared/faces`` beside the checkout (the repo's parent)."""
    env = os.environ.get(FACES_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "faces"


def read_faces(faces_dir: str | Path) -> pd.DataFrame:
    """``faces.csv`` validated: columns file (name in ``photos/``), gender (0/1), age (int).

    Every problem is one ``DataError`` naming the file, line and field: a missing folder or
    file, a missing column, an unknown gender, an age that is not a whole number in 18..60,
    a repeated file, a photo that is not there.
    """
    root = Path(faces_dir)
    if not root.is_dir():
        raise DataError(f"faces folder {str(root)!r} does not exist (pass --faces DIR or set "
                        f"{FACES_ENV})")
    csv = root / FACES_CSV
    df = _read_csv(csv, FACES_COLUMNS)
    photos = root / PHOTOS
    present = set(os.listdir(photos)) if photos.is_dir() else set()
    gender, age = [], []
    for i, row in df.iterrows():
        where = f"{csv} line {_line(i)}"
        if row["gender"] not in GENDER_CODES:
            raise DataError(f"{where}: 'gender' must be one of {', '.join(GENDER_CODES)}, "
                            f"got {row['gender']!r}")
        if not (row["age"].isdigit() and YOUNGEST <= int(row["age"]) <= L.OLDEST):
            raise DataError(f"{where}: 'age' must be a whole number {YOUNGEST}..{L.OLDEST} "
                            f"(older people are recorded as {L.OLDEST}), got {row['age']!r}")
        if not row["file"] or "/" in row["file"] or "\\" in row["file"]:
            raise DataError(f"{where}: 'file' must be a file name in {photos}, "
                            f"got {row['file']!r}")
        if row["file"] not in present:
            raise DataError(f"{where}: photo {row['file']!r} not found in {photos}")
        gender.append(GENDER_CODES[row["gender"]])
        age.append(int(row["age"]))
    dup = df["file"].duplicated()
    if dup.any():
        raise DataError(f"{csv} line {_line(df.index[dup][0])}: photo "
                        f"{df.loc[dup, 'file'].iloc[0]!r} is listed twice (one photo, one person)")
    return pd.DataFrame({"file": df["file"].to_numpy(), "gender": gender, "age": age})


def _split(idx: np.ndarray, first: int, second: int, strata: list[np.ndarray], seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (first, second) rows of ``idx``; coarser strata when a tiny set cannot fill
    every stratum (sklearn needs each stratum twice and both parts at least as many rows)."""
    for s in [*strata, None]:
        try:
            a, b = train_test_split(idx, train_size=first, test_size=second, random_state=seed,
                                    stratify=None if s is None else s[idx])
            return np.sort(a), np.sort(b)
        except ValueError:
            if s is None:
                raise
    raise AssertionError("unreachable")


def choose_people(faces: pd.DataFrame, people: int, eval_people: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of ``faces`` for the train and eval people (disjoint), stratified on
    gender x age group so both parts keep the folder's balance."""
    n = len(faces)
    if people + eval_people > n:
        raise DataError(f"{people} train + {eval_people} eval people need that many photos; "
                        f"the faces folder has {n}")
    gender, age = faces["gender"].to_numpy(), faces["age"].to_numpy()
    strata = [gender * NUM_AGE + age_group(age), gender]
    idx = np.arange(n)
    if people + eval_people < n:
        idx, _ = _split(idx, people + eval_people, n - people - eval_people, strata, seed)
    if eval_people == 0:
        return idx, idx[:0]
    return _split(idx, people, eval_people, strata, seed)


@dataclass(frozen=True)
class RealLook:
    """One real-face person's setting (``Person.look``): photo, place, clothes, background."""

    photo: Path
    side: float  # face square side as a fraction of the image width
    cx: float  # face centre, fractions of width / height
    cy: float
    cloth: tuple[int, int, int]
    background_seed: int
    incorrect: str  # one of INCORRECT_MODES
    push: int  # -1 or +1: the side a pushed-aside mask goes to


def _people(faces: pd.DataFrame, rows: np.ndarray, root: Path, rng: np.random.Generator
            ) -> list[Person]:
    """People for ``rows`` of ``faces``, in a shuffled order (faces.csv may be sorted by age)."""
    out = []
    for r in rng.permutation(rows).tolist():
        look = RealLook(
            photo=root / PHOTOS / faces["file"].iat[r],
            side=float(rng.uniform(0.36, 0.56)),
            cx=float(rng.uniform(0.36, 0.64)), cy=float(rng.uniform(0.26, 0.40)),
            cloth=tuple(int(v) for v in rng.integers(0, 256, 3)),
            background_seed=int(rng.integers(2**31)),
            incorrect=INCORRECT_MODES[rng.choice(len(INCORRECT_MODES), p=INCORRECT_WEIGHTS)],
            push=int(rng.choice([-1, 1])),
        )
        out.append(Person(gender=int(faces["gender"].iat[r]), age=int(faces["age"].iat[r]),
                          look=look, ext=L.random_ext(rng)))
    return out


def _load_photo(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read this face photo ({e})") from None


def _feather(side: int) -> Image.Image:
    """Alpha for a pasted face: opaque rounded square with soft edges, so no hard seam."""
    alpha = Image.new("L", (side, side), 0)
    inset = max(1, side // 24)
    ImageDraw.Draw(alpha).rounded_rectangle((inset, inset, side - 1 - inset, side - 1 - inset),
                                            radius=side // 5, fill=255)
    return alpha.filter(ImageFilter.GaussianBlur(max(1, side // 40)))


def _face_box(look: RealLook, rng: np.random.Generator, size: tuple[int, int]) -> Box:
    """This photo's face square (x1, y1, x2, y2): the person's place jittered, inside the image."""
    h, w = size
    side = int(round(min(look.side * w * rng.uniform(0.93, 1.07), 0.95 * min(h, w))))
    cx = (look.cx + rng.uniform(-0.03, 0.03)) * w
    cy = (look.cy + rng.uniform(-0.02, 0.02)) * h
    x1 = int(np.clip(round(cx - side / 2), 0, w - side))
    y1 = int(np.clip(round(cy - side / 2), 0, h - side))
    return x1, y1, x1 + side, y1 + side


def _draw(person: Person, mask_state: int, rng: np.random.Generator, size: tuple[int, int]
          ) -> tuple[Image.Image, Box]:
    """One photo of ``person`` with mask kind ``mask_state`` (0 wear, 1 incorrect, 2 none)."""
    h, w = size
    look: RealLook = person.look
    img = L.background(np.random.default_rng(look.background_seed), w, h)
    box = _face_box(look, rng, size)
    x1, y1, x2, y2 = box
    side = x2 - x1
    face = _load_photo(look.photo).resize((side, side), Image.Resampling.LANCZOS)
    skin = tuple(int(v) for v in np.median(np.asarray(face)[side // 2:, side // 3:-side // 3]
                                           .reshape(-1, 3), axis=0))
    d = ImageDraw.Draw(img)
    neck_top = y1 + 0.8 * side
    d.rectangle((x1 + 0.3 * side, neck_top, x2 - 0.3 * side, y2 + 0.25 * side), fill=skin)
    d.polygon([(x1 - 0.55 * side, h), (x1 - 0.45 * side, y2 + 0.35 * side),
               (x1 + 0.2 * side, y2 + 0.15 * side), (x2 - 0.2 * side, y2 + 0.15 * side),
               (x2 + 0.45 * side, y2 + 0.35 * side), (x2 + 0.55 * side, h)], fill=look.cloth)
    img.paste(face, (x1, y1), _feather(side))
    if mask_state != 2:
        mode = "worn" if mask_state == 0 else look.incorrect
        draw_mask(img, box, mode, look.push, rng)
    arr = np.asarray(img, dtype=np.float32) * np.float32(rng.uniform(0.85, 1.12))  # light
    noise = rng.standard_normal(arr.shape, dtype=np.float32)  # sensor noise
    noise *= np.float32(rng.uniform(1, 5))
    arr += noise
    return Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8)), box


def generate(out_dir: str | Path, faces_dir: str | Path, people: int = 60,
             eval_people: int = 10, seed: int = 0, size: tuple[int, int] = (512, 384), *,
             overwrite: bool = False, progress: bool | None = None,
             label_noise: float = 0.0) -> Path:
    """Write the layout from the real faces in ``faces_dir`` to ``out_dir``; return its path.

    Arguments as ``core.synth.generate``; each person is one photo of the faces folder, so
    ``people + eval_people`` may not exceed its photos. ``faces.csv`` is checked before
    anything is written. ``label_noise`` plants label errors as ``core.synth.generate`` does.
    """
    people, eval_people, seed = int(people), int(eval_people), int(seed)
    h, w = (int(v) for v in size)
    L.check_counts(people, eval_people, seed, (h, w), label_noise)
    faces = read_faces(faces_dir)
    train_rows, eval_rows = choose_people(faces, people, eval_people, seed)
    root = Path(faces_dir)
    if progress is None:
        progress = people + eval_people >= 200

    def write(tmp: Path) -> None:
        train = _people(faces, train_rows, root, np.random.default_rng([seed, L.ROLE_TRAIN]))
        evals = _people(faces, eval_rows, root, np.random.default_rng([seed, L.ROLE_EVAL]))
        L.write_tree(tmp, train, evals, seed, lambda p, k, rng: _draw(p, k, rng, (h, w)),
                     bool(progress), label_noise)

    return L.install(out_dir, write, overwrite)
