"""The dlib backend: offline, no GPU needed, 128-d identity embeddings.

Detection is a cascade: dlib's HOG detector proposes faces (pyramid upsampling 0, then 1 if
nothing was found); proposals with a low SVM margin are kept only if dlib's CNN (MMOD)
detector confirms a face on a local crop, which rejects face-like textures such as mission
patches; if HOG finds nothing at all, the CNN detector searches the whole (downscaled) image,
which catches turned faces HOG misses. By default that CNN runs as a torch port (`dlib_mmod`:
same weights and detections as dlib's, ~10x faster here). The 68 iBUG landmarks give the 5
InstantID keypoints (`kps_from_68`). That 68-point model was trained on HOG boxes; CNN boxes sit higher and
looser, and a 68-point fit on them can go badly wrong on turned faces, so a face found by the
CNN first gets a HOG-style box placed from dlib's 5-point model (trained on both box types,
`hog_style_box`). The embedding is dlib's ResNet face descriptor, compared by Euclidean
distance (the same person is usually closer than 0.6); by default it is computed by the torch
port of that network (`dlib_resnet`: same weights and output, several times faster than dlib here)
on the face chip dlib aligns (`dlib.get_face_chip`, 150 px, padding 0.25).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from ..errors import InputError, ModelFilesMissingError
from .base import Detection, Face, FaceAnalyzer

#: Files of the `face_recognition_models` package this backend loads.
DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "five_points": "shape_predictor_5_face_landmarks.dat",
    "cnn_detector": "mmod_human_face_detector.dat",
    "recognizer": "dlib_face_recognition_resnet_model_v1.dat",
}
#: What can run the descriptor network (`DlibConfig.descriptor`).
DESCRIPTORS = ("torch", "dlib")
#: What can run the CNN (MMOD) face detector (`DlibConfig.detector`).
DETECTORS = ("torch", "dlib")
#: Face chips as dlib's recognizer reads them: side in pixels, padding around the landmarks.
CHIP_SIZE, CHIP_PADDING = 150, 0.25

# Indices into the 68 iBUG 300-W landmarks (0-based). "First"/"second" are the annotation's
# order, which is image-left first for an upright, unmirrored face.
FIRST_EYE = slice(36, 42)  # 6 contour points
SECOND_EYE = slice(42, 48)
NOSE_TIP = 30
FIRST_MOUTH_CORNER = 48
SECOND_MOUTH_CORNER = 54

# Where dlib's HOG detector puts its box relative to the 5-point landmarks (two corners per
# eye, then the base of the nose), measured on the HOG detections of the bundled photos (26
# faces): width = 2.41 (sd 0.27) x eye distance = 3.13 (sd 0.40) x eyes-to-nose distance;
# centre 0.20 (sd 0.05) widths below the midpoint of the eyes, horizontally at it (sd 0.05).
# The larger of the two width estimates is used: turning the head shrinks the eye distance,
# looking down shrinks the eyes-to-nose distance, rarely both.
BOX_PER_EYE_DISTANCE = 2.4
BOX_PER_EYES_TO_NOSE = 3.1
BOX_CENTRE_BELOW_EYES = 0.2


@dataclass(frozen=True)
class DlibConfig:
    """Settings of the dlib backend.

    :param max_side: HOG detection runs on a copy whose longer side is at most this (pixels).
    :param upsample: HOG pyramid upsampling levels, tried in order until a face is found
        (each level halves the smallest findable face, ~80 px at level 0, and costs ~4x).
    :param confident_score: HOG proposals with an SVM margin at least this are accepted as is;
        weaker ones (margin in [0, confident_score)) must be confirmed by the CNN detector.
    :param verify_face_side: for that confirmation, the crop is scaled so the proposed face
        is this many pixels wide (the CNN detector finds faces from ~80 px).
    :param min_overlap: IoU a CNN detection must share with the proposal to confirm it.
    :param cnn_max_side: the whole-image CNN fallback runs on a copy with this longer side. It
        finds faces from ~80 px there, so 384 finds turned faces wider than ~1/5 of the photo's
        longer side at ~0.1 s per photo on one core (~1 s with detector="dlib"); raise it for
        smaller turned faces (cost grows with its square).
    :param num_jitters: descriptor averaged over this many jittered crops (1 = no jitter).
    :param descriptor: what runs the descriptor network: "torch" (the port in `dlib_resnet`,
        fast) or "dlib" (`face_recognition_model_v1.compute_face_descriptor`, the reference).
    :param detector: what runs the CNN face detector: "torch" (the port in `dlib_mmod`, fast,
        same detections) or "dlib" (`cnn_face_detection_model_v1`, the reference).
    :param torch_threads: intra-op threads of the "torch" descriptor and detector (0 = torch's
        setting). One chip or one 384-px photo is too little work to split: on a shared 2-core
        CPU, 2 threads wait on each other (the detector: ~0.1 s with 1 thread, ~0.4 s with 2).
    """

    max_side: int = 1024
    upsample: tuple[int, ...] = (0, 1)
    confident_score: float = 0.5
    verify_face_side: int = 100
    min_overlap: float = 0.3
    cnn_max_side: int = 384
    num_jitters: int = 1
    descriptor: str = "torch"
    detector: str = "torch"
    torch_threads: int = 1

    def __post_init__(self):
        object.__setattr__(self, "upsample", tuple(int(u) for u in self.upsample))
        if not self.upsample or min(self.upsample) < 0:
            raise InputError(f"upsample must list pyramid levels >= 0, e.g. (0, 1); got {self.upsample}.")
        if min(self.max_side, self.cnn_max_side, self.verify_face_side, self.num_jitters) < 1:
            raise InputError("max_side, cnn_max_side, verify_face_side and num_jitters must be >= 1.")
        if self.torch_threads < 0:
            raise InputError(f"torch_threads must be >= 0 (0 = torch's setting); got {self.torch_threads}.")
        if self.descriptor not in DESCRIPTORS:
            raise InputError(f"descriptor must be one of {DESCRIPTORS}; got {self.descriptor!r}.")
        if self.detector not in DETECTORS:
            raise InputError(f"detector must be one of {DETECTORS}; got {self.detector!r}.")


class DlibModels(NamedTuple):
    hog: object  # dlib.fhog_object_detector
    cnn: object  # dlib.cnn_face_detection_model_v1
    landmarks: object  # dlib.shape_predictor (68 points)
    five_points: object  # dlib.shape_predictor (5 points)
    recognizer: object  # dlib.face_recognition_model_v1


def kps_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The 5 InstantID keypoints from the 68 iBUG landmarks.

    Eye centre = mean of the eye's 6 contour points; nose tip = point 30; mouth corners =
    points 48 and 54. Left/right are image sides: if the annotation's first eye lies to the
    right of its second (a mirrored or upside-down face), eyes and mouth corners swap together,
    so the 5 points keep a consistent face layout.

    :param landmarks: shape [68, 2], (x, y) pixels.
    :return: shape [5, 2], float32: left eye, right eye, nose tip, left mouth, right mouth.
    """
    first_eye = landmarks[FIRST_EYE].mean(axis=0)  # [2]
    second_eye = landmarks[SECOND_EYE].mean(axis=0)  # [2]
    points = [first_eye, second_eye, landmarks[NOSE_TIP], landmarks[FIRST_MOUTH_CORNER], landmarks[SECOND_MOUTH_CORNER]]
    if first_eye[0] > second_eye[0]:
        points = [points[1], points[0], points[2], points[4], points[3]]
    return np.stack(points).astype(np.float32)  # [5, 2]


