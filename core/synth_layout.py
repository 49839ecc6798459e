"""The competition layout around generated photos: ids, traps, junk, tables, atomic install.

Why a module of its own: the drawn-face generator (``core.synth``) and the real-face one
(``core.synth_faces``) must write exactly the same layout with the same traps (mixed extensions,
macOS junk, a ``-1`` id, one id shared by two people, label errors with their corrections file,
eval answers outside ``eval/``); only how a photo is made differs. A generator hands this module
its people and a ``draw(person, mask_state, rng)`` function; everything else is here, once.

Same arguments -> same bytes: every random draw comes from ``numpy.random.default_rng`` seeded
by (seed, role, index), JPEG quality and PNG compression are fixed, rows are written in a fixed
order and no path of the output folder is written into any file.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from core.dataset import CORRECTION_FIELDS, MASK_SWAP_VALUE
from core.labels import (
    GENDER_NAMES,
    IMAGE_STEMS,
    MASK_BY_STEM,
    age_group,
    encode,
)

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
YOUNGEST = 18  # the competition's ages run 18..60 (60 stands for ">=60")
OLDEST = 60
TRUE_BOXES = "true_boxes.csv"
#: Beside eval_answers.csv: which eval person (0..) each ImageID shows.
EVAL_PEOPLE = "eval_people.csv"
BOX_HEADER = ("file", "x1", "y1", "x2", "y2", "mask")
#: Beside eval_answers.csv when label noise is planted: each planted error and its truth.
PLANTED_ERRORS = "planted_errors.csv"
#: A corrections file's columns (``value`` fixes the error) plus what train.csv says instead.
PLANTED_HEADER = ("target", "field", "value", "written")
#: The kinds of planted errors, in the order people are drawn for them: corrections' fields.
NOISE_KINDS: tuple[str, ...] = CORRECTION_FIELDS

ROLE_TRAIN, ROLE_EVAL, ROLE_IMAGE, ROLE_EVAL_IMAGE, ROLE_META, ROLE_NOISE = range(6)

Box = tuple[int, int, int, int]
#: ``draw(person, mask_state, rng) -> (photo, true face box or None)``.
Draw = Callable[["Person", int, np.random.Generator], tuple[Image.Image, Box | None]]


@dataclass(frozen=True)
class Person:
    """One generated person: true attributes, what train.csv says, and the generator's look."""

    gender: int
    age: int
    look: Any  # generator-specific (drawn colours and place, or the real photo to paste)
    ext: str = ".jpg"
    id: str = ""
    written_gender: int = -1
    written_age: int = -1
    swap_normal_incorrect: bool = False

    @property
    def folder(self) -> str:
        return f"{self.id}_{GENDER_NAMES[self.written_gender]}_{RACE}_{self.written_age}"


def random_ext(rng: np.random.Generator) -> str:
    """A person folder's extension, drawn with the real set's mix."""
    return EXTENSIONS[rng.choice(len(EXTENSIONS), p=EXT_WEIGHTS)]


def background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
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


def encode_image(img: Image.Image, ext: str) -> bytes:
    """Image -> file bytes, deterministic (fixed quality, no metadata)."""
    buf = io.BytesIO()
    if ext == ".png":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS)
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)  # 4:4:4: crisp small cues
    return buf.getvalue()


def assign_ids_and_traps(people: list[Person], rng: np.random.Generator
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
             (people[swap].folder, "mask_swap", MASK_SWAP_VALUE),
             (people[aged].id, "age", str(age))]
    # mixed extensions: at least one .jpeg and one .png folder
    for ext in (".jpeg", ".png"):
        if not any(p.ext == ext for p in people):
            k = order[-1 if ext == ".png" else -2]
            people[k] = replace(people[k], ext=ext)
    return people, fixes


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(header)
        wr.writerows(rows)


def photo_masks(person: Person) -> list[int]:
    """Mask kind drawn for each of the 7 stems (swapped for a mislabeled person)."""
    kinds = [MASK_BY_STEM[s] for s in IMAGE_STEMS]
    if person.swap_normal_incorrect:
        i, j = IMAGE_STEMS.index("normal"), IMAGE_STEMS.index("incorrect_mask")
        kinds[i], kinds[j] = kinds[j], kinds[i]
    return kinds


