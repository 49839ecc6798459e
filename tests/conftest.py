"""Shared fixtures: one synthetic data set per test session, and hand-written tiny layouts.

``synth_data`` is generated once (it costs seconds); tests that modify files take
``copy_of_synth`` instead, a fresh copy per test. ``synth_cache`` is its image cache, built once
(face detection costs seconds); ``copy_of_cache_root`` copies its root, whose face-box table stays
valid for ``copy_of_synth`` (copies keep sizes and mtimes), so builds on the copy detect nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.labels import IMAGE_STEMS

SYNTH_PEOPLE = 40
SYNTH_EVAL_PEOPLE = 8
SYNTH_SIZE = (64, 48)  # (height, width)
CACHE_SIZE = (32, 24)  # (height, width) of ``synth_cache``


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic competition layout (40 people, 8 eval people, seed 0, 64x48). Do not modify."""
    from core.synth import generate

    out = tmp_path_factory.mktemp("synth")
    return Path(generate(out, people=SYNTH_PEOPLE, eval_people=SYNTH_EVAL_PEOPLE, seed=0,
                         size=SYNTH_SIZE))


@pytest.fixture
def copy_of_synth(synth_data: Path, tmp_path: Path) -> Path:
    """A private copy of ``synth_data`` that a test may break."""
    return Path(shutil.copytree(synth_data, tmp_path / "synth"))


@pytest.fixture(scope="session")
def synth_cache(synth_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """``core.cache.build_cache`` of ``synth_data`` at ``CACHE_SIZE``, in-process. Do not modify."""
    from core.cache import build_cache

    root = tmp_path_factory.mktemp("cache_root")
    return build_cache(synth_data, CACHE_SIZE, cache_root=root, workers=1, progress=False)


@pytest.fixture
def copy_of_cache_root(synth_cache, tmp_path: Path) -> Path:
    """A private copy of ``synth_cache``'s root (its caches and face-box table)."""
    return Path(shutil.copytree(synth_cache.path.parent, tmp_path / "cache_root"))


#: (id, gender, race, age, folder) rows: an id with a -1 suffix, one id used by two people.
TINY_PEOPLE: tuple[tuple[str, str, str, int, str], ...] = (
    ("000001", "female", "Asian", 45, "000001_female_Asian_45"),
    ("000002", "male", "Asian", 60, "000002_male_Asian_60"),
    ("000002", "female", "Asian", 29, "000002_female_Asian_29"),
    ("000003-1", "male", "Asian", 30, "000003-1_male_Asian_30"),
)


def write_tiny_layout(
    root: Path,
    people: Sequence[tuple[str, str, str, int, str]] = TINY_PEOPLE,
    eval_images: int = 3,
) -> Path:
    """Write a small competition layout by hand; return root.

    Mixed extensions; every folder holds a macOS ``._mask1.jpg`` and a ``notes.txt``, the first
    one also ``thumb.png`` (an image that is none of the 7); ``images/`` holds a ``._`` file.
    """
    rng = np.random.default_rng(0)
    suffixes = (".jpg", ".jpeg", ".png")
    images = root / "train" / "images"
    lines = ["id,gender,race,age,path"]
    for k, (pid, gender, race, age, folder) in enumerate(people):
        lines.append(f"{pid},{gender},{race},{age},{folder}")
        d = images / folder
        d.mkdir(parents=True)
        for j, stem in enumerate(IMAGE_STEMS):
            pixels = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{stem}{suffixes[(j + k) % 3]}")
        (d / f"._{IMAGE_STEMS[0]}.jpg").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (d / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / people[0][4] / "thumb.png")
    (images / f"._{people[0][4]}").write_bytes(b"junk")
    (root / "train" / "train.csv").write_text("\n".join(lines) + "\n")
    ev = root / "eval" / "images"
    ev.mkdir(parents=True)
    names = [f"{'%040x' % (i + 1)}.jpg" for i in range(eval_images)]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)).save(ev / n)
    (root / "eval" / "info.csv").write_text("ImageID,ans\n" + "".join(f"{n},\n" for n in names))
    return root