def dlib_models_dir() -> Path:
    """The `models/` folder of the installed `face_recognition_models` package."""
    spec = importlib.util.find_spec("face_recognition_models")  # without importing it (pkg_resources warning)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesMissingError(
            "the dlib backend needs the `face_recognition_models` package: pip install face-recognition-models"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    missing = [name for name in DLIB_MODEL_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise ModelFilesMissingError(
            f"{folder} lacks {missing}; reinstall with: pip install --force-reinstall face-recognition-models"
        )
    return folder


@functools.lru_cache(maxsize=None)
def load_dlib_models(folder: str) -> DlibModels:
    """Load dlib's detectors, landmark model and recogniser once per process (read-only models)."""
    import dlib

    path = Path(folder)
    return DlibModels(
        hog=dlib.get_frontal_face_detector(),
        cnn=dlib.cnn_face_detection_model_v1(str(path / DLIB_MODEL_FILES["cnn_detector"])),
        landmarks=dlib.shape_predictor(str(path / DLIB_MODEL_FILES["landmarks"])),
        five_points=dlib.shape_predictor(str(path / DLIB_MODEL_FILES["five_points"])),
        recognizer=dlib.face_recognition_model_v1(str(path / DLIB_MODEL_FILES["recognizer"])),
    )


class DlibFaceAnalyzer(FaceAnalyzer):
    """Face analysis with dlib (HOG + CNN detection, 68 landmarks, 128-d ResNet descriptor)."""

    backend = "dlib"
    embedding_dim = 128

    def __init__(self, config: DlibConfig = DlibConfig()):
        self.config = config
        folder = dlib_models_dir()
        self.models = load_dlib_models(str(folder))
        self.resnet = None  # the torch port of the recognizer, when config.descriptor == "torch"
        if config.descriptor == "torch":
            from .dlib_resnet import load_dlib_resnet  # torch: imported only when used

            self.resnet = load_dlib_resnet(folder / DLIB_MODEL_FILES["recognizer"])
        self.cnn = None  # the torch port of the CNN detector, when config.detector == "torch"
        if config.detector == "torch":
            from .dlib_mmod import load_mmod_detector

            threads = config.torch_threads or None
            self.cnn = load_mmod_detector(folder / DLIB_MODEL_FILES["cnn_detector"], threads=threads)

    # -------------------------------------------------------------------------- locate

    def _locate(self, rgb: np.ndarray) -> list[Detection]:
        small, scale = downscale(rgb, self.config.max_side)
        for upsample in self.config.upsample:
            found = self._hog(small, upsample)
            if found:
                return [Detection(box / scale, score, detector="hog") for box, score in found]
        cnn_image, cnn_scale = downscale(rgb, self.config.cnn_max_side)
        return [Detection(box / cnn_scale, score, detector="cnn") for box, score in self._cnn(cnn_image)]

    def _hog(self, rgb: np.ndarray, upsample: int) -> list[tuple[np.ndarray, float]]:
        """HOG proposals with margin >= 0; weak ones kept only if the CNN confirms them."""
        rects, scores, _ = self.models.hog.run(rgb, upsample, 0.0)
        found = [(rect_to_box(r), float(s)) for r, s in zip(rects, scores)]
        return [(box, s) for box, s in found if s >= self.config.confident_score or self._confirm(rgb, box)]

    def _cnn(self, rgb: np.ndarray, upsample: int = 0) -> list[tuple[np.ndarray, float]]:
        """CNN (MMOD) detections: (box x1, y1, x2, y2, confidence), best first."""
        if self.cnn is not None:
            return [(d.box, d.confidence) for d in self.cnn(rgb, upsample)]
        return [(rect_to_box(d.rect), float(d.confidence)) for d in self.models.cnn(rgb, upsample)]

    def _confirm(self, rgb: np.ndarray, box: np.ndarray) -> bool:
        """Does the CNN detector find a face at `box` on a crop around it (box ± half its width)?"""
        margin = 0.5 * (box[2] - box[0])
        height, width = rgb.shape[:2]
        x0, y0 = int(max(0, box[0] - margin)), int(max(0, box[1] - margin))
        x1, y1 = int(min(width, box[2] + margin)), int(min(height, box[3] + margin))
        factor = self.config.verify_face_side / max(box[2] - box[0], 1.0)
        crop = resize(rgb[y0:y1, x0:x1], factor)  # [h, w, 3]
        origin = np.array([x0, y0, x0, y0], np.float32)
        confirmations = [b / factor + origin for b, _ in self._cnn(crop)]
        return any(iou(box, b) >= self.config.min_overlap for b in confirmations)

    def _attempts(self) -> str:
        c = self.config
        return (
            f"dlib's HOG detector (image downscaled to <= {c.max_side} px, upsampling {list(c.upsample)}), "
            f"then its CNN (MMOD) detector (image downscaled to <= {c.cnn_max_side} px)"
        )

    # -------------------------------------------------------------------------- describe

    def _describe(self, rgb: np.ndarray, detection: Detection) -> Face:
        shape = self._landmarks(rgb, detection)
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], np.float32)  # [68, 2]
        return Face(
            bbox=detection.bbox,
            kps=kps_from_68(landmarks),
            embedding=self._embedding(rgb, shape),
            det_score=detection.score,
            backend=self.backend,
        )

    def _landmarks(self, rgb: np.ndarray, detection: Detection):
        """The 68-point fit (a dlib full_object_detection), on a HOG-style box."""
        box = detection.bbox
        if detection.detector == "cnn":
            five = self.models.five_points(rgb, box_to_rect(box))
            box = hog_style_box(np.array([(p.x, p.y) for p in five.parts()], np.float32))  # [5, 2] -> [4]
        return self.models.landmarks(rgb, box_to_rect(box))

    def _embedding(self, rgb: np.ndarray, shape) -> np.ndarray:
        """dlib's ResNet descriptor of the face aligned by its landmarks: shape [128]."""
        if self.resnet is None:
            descriptor = self.models.recognizer.compute_face_descriptor(rgb, shape, self.config.num_jitters)
            return np.asarray(descriptor, np.float32)
        import dlib

        from .dlib_resnet import face_descriptors

        chip = dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)  # [150, 150, 3]
        chips = dlib.jitter_image(chip, self.config.num_jitters) if self.config.num_jitters > 1 else [chip]
        return face_descriptors(self.resnet, chips, self.config.torch_threads).mean(axis=0)  # [N, 128] -> [128]