def _write_train(root: Path, people: list[Person], seed: int, draw: Draw,
                 meta: np.random.Generator, bar: tqdm, boxes: list, label_noise: float) -> None:
    """Person folders (with junk), train.csv, corrections.csv and, with ``label_noise``,
    planted_errors.csv."""
    train, fixes = assign_ids_and_traps(people, meta)
    n = len(train)
    images = root / "train" / "images"
    images.mkdir(parents=True)
    if label_noise > 0:
        from core.label_noise import plant_label_noise  # not at the top: it imports this module

        train, planted = plant_label_noise(train, fixes, label_noise,
                                           np.random.default_rng([seed, ROLE_NOISE]))
        write_csv(root / PLANTED_ERRORS, PLANTED_HEADER, planted)
    junk_apple = set(meta.choice(n, size=min(3, n), replace=False).tolist())
    junk_ds = set(meta.choice(n, size=min(2, n), replace=False).tolist())
    for i, p in enumerate(train):
        folder = images / p.folder
        folder.mkdir()
        for j, (stem, kind) in enumerate(zip(IMAGE_STEMS, photo_masks(p), strict=True)):
            img, box = draw(p, kind, np.random.default_rng([seed, ROLE_IMAGE, i, j]))
            (folder / f"{stem}{p.ext}").write_bytes(encode_image(img, p.ext))
            if box is not None:
                boxes.append((f"train/images/{p.folder}/{stem}{p.ext}", *box, kind))
        if i in junk_apple:
            (folder / f"._{IMAGE_STEMS[0]}.jpg").write_bytes(APPLEDOUBLE)
        if i in junk_ds:
            (folder / ".DS_Store").write_bytes(DS_STORE)
        bar.update()
    rows = sorted(((p.id, GENDER_NAMES[p.written_gender], RACE, p.written_age, p.folder)
                   for p in train), key=lambda r: (r[0], r[4]))
    write_csv(root / "train" / "train.csv", ("id", "gender", "race", "age", "path"), rows)
    write_csv(root / "corrections.csv", ("target", "field", "value"), fixes)


def write_tree(root: Path, train: list[Person], evals: list[Person], seed: int, draw: Draw,
               progress: bool, label_noise: float = 0.0) -> None:
    """Write the whole layout of ``train`` and ``evals`` people into the new folder ``root``.

    ``true_boxes.csv`` (file, face box in photo pixels, mask state drawn) is written beside
    ``eval_answers.csv`` when ``draw`` returns boxes; ``eval_people.csv`` (ImageID, person) says
    whose photo each eval image is, so held-out figures can be bootstrapped over people.
    ``label_noise`` plants that share of train people with an error of each kind
    (``core.label_noise.plant_label_noise``); 0 writes exactly the layout without the option.
    """
    meta = np.random.default_rng([seed, ROLE_META])
    boxes: list[tuple] = []
    bar = tqdm(total=len(train) + len(evals), desc="synthetic people", unit="person",
               disable=not progress)
    _write_train(root, train, seed, draw, meta, bar, boxes, label_noise)
    eval_dir = root / "eval" / "images"
    eval_dir.mkdir(parents=True)
    answers = []
    for i, p in enumerate(evals):
        for j, stem in enumerate(IMAGE_STEMS):
            rng = np.random.default_rng([seed, ROLE_EVAL_IMAGE, i, j])
            image_id = rng.bytes(20).hex() + ".jpg"  # like the competition's sha1-named files
            kind = MASK_BY_STEM[stem]
            img, box = draw(p, kind, rng)
            (eval_dir / image_id).write_bytes(encode_image(img, ".jpg"))
            answers.append((image_id, int(encode(kind, p.gender, age_group(p.age))), i))
            if box is not None:
                boxes.append((f"eval/images/{image_id}", *box, kind))
        bar.update()
    bar.close()
    answers = [answers[k] for k in meta.permutation(len(answers))]
    write_csv(root / "eval" / "info.csv", ("ImageID", "ans"), [(a, "") for a, _, _ in answers])
    write_csv(root / "eval_answers.csv", ("ImageID", "ans"), [(a, c) for a, c, _ in answers])
    write_csv(root / EVAL_PEOPLE, ("ImageID", "person"), [(a, i) for a, _, i in answers])
    if boxes:
        write_csv(root / TRUE_BOXES, BOX_HEADER, sorted(boxes))


def check_counts(people: int, eval_people: int, seed: int, size: tuple[int, int],
                 label_noise: float = 0.0) -> None:
    """Refuse arguments no layout can be written for (``ValueError`` naming the argument)."""
    if not 0 <= label_noise < 1 / len(NOISE_KINDS):
        raise ValueError(f"label_noise is the share of people per kind of error, in "
                         f"0..{1 / len(NOISE_KINDS):.3f} (exclusive), got {label_noise}")
    if people < MIN_PEOPLE:
        raise ValueError(f"people must be >= {MIN_PEOPLE} (the planted label errors and shared "
                         f"id need that many), got {people}")
    if eval_people < 0:
        raise ValueError(f"eval_people must be >= 0, got {eval_people}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min(size) < MIN_SIDE:
        raise ValueError(f"size must be (height, width) with each >= {MIN_SIDE}, got {size}")


def install(out_dir: str | Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Run ``write(tmp)`` into a sibling temp folder and rename it to ``out_dir``.

    ``out_dir`` must be absent or empty unless ``overwrite`` (then it must hold an earlier
    synthetic set: ``train/train.csv``). A crash never leaves half a data set.
    """
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
        write(tmp)
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
