"""Broken image files: each is named with its reason in ONE error from the first decoding pass,
before any cache folder exists; grayscale and RGBA images are converted, not rejected.

Policy (nothing is skipped, train or eval): an undecodable training image almost always means a
broken copy, and skipping it would silently change the data and its folds; the submission needs
a row for every eval image.
"""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import core.cache as C
import core.faces as F
import core.images as IM
from core.cache import build_cache, crop_resize, main
from core.dataset import load_eval_table, load_train_table
from core.errors import DataError
from tests.conftest import CACHE_SIZE

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def jpeg_bytes(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", **kw)
    return buf.getvalue()


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; as root (CI) that does not stop reading, so core.faces' ``open`` is made to
    fail for this path the way the OS would."""
    path.chmod(0)
    if AS_ROOT:
        def guarded(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(IM, "open", guarded, raising=False)


# --- read_rgb: the reason per kind of bad file ---------------------------------------------


RGB = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty file"),
    (b"name,age\nsomeone,40\n", "not an image (a text file)"),
    (b"\x00\x01\x02" * 50, "not an image (unknown format)"),
    (jpeg_bytes(RGB)[:700], "truncated JPEG"),
    (jpeg_bytes(RGB, progressive=True)[:-40], "truncated JPEG"),
])
def test_read_rgb_names_the_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "mask1.jpg"
    path.write_bytes(content)
    with pytest.raises(IM.BadImageError, match=rf"mask1\.jpg: {re.escape(reason)}$") as e:
        IM.read_rgb(path)
    assert e.value.reason == reason and isinstance(e.value, DataError)


def test_truncated_png_and_missing_file(tmp_path: Path) -> None:
    Image.fromarray(RGB).save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:-200])
    with pytest.raises(IM.BadImageError, match="truncated PNG"):
        IM.read_rgb(tmp_path / "cut.png")
    with pytest.raises(IM.BadImageError, match="file not found"):
        IM.read_rgb(tmp_path / "gone.jpg")


def test_partial_decode_of_a_truncated_jpeg_is_caught(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV 4 decodes a cut-off JPEG into a half-gray image; it must not pass as the photo."""
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg_bytes(RGB)[:900])
    monkeypatch.setattr(IM.cv2, "imdecode", lambda data, flags: np.full((64, 48, 3), 128,
                                                                        np.uint8))
    with pytest.raises(IM.BadImageError, match="truncated JPEG"):
        IM.read_rgb(path)


def test_bytes_after_the_jpeg_end_are_fine(tmp_path: Path) -> None:
    """Some cameras append data after the end marker: that photo is complete."""
    path = tmp_path / "trailer.jpg"
    path.write_bytes(jpeg_bytes(RGB) + b"SEFH" + bytes(range(200)))
    ref = tmp_path / "plain.jpg"
    ref.write_bytes(jpeg_bytes(RGB))
    assert np.array_equal(IM.read_rgb(path), IM.read_rgb(ref))


def test_unreadable_file_is_permission_denied(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.jpg"
    path.write_bytes(jpeg_bytes(RGB))
    make_unreadable(path, monkeypatch)
    with pytest.raises(IM.BadImageError, match=r"locked\.jpg: permission denied"):
        IM.read_rgb(path)


def test_gray_rgba_and_16_bit_png_become_rgb(tmp_path: Path) -> None:
    """Alpha is dropped (not blended onto black), gray is copied to all three channels."""
    alpha = np.linspace(0, 255, RGB.shape[0] * RGB.shape[1]).reshape(RGB.shape[:2])
    Image.fromarray(np.dstack([RGB, alpha.astype(np.uint8)])).save(tmp_path / "rgba.png")
    gray = RGB[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    cv2.imwrite(str(tmp_path / "gray16.png"), gray.astype(np.uint16) * 257)
    Image.fromarray(RGB).convert("P").save(tmp_path / "palette.png")
    assert np.array_equal(IM.read_rgb(tmp_path / "rgba.png"), RGB)
    assert np.array_equal(IM.read_rgb(tmp_path / "gray.png"), np.dstack([gray] * 3))
    assert np.array_equal(IM.read_rgb(tmp_path / "gray16.png"), np.dstack([gray] * 3))
    palette = IM.read_rgb(tmp_path / "palette.png")
    want = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))
    assert palette.dtype == np.uint8 and np.array_equal(palette, want)


# --- the cache build: one error listing every bad file, no cache written -------------------


def person_image(data: Path, k: int, stem: str) -> Path:
    """The ``stem`` image of the k-th person folder (sorted)."""
    folder = sorted((data / "train" / "images").glob("[!.]*"))[k]
    return next(folder.glob(f"{stem}.*"))


