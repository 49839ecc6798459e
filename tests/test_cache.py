"""The image cache: contents match the one preprocessing path, reuse reads no image, changes
rebuild, and an interrupted build never leaves a cache that looks valid."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import core.detectors as D
import core.faces as F
import core.images as IM
from core.cache import ImageCache, build_cache, crop_resize, default_cache_root, main
from core.dataset import load_eval_table, load_train_table
from core.errors import DataError
from tests.conftest import CACHE_SIZE as SIZE


@pytest.fixture
def built(synth_cache: ImageCache) -> ImageCache:
    return synth_cache


@pytest.fixture
def copied(copy_of_synth: Path, copy_of_cache_root: Path) -> tuple[Path, Path]:
    """A private copy of the data and of the cache root (its face boxes stay valid: copies keep
    sizes and mtimes), so tests that modify files skip face detection."""
    return copy_of_synth, copy_of_cache_root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every image decode, full (crop) or reduced (detection), in in-process builds
    (workers=1)."""
    calls: list[str] = []
    real_full, real_small = IM.read_rgb, IM.read_small

    def counting(path):
        calls.append(str(path))
        return real_full(path)

    def counting_small(path, reduce):
        calls.append(str(path))
        return real_small(path, reduce)

    monkeypatch.setattr(IM, "read_rgb", counting)
    monkeypatch.setattr(IM, "read_small", counting_small)
    return calls


def test_cache_holds_every_image_cropped_and_resized(built: ImageCache, synth_data: Path) -> None:
    train, ev = load_train_table(synth_data), load_eval_table(synth_data)
    assert built.images.shape == (len(train) + len(ev), *SIZE, 3)
    assert built.images.dtype == np.uint8
    assert built.index["file"].tolist() == train["file"].tolist() + ev["file"].tolist()
    assert set(built.index["split"]) == {"train", "eval"}
    assert set(built.index["box_source"]) <= set(F.BOX_SOURCES)
    rows = built.rows(ev["file"].tolist()[::-1])
    assert rows.tolist() == list(range(len(built) - 1, len(train) - 1, -1))
    for r in (0, len(train) + 1):  # a train and an eval image, byte for byte
        box = built.index.loc[r, ["x1", "y1", "x2", "y2"]].to_numpy()
        want = crop_resize(IM.read_rgb(synth_data / built.index.loc[r, "file"]), box, SIZE)
        assert np.array_equal(built.images[r], want)
    with pytest.raises(ValueError):
        built.images[0, 0, 0, 0] = 1  # read-only: trials cannot corrupt the cache
    with pytest.raises(DataError, match="nope.jpg"):
        built.rows(["train/images/nope.jpg"])