@pytest.fixture
def tiny_layout(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_layout(people=..., eval_images=...)`` writes a fresh hand-made layout."""
    count = iter(range(1_000_000))

    def make(**kwargs) -> Path:
        return write_tiny_layout(tmp_path / f"tiny{next(count)}", **kwargs)

    return make


#: Trial settings that train fastest (smallest timm test net, smallest input): enqueue these so
#: end-to-end tests do not depend on what the sampler picks. ``from tests.conftest import FAST``.
FAST: dict[str, object] = {"backbone": "test_resnet", "image_size": "48x32", "loss": "ce",
                           "lr": 3e-3, "class_weights": "none", "age_threshold": 60}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small synthetic layout for end-to-end search runs (24 people, 4 eval, 48x36). Its image
    caches live inside it and are shared by the tests that build them; do not modify files."""
    from core.synth import generate

    return Path(generate(tmp_path_factory.mktemp("tiny") / "data", people=24, eval_people=4,
                         seed=0, size=(48, 36)))


#: (gender, age) of the faces in ``write_faces_folder``: both genders in every age group.
FACE_PEOPLE: tuple[tuple[str, int], ...] = (
    ("female", 19), ("male", 22), ("female", 25), ("male", 28), ("female", 33), ("male", 41),
    ("female", 47), ("male", 52), ("female", 56), ("male", 59), ("female", 60), ("male", 60),
    ("female", 21), ("female", 38), ("male", 45), ("female", 60),
)


def write_faces_folder(root: Path, people: Sequence[tuple[str, int]] = FACE_PEOPLE) -> Path:
    """A faces folder in the format of ``../shared/faces`` (``faces.csv`` + ``photos/``), made
    from scikit-image's astronaut photo: one 200x200 face per person, each cropped a little
    differently, some mirrored, with its own colour balance, so every photo is distinct."""
    from skimage.data import astronaut

    src = astronaut()
    rng = np.random.default_rng(0)
    (root / "photos").mkdir(parents=True)
    lines = ["file,gender,age,true_age,race"]
    for i, (gender, age) in enumerate(people):
        y, x = (i * 7) % 30, (i * 11) % 30  # distinct crops: each photo is told apart
        face = src[10 + y:190 + y, 150 + x:330 + x].astype(np.float32)
        face = face * rng.uniform(0.7, 1.2, 3) + rng.uniform(-20, 20)
        img = Image.fromarray(np.clip(face, 0, 255).astype(np.uint8)).resize((200, 200))
        if i % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        name = f"face{i:05d}.jpg"
        img.save(root / "photos" / name, quality=95)
        lines.append(f"{name},{gender},{age},{age},white")
    (root / "faces.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def faces_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``write_faces_folder`` once per session (16 people). Do not modify."""
    return write_faces_folder(tmp_path_factory.mktemp("faces"))


@pytest.fixture(scope="session")
def quality_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder for the quality study's backbones, as ``search.weights`` writes it
    (ImageNet heads) but randomly initialised: the plumbing of pretrained loading, no network
    and no ``../shared``."""
    import timm
    from safetensors.torch import save_file

    from studies import quality

    folder = tmp_path_factory.mktemp("weights")
    for name in quality.BACKBONES:
        state = timm.create_model(name, num_classes=1000).state_dict()
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return folder


@pytest.fixture
def quiet_optuna():
    """Optuna's per-trial INFO lines off for a test (files opt in with ``pytestmark``)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)


STUDY_DATA_FOLDS = 2


@pytest.fixture(scope="session")
def study_data(tiny_data: Path):
    """What ``search.run`` loads for ``tiny_data`` with 2 folds (table, folds, cache), without a
    search; for objective tests with a stand-in ``fit``."""
    from core.study_data import load_study_data

    return load_study_data(tiny_data, tiny_data / "corrections.csv", STUDY_DATA_FOLDS, 0)
