"""Face analysis in the miniature world, behind the kit's `FaceAnalyzer` interface.

What antelopev2 does for a photo, two small trained networks do for a cartoon face: the
*conditioning* recogniser gives the identity embedding (64-d, unit norm) and the inspector gives the
5 keypoints. So a notebook written for photos runs unchanged on the miniature:

    analyzer = get_face_analyzer("miniature")
    face = analyzer.get_face(sample.image)   # Face(kps [5, 2], embedding [64])

The core finds this backend by name (`face_analysis.registry`: it is declared as an entry point and
registers itself on import); it never imports the miniature.

The miniature's images hold one face that fills most of the frame, so the "detector" accepts any
image and reports the box around the keypoints; images of another size are box-resized to 32 px for
the networks and the keypoints scaled back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..data import MINIATURE_DIR
from ..errors import InputError
from ..face_analysis.base import Detection, Face, FaceAnalyzer
from ..face_analysis.registry import register_backend
from ..types import PathLike
from .inspector import load_inspector
from .recognizer import embed_images, load_recognizer
from .world import images_to_tensor


class MiniatureFaceAnalyzer(FaceAnalyzer):
    """Keypoints from the miniature's inspector, embedding from its conditioning recogniser."""

    backend = "miniature"
    #: below this `face_score` the image is taken to hold no face (a blank or flat image scores 0)
    min_score = 0.1

    def __init__(self, folder: Optional[PathLike] = None):
        self.folder = Path(folder) if folder is not None else MINIATURE_DIR
        self.inspector = load_inspector(self.folder / "inspector.safetensors")
        self.recognizer = load_recognizer(self.folder / "recognizer_conditioner.safetensors")
        self.size = self.inspector.config.image_size
        self.embedding_dim = self.recognizer.config.embedding_dim

    def _network_input(self, pixels: np.ndarray) -> torch.Tensor:
        """The image box-resized to the networks' size: [1, 3, 32, 32] in [-1, 1]."""
        return images_to_tensor([Image.fromarray(pixels).resize((self.size, self.size), Image.BOX)])

    def _locate(self, pixels: np.ndarray) -> list[Detection]:
        with torch.no_grad():
            kps = self.inspector(self._network_input(pixels))["kps"][0].numpy()  # [5, 2] in 32-px pixels
        kps = kps * np.array([pixels.shape[1], pixels.shape[0]]) / self.size
        # The face box: the keypoints' extent, widened by the typical face-to-keypoint proportions.
        (x1, y1), (x2, y2) = kps.min(0), kps.max(0)
        w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        box = np.array([x1 - 0.6 * w, y1 - 0.9 * h, x2 + 0.6 * w, y2 + 0.8 * h], np.float32)
        score = face_score(pixels, box)
        return [Detection(box, score, kps=kps)] if score >= self.min_score else []

    def _describe(self, pixels: np.ndarray, detection: Detection) -> Face:
        embedding = embed_images(self.recognizer, self._network_input(pixels))[0].numpy()  # [64], unit norm
        return Face(detection.bbox, detection.kps, embedding, detection.score, self.backend)

    def _attempts(self) -> str:
        return f"the whole image as one face (face score >= {self.min_score}: pixels in the face box unlike the border)"


def face_score(pixels: np.ndarray, box: np.ndarray, tolerance: float = 20.0) -> float:
    """The miniature's detection score: the fraction of pixels in the face box whose colour differs from
    the background's (the median colour of the image border) by more than `tolerance` (mean over RGB).

    A flat or blank image scores 0; a rendered or generated face fills most of its box and scores high.
    :param pixels: [H, W, 3] uint8; :param box: x1, y1, x2, y2 in pixels.
    """
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)  # [P, 3]
    background = np.median(border, axis=0)
    h, w = pixels.shape[:2]
    x1, y1 = int(np.clip(box[0], 0, w - 1)), int(np.clip(box[1], 0, h - 1))
    x2, y2 = int(np.clip(np.ceil(box[2]), x1 + 1, w)), int(np.clip(np.ceil(box[3]), y1 + 1, h))
    inside = pixels[y1:y2, x1:x2].astype(np.float32)  # [h', w', 3]
    return float((np.abs(inside - background).mean(-1) > tolerance).mean())


def miniature_analyzer(model_dir: Optional[PathLike] = None, **options) -> MiniatureFaceAnalyzer:
    """The backend factory (`get_face_analyzer("miniature", model_dir)`): the miniature's folder, no options.

    :raises InputError: options were given.
    :raises ModelFilesMissingError: the inspector or the conditioning recogniser is missing.
    """
    if options:
        raise InputError(f"the miniature backend takes no options, got {sorted(options)}.")
    return MiniatureFaceAnalyzer(model_dir)


register_backend("miniature", miniature_analyzer)
