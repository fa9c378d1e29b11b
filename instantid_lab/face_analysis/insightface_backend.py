"""The insightface backend: antelopev2 (SCRFD-10G detector + ArcFace ResNet-100 recogniser),
the face analysis the released InstantID was trained with.

The model files cannot be downloaded automatically any more; users place them by hand in a
folder `antelopev2/` that `find_antelopev2` looks for. Like the reference, the analyzer keeps
insightface's raw 512-d `embedding` (not normalised). Unlike it, when nothing is found at
det_size 640 it retries at 576, 512, ..., 320: tight crops and very large faces are often
found only at a smaller detector input.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..data import DATA_DIR
from ..errors import InputError, ModelFilesMissingError
from ..types import PathLike
from .base import Detection, Face, FaceAnalyzer

logger = logging.getLogger(__name__)

#: Environment variable naming the antelopev2 folder.
ENV_VAR = "INSTANTID_LAB_ANTELOPEV2"
#: The two antelopev2 files this backend needs (the pack's other three models are not used).
ANTELOPEV2_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
#: Where the kit suggests putting them: `models/antelopev2/` at the repository root.
DEFAULT_ANTELOPEV2_DIR = DATA_DIR.parent / "models" / "antelopev2"



REFETCH = (
    f"the files may be truncated or the wrong ones: fetch antelopev2 again and replace {list(ANTELOPEV2_FILES)}."
)


@dataclass(frozen=True)
class InsightFaceConfig:
    """Settings of the insightface backend.

    :param det_size: first detector input size (square, pixels); the reference uses 640.
    :param min_det_size: smallest size tried when nothing is found.
    :param det_size_step: step between tried sizes.
    :param det_thresh: detector score threshold (insightface's default 0.5).
    :param providers: onnxruntime execution providers; None = CUDA if available, else CPU.
    """

    det_size: int = 640
    min_det_size: int = 320
    det_size_step: int = 64
    det_thresh: float = 0.5
    providers: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        if any(v <= 0 or v % 32 for v in (self.det_size, self.min_det_size, self.det_size_step)):
            raise InputError(
                "det_size, min_det_size and det_size_step must be positive multiples of 32 "
                f"(SCRFD's largest stride); got {self.det_size}, {self.min_det_size}, {self.det_size_step}."
            )

    def det_sizes(self) -> tuple[int, ...]:
        """Detector input sizes in the order they are tried: 640, 576, ..., 320."""
        return tuple(range(self.det_size, self.min_det_size - 1, -self.det_size_step)) or (self.det_size,)


def antelopev2_search_path(model_dir: Optional[PathLike] = None) -> list[Path]:
    """Folders searched for antelopev2, in order: `model_dir` alone if given; otherwise the
    environment variable, ./models/antelopev2, the repository's models/antelopev2 and
    ~/.insightface/models/antelopev2."""
    if model_dir is not None:
        return [Path(model_dir).expanduser().resolve()]
    folders = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
    folders += [Path.cwd() / "models" / "antelopev2", DEFAULT_ANTELOPEV2_DIR]
    folders.append(Path.home() / ".insightface" / "models" / "antelopev2")
    return list(dict.fromkeys(f.resolve() for f in folders))


def find_antelopev2(model_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The first folder on `antelopev2_search_path(model_dir)` holding both antelopev2 files
    (or an `antelopev2/` subfolder holding them, as the zip unpacks), else None."""
    for folder in antelopev2_search_path(model_dir):
        for candidate in (folder, folder / "antelopev2"):
            if all((candidate / name).is_file() for name in ANTELOPEV2_FILES):
                return candidate
    return None


def missing_models_message(model_dir: Optional[PathLike] = None) -> str:
    looked = ", ".join(str(f) for f in antelopev2_search_path(model_dir))
    return (
        f"the insightface backend needs the antelopev2 models {list(ANTELOPEV2_FILES)} "
        f"and found them nowhere (looked in: {looked}). The automatic download no longer works: "
        f"get antelopev2 by hand and put both files in {DEFAULT_ANTELOPEV2_DIR}/ "
        f"(or any folder, then set {ENV_VAR}=/path/to/antelopev2 or pass model_dir=). "
        'Without them, get_face_analyzer("dlib") works offline.'
    )


def default_providers() -> tuple[str, ...]:
    """CUDA first if this onnxruntime build has it, then CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    cuda = ("CUDAExecutionProvider",) if "CUDAExecutionProvider" in available else ()
    return cuda + ("CPUExecutionProvider",)


def _files_signature(folder: Path) -> tuple:
    """Names, sizes and modification times of the folder's ONNX files (reload when they change)."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.onnx")))


@functools.lru_cache(maxsize=2)
def load_face_analysis(folder: str, signature: tuple, providers: tuple[str, ...]):
    """insightface's `FaceAnalysis` on a model folder, detection and recognition only.

    Cached per folder, file signature and providers: loading ArcFace R100 takes seconds, and
    the analyzer only reads from it.
    """
    from insightface.app import FaceAnalysis

    try:
        app = FaceAnalysis(name=folder, allowed_modules=["detection", "recognition"], providers=list(providers))
    except AssertionError as e:  # insightface asserts that a detector was found
        raise ModelFilesMissingError(f"no face detector among the ONNX files in {folder}; {REFETCH}") from e
    except Exception as e:  # onnxruntime cannot read a file
        raise ModelFilesMissingError(f"could not load the models in {folder} ({e}); {REFETCH}") from e
    if "recognition" not in app.models:
        raise ModelFilesMissingError(f"no face recogniser among the ONNX files in {folder}; {REFETCH}")
    return app


class InsightFaceAnalyzer(FaceAnalyzer):
    """Face analysis with insightface on antelopev2 (512-d raw ArcFace embeddings)."""

    backend = "insightface"
    embedding_dim = 512

    def __init__(self, model_dir: Optional[PathLike] = None, config: InsightFaceConfig = InsightFaceConfig()):
        folder = find_antelopev2(model_dir)
        if folder is None:
            raise ModelFilesMissingError(missing_models_message(model_dir))
        self.config = config
        self.model_dir = folder
        providers = tuple(config.providers or default_providers())
        app = load_face_analysis(str(folder), _files_signature(folder), providers)
        self.detector = app.det_model  # insightface SCRFD
        if not getattr(self.detector, "use_kps", True):
            raise ModelFilesMissingError(
                f"the detector in {folder} gives no keypoints; InstantID needs SCRFD with keypoints "
                f"({ANTELOPEV2_FILES[0]})."
            )
        self.recognizer = app.models["recognition"]  # insightface ArcFaceONNX
        width = self.recognizer.output_shape[-1]  # 512 for glintr100
        self.embedding_dim = width if isinstance(width, int) else type(self).embedding_dim

    def _det_sizes(self) -> tuple[int, ...]:
        fixed = getattr(self.detector, "static_input_size", None)  # an ONNX export with a fixed input
        return (int(fixed[0]),) if fixed else self.config.det_sizes()

    def _prepare(self, rgb: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rgb[:, :, ::-1])  # [H, W, 3] BGR, as insightface expects

    def _locate(self, bgr: np.ndarray) -> list[Detection]:
        for size in self._det_sizes():
            boxes, kpss = self.detector.detect(bgr, input_size=(size, size), det_thresh=self.config.det_thresh)
            if len(boxes):  # boxes: [N, 5] x1, y1, x2, y2, score; kpss: [N, 5, 2]
                logger.info("insightface: %d face(s) at det_size %d", len(boxes), size)
                return [Detection(b[:4], float(b[4]), kps=k) for b, k in zip(boxes, kpss)]
            logger.info("insightface: no face at det_size %d", size)
        return []

    def _describe(self, bgr: np.ndarray, detection: Detection) -> Face:
        embedding = self._embedding(bgr, detection)
        return Face(detection.bbox, detection.kps, embedding, detection.score, self.backend)

    def _embedding(self, bgr: np.ndarray, detection: Detection) -> np.ndarray:
        """ArcFace on the face aligned by its 5 keypoints (112 x 112 crop): shape [512], raw."""
        from insightface.app.common import Face as InsightFace

        found = InsightFace(bbox=detection.bbox, kps=detection.kps, det_score=detection.score)
        with warnings.catch_warnings():  # insightface's alignment calls a deprecated scikit-image method
            warnings.filterwarnings("ignore", message=".*estimate.* is deprecated", category=FutureWarning)
            return self.recognizer.get(bgr, found)

    def _attempts(self) -> str:
        return f"insightface SCRFD from {self.model_dir} at det_size {list(self._det_sizes())}"