# ------------------------------------------------------------------------------ geometry helpers


def hog_style_box(five: np.ndarray) -> np.ndarray:
    """The box dlib's HOG detector would draw around a face, from its 5-point landmarks.

    :param five: shape [5, 2]: two corners of one eye, two of the other, the base of the nose.
    :return: shape [4], float32: x1, y1, x2, y2 (a square).
    """
    eye_a, eye_b, nose = five[0:2].mean(axis=0), five[2:4].mean(axis=0), five[4]  # [2] each
    eyes = (eye_a + eye_b) / 2
    side = max(BOX_PER_EYE_DISTANCE * np.linalg.norm(eye_a - eye_b), BOX_PER_EYES_TO_NOSE * np.linalg.norm(nose - eyes))
    centre = eyes + np.array([0.0, BOX_CENTRE_BELOW_EYES * side])
    return np.concatenate([centre - side / 2, centre + side / 2]).astype(np.float32)


def box_to_rect(box: np.ndarray):
    """A box x1, y1, x2, y2 as a dlib rectangle (right/bottom inclusive)."""
    import dlib

    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return dlib.rectangle(x1, y1, x2 - 1, y2 - 1)


def rect_to_box(rect) -> np.ndarray:
    """A dlib rectangle (inclusive right/bottom) as a float32 box x1, y1, x2, y2."""
    return np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes x1, y1, x2, y2."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def resize(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Scale an [H, W, 3] uint8 image by `factor` (area filter when shrinking)."""
    height, width = rgb.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(rgb), size, interpolation=interpolation)


def downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`rgb` shrunk so its longer side is at most `max_side`, and the factor applied (<= 1)."""
    factor = min(1.0, max_side / max(rgb.shape[:2]))
    if factor == 1.0:
        return np.ascontiguousarray(rgb), 1.0
    small = resize(rgb, factor)
    return small, small.shape[1] / rgb.shape[1]