def break_images(data: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Five kinds of bad file (one of them an eval image) -> {relative path: reason}."""
    bad = {}
    truncated = person_image(data, 0, "mask1")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    bad[truncated] = "truncated JPEG" if truncated.suffix != ".png" else "truncated PNG"
    empty = person_image(data, 1, "mask2")
    empty.write_bytes(b"")
    bad[empty] = "empty file"
    text = person_image(data, 2, "mask3")
    text.write_text("this is not a photo\n")
    bad[text] = "not an image (a text file)"
    locked = person_image(data, 3, "mask4")
    locked.write_bytes(locked.read_bytes())  # new mtime: not in the saved face-box table
    make_unreadable(locked, monkeypatch)
    bad[locked] = "permission denied"
    ev = data / load_eval_table(data)["file"].iloc[2]
    ev.write_bytes(ev.read_bytes()[:300])
    bad[ev] = "truncated JPEG"
    return {p.relative_to(data).as_posix(): r for p, r in bad.items()}


def convert_to_png(data: Path, k: int, stem: str, mode: str) -> tuple[str, np.ndarray]:
    """Replace a person's JPEG by an RGBA or gray PNG of it; return its file and expected RGB."""
    src = person_image(data, k, stem)
    rgb = IM.read_rgb(src)
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)]))
        want = rgb
    else:
        img = Image.fromarray(rgb).convert("L")
        want = np.dstack([np.asarray(img)] * 3)
    src.unlink()
    dst = src.with_suffix(".png")
    img.save(dst)
    return dst.relative_to(data).as_posix(), want


def test_bad_images_stop_the_build_with_one_error_before_any_cache(
        synth_data: Path, copy_of_synth: Path, copy_of_cache_root: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    data, root = copy_of_synth, copy_of_cache_root
    converted = [convert_to_png(data, 4, "normal", "RGBA"), convert_to_png(data, 5, "mask5", "L")]
    bad = break_images(data, monkeypatch)
    files = load_train_table(data)["file"].tolist() + load_eval_table(data)["file"].tolist()
    assert set(bad) <= set(files)  # the tables list them: only decoding finds them
    before = sorted(p.name for p in root.iterdir())
    table = next(root.glob("boxes-*.csv"))
    monkeypatch.setattr(C, "_crop_chunk", lambda *a: pytest.fail("cropping began"))

    code = main(["--data", str(data), "--cache-root", str(root), "--workers", "1",
                 "--height", str(CACHE_SIZE[0]), "--width", str(CACHE_SIZE[1])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    err = err[err.index("error: "):]  # after the progress bar
    assert "5 image file(s) cannot be used" in err and "no cache was written" in err
    listed = [line.strip() for line in err.strip().splitlines()[1:]]
    assert listed == [f"{f}: {bad[f]}" for f in files if f in bad]  # train, then eval
    assert sorted(p.name for p in root.iterdir()) == before  # no cache, no temp folder
    saved = F.load_detections(table)  # the good new files' boxes are kept for the rerun
    assert {f for f, _ in converted} <= set(saved["file"]) and not set(bad) & set(saved["file"])

    monkeypatch.undo()
    for f in bad:  # the fix: copy the broken files again from the original
        (data / f).chmod(0o644)
        shutil.copy2(synth_data / f, data / f)
    cache = build_cache(data, CACHE_SIZE, cache_root=root, workers=1, progress=False)
    assert len(cache) == len(files)
    for f, want in converted:  # converted, not rejected: the cached pixels are the photo's
        r = int(cache.rows([f])[0])
        box = cache.index.loc[r, ["x1", "y1", "x2", "y2"]].to_numpy()
        assert np.array_equal(cache.images[r], crop_resize(want, box, CACHE_SIZE))
    gray_row = cache.images[int(cache.rows([converted[1][0]])[0])]
    assert np.array_equal(gray_row[..., 0], gray_row[..., 2]) and gray_row.std() > 5


def test_file_broken_after_detection_is_caught_while_cropping(
        synth_cache, copy_of_synth: Path, copy_of_cache_root: Path) -> None:
    """A file damaged in place (same size and mtime, so its saved face box is reused) is found
    by the crop pass, in worker processes too; the half-built folder is removed."""
    data, root = copy_of_synth, copy_of_cache_root
    victims = [synth_cache.index["file"].iloc[i] for i in (3, len(synth_cache) - 1)]
    for f in victims:
        st = (data / f).stat()
        (data / f).write_bytes(bytes(st.st_size))
        os.utime(data / f, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(DataError, match=r"2 image file\(s\) cannot be used") as e:
        build_cache(data, (20, 16), cache_root=root, workers=2, progress=False)
    assert [line.strip() for line in str(e.value).splitlines()[1:]] == [
        f"{f}: not an image (unknown format)" for f in victims]
    assert sorted(p.name for p in root.iterdir()) == before