def test_reuse_opens_no_source_image(built: ImageCache, synth_data: Path, decodes: list[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "get_detector", lambda s: pytest.fail("detector loaded on reuse"))
    again = build_cache(synth_data, SIZE, cache_root=built.path.parent, workers=1,
                        progress=False)
    assert decodes == []
    assert again.path == built.path
    assert np.array_equal(again.images, built.images)


def test_other_image_size_reuses_face_boxes(built: ImageCache, synth_data: Path,
                                            decodes: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "get_detector", lambda s: pytest.fail("faces detected twice"))
    other = build_cache(synth_data, (20, 16), cache_root=built.path.parent, workers=1,
                        progress=False)
    assert other.path != built.path and other.images.shape[1:3] == (20, 16)
    assert len(decodes) == len(built)  # one decode per image, for the crop
    assert other.index[["x1", "y1", "x2", "y2", "box_source"]].equals(
        built.index[["x1", "y1", "x2", "y2", "box_source"]])


def test_touching_one_file_rebuilds(copied: tuple[Path, Path], decodes: list[str]) -> None:
    data, root = copied
    first = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    n = len(first)
    assert len(decodes) == n  # boxes came from the copied table: no detection decode
    touched = data / first.index.loc[3, "file"]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    decodes.clear()
    second = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert second.path == first.path
    assert len(decodes) == n + 1  # the touched file is detected again, then all are cropped
    assert decodes[0] == str(touched)
    decodes.clear()
    build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert decodes == []


def test_error_mid_build_leaves_no_cache(copied: tuple[Path, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data, root = copied
    real, calls = IM.read_rgb, []

    def failing(path):
        calls.append(path)
        if len(calls) == 100:
            raise OSError("disk on fire")
        return real(path)

    before = sorted(root.iterdir())
    monkeypatch.setattr(IM, "read_rgb", failing)
    with pytest.raises(OSError, match="disk on fire"):
        build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert sorted(root.iterdir()) == before  # no new folder, complete or not
    monkeypatch.setattr(IM, "read_rgb", real)
    cache = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert cache.images[:].any(axis=(1, 2, 3)).all()


def test_killed_build_leaves_no_valid_looking_cache(copied: tuple[Path, Path]) -> None:
    """SIGKILL mid-build (no cleanup can run): the half-written folder is never opened as a
    cache, and the next build succeeds and removes it."""
    data, root = copied
    before = set(root.iterdir())
    script = textwrap.dedent(f"""
        import os, signal
        import core.images as IM
        from core.cache import build_cache
        real, n = IM.read_rgb, [0]
        def dying(path):
            n[0] += 1
            if n[0] == 150:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path)
        IM.read_rgb = dying
        build_cache({str(data)!r}, {SIZE!r}, cache_root={str(root)!r}, workers=1, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = sorted(set(root.iterdir()) - before)
    assert len(leftovers) == 1 and leftovers[0].name.endswith(".tmp")  # the killed build's folder
    with pytest.raises(DataError, match="not a complete image cache"):
        ImageCache.open(leftovers[0])
    cache = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert cache.images[:].any(axis=(1, 2, 3)).all()
    assert not leftovers[0].exists()


def test_parallel_build_equals_in_process(built: ImageCache, copied: tuple[Path, Path]) -> None:
    data, root = copied
    par = build_cache(data, SIZE, cache_root=root, workers=2, progress=False)
    assert np.array_equal(par.images, built.images)


def test_cli_and_default_root(built: ImageCache, synth_data: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("MASK_SEARCH_CACHE", raising=False)
    assert default_cache_root(synth_data) == synth_data / ".mask_search_cache"
    monkeypatch.setenv("MASK_SEARCH_CACHE", str(built.path.parent))
    assert default_cache_root(synth_data) == built.path.parent
    assert main(["--data", str(synth_data), "--height", "32", "--width", "24"]) == 0
    assert str(built.path) in capsys.readouterr().out  # prebuilt cache found through the env
    assert main(["--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_killed_mid_build_then_next_build_is_valid(copied: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """``python -m core.cache`` SIGKILLed from outside once its progress bar has moved (decoding
    slowed so the kill lands mid-build): no cache that looks valid; the next build makes one."""
    data, root = copied
    before = set(root.iterdir())
    slow = ("import sys, time, core.images as IM\n"
            "real = IM.read_rgb\n"
            "IM.read_rgb = lambda p: (time.sleep(0.02), real(p))[1]\n"
            "from core.cache import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", slow, "--data", str(data), "--cache-root", str(root),
             "--workers", "1", "--height", str(SIZE[0]), "--width", str(SIZE[1])],
            stdout=subprocess.DEVNULL, stderr=err, cwd=Path(__file__).parents[1])
        try:
            deadline = time.monotonic() + 60
            while not re.search(r"cache 32x24: +\d+%.*\| *[1-9]\d*/", log.read_text()):
                assert proc.poll() is None, f"build ended before the kill: {log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(set(root.iterdir()) - before)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".images-{SIZE[0]}x{SIZE[1]}-")
    assert leftovers[0].name.endswith(".tmp") and not (leftovers[0] / "manifest.json").exists()
    half = np.load(leftovers[0] / "images.npy", mmap_mode="r")
    filled = half.any(axis=(1, 2, 3))
    assert filled.any() and not filled.all()  # killed with part of the images written
    with pytest.raises(DataError, match="not a complete image cache"):
        ImageCache.open(leftovers[0])
    assert main(["--data", str(data), "--cache-root", str(root), "--workers", "1",
                 "--height", str(SIZE[0]), "--width", str(SIZE[1])]) == 0
    cache = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert cache.images[:].any(axis=(1, 2, 3)).all()
    assert not leftovers[0].exists()


def test_damaged_cache_is_rebuilt_not_opened(copied: tuple[Path, Path]) -> None:
    """A cache folder cut short after it was built (disk full, a bad copy) is rebuilt."""
    data, root = copied
    npy = build_cache(data, SIZE, cache_root=root, workers=1, progress=False).path / "images.npy"
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)
    with pytest.raises(DataError, match="damaged image cache"):
        ImageCache.open(npy.parent)
    cache = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert cache.images[:].any(axis=(1, 2, 3)).all()


@pytest.mark.slow
def test_processes_building_at_once_build_once(copied: tuple[Path, Path], tmp_path: Path) -> None:
    """Two processes (two ``search.run`` workers) ask for the same stale cache at the same moment:
    one detects the changed file's face and builds, the other waits and reuses that cache; both
    get a complete cache, and no folder without a manifest is ever installed."""
    data, root = copied
    first = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    touched = data / first.index.loc[3, "file"]
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # stale: rebuild, redetect
    before = sorted(p.name for p in root.iterdir())
    log, ready = tmp_path / "events.log", tmp_path / "ready"
    ready.mkdir()
    script = textwrap.dedent(f"""
        import json, os, time
        from pathlib import Path
        import core.cache as C, core.detectors as D
        def logged(tag, fn):
            def wrap(*args, **kwargs):
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{tag}} {{os.getpid()}}\\n")
                return fn(*args, **kwargs)
            return wrap
        D.get_detector = logged("detector", D.get_detector)
        C._install = logged("install", C._install)
        import core.images as IM
        real = IM.read_rgb
        IM.read_rgb = lambda p: (time.sleep(0.005), real(p))[1]  # a build of a second or more
        Path({str(ready)!r}, str(os.getpid())).touch()
        while len(list(Path({str(ready)!r}).iterdir())) < 2:  # start both builds together
            time.sleep(0.005)
        cache = C.build_cache({str(data)!r}, {SIZE!r}, cache_root={str(root)!r}, workers=1,
                              progress=False)
        print(json.dumps([str(cache.path), bool(cache.images[:].any(axis=(1, 2, 3)).all())]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out) == [str(first.path), True]
    events = log.read_text().split()
    assert events.count("detector") == 1 and events.count("install") == 1, events
    assert sorted(p.name for p in root.iterdir()) == before  # no temp or old folder left
    cache = ImageCache.open(first.path)
    assert cache.manifest["sources"] != first.manifest["sources"]  # the rebuilt one


def test_box_settings_change_the_key_and_reuse_detections(built: ImageCache, copied,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A wider margin is another cache (its crops hold the default ones), built from the saved
    detections: nothing is detected again. Detection settings name another table."""
    data, root = copied
    monkeypatch.setattr(D, "get_detector", lambda s: pytest.fail("faces detected again"))
    wide = build_cache(data, SIZE, F.FaceSettings(margin=0.4), cache_root=root, workers=1,
                       progress=False)
    assert wide.path.name != built.path.name
    cols = ["x1", "y1", "x2", "y2"]
    a, b = built.index[cols].to_numpy(), wide.index[cols].to_numpy()
    assert (b[:, :2] <= a[:, :2]).all() and (b[:, 2:] >= a[:, 2:]).all() and (b != a).any()
    assert F.FaceSettings(retry_scale=0).detection_key() != F.FaceSettings().detection_key()
    assert F.FaceSettings(margin=0.4).detection_key() == F.FaceSettings().detection_key()


def test_another_detector_is_another_cache_and_detects_again(
        copied: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The detectors are in both keys: a cache made with other detectors (MTCNN alone, as every
    cache was before YuNet) is not reused, its boxes are detected again into their own table,
    and the default's cache and table are still there and reused as they are."""
    data, root = copied
    loaded: list[tuple[str, ...]] = []
    real = D.get_detector
    monkeypatch.setattr(D, "get_detector", lambda s: loaded.append(s.detectors) or real(s))
    default = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert loaded == []  # the copied root's face-box table serves the copy
    mtcnn = F.FaceSettings(detectors=("mtcnn",))
    old = build_cache(data, SIZE, mtcnn, cache_root=root, workers=1, progress=False)
    assert set(loaded) == {("mtcnn",)} and old.path != default.path
    assert old.manifest["key"]["faces"]["detectors"] == ["mtcnn"]
    assert default.manifest["key"]["faces"]["detectors"] == ["yunet", "mtcnn"]
    tables = sorted(p.name for p in root.glob("boxes-*.csv"))
    assert tables == sorted(f"boxes-{s.detection_key()}.csv" for s in (mtcnn, F.FaceSettings()))
    calls = len(loaded)
    again = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert len(loaded) == calls and again.path == default.path


def test_a_full_disk_during_the_build_is_one_line_and_leaves_no_cache(
        copied: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the image memmap is reserved: one DataError naming the cache
    folder, no folder left that looks like a cache (nor its temp), and the next build with
    space works. (The memmap is reserved up front so a full disk is this error, not a SIGBUS
    in the middle of writing images.)"""
    import errno
    import os

    data, root = copied
    before = set(root.iterdir())

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DataError) as info:
        build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("no space left on the device writing ")
    assert str(root) in message and "images-" in message
    new = sorted(p.name for p in set(root.iterdir()) - before)
    assert not [n for n in new if n.startswith("images-")], new  # neither a cache nor its temp
    monkeypatch.undo()
    cache = build_cache(data, SIZE, cache_root=root, workers=1, progress=False)
    assert cache.images[:].any(axis=(1, 2, 3)).all()


def test_photos_smaller_than_the_faces_searched_for_are_said_and_a_study_can_fix_it(
        synth_data: Path, synth_cache: ImageCache, copy_of_cache_root: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The default settings (competition photos, faces from 80 px) find nothing in 64x48
    photos: every crop is the centre box, and the build says so; the demo study's ``FACES``
    find most faces there (its search's best OOF F1 was 0.349 without them, 0.583 with)."""
    from studies import demo, face_settings

    assert set(synth_cache.index["box_source"]) == {"center"}
    build_cache(synth_data, (24, 16), cache_root=copy_of_cache_root, workers=1, progress=False)
    err = capfd.readouterr().err
    assert "no face found in any of its 336 images (photos about 48x64, faces searched from " \
           "80 px" in err
    demo_cache = build_cache(synth_data, SIZE, face_settings(demo), cache_root=tmp_path / "demo",
                             workers=1, progress=False)
    found = demo_cache.index["box_source"].isin(F.FOUND_SOURCES).mean()
    assert found > 0.3, demo_cache.index["box_source"].value_counts()
    assert "no face found" not in capfd.readouterr().err
