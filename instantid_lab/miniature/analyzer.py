"""Face analysis in the miniature world, behind the kit's `FaceAnalyzer` interface.

What antelopev2 does for a photo, two small trained networks do for a cartoon face: the
*conditioning* recogniser gives the identity embedding (64-d, unit norm) and the inspector gives the
5 keypoints. So a notebook written for photos runs unchanged on the miniature:

    analyzer = get_face_analyzer("miniature")
    face = analyzer.get_face(sample.image)   # Face(kps [5, 2], embedding [64])

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

from ..face_analysis.base import Detection, Face, FaceAnalyzer
from .recognizer import embed_images, images_to_tensor


class MiniatureFaceAnalyzer(FaceAnalyzer):
    """Keypoints from the miniature's inspector, embedding from its conditioning recogniser."""

    backend = "miniature"

    def __init__(self, folder: Optional[Path] = None):
        from ..data import MINIATURE_DIR
        from .inspector import load_inspector
        from .train import load_recognizer

        folder = Path(folder) if folder is not None else MINIATURE_DIR
        self.folder = folder
        self.inspector = load_inspector(folder / "inspector.safetensors")
        self.recognizer = _load_conditioner(folder)
        self.size = self.inspector.config.image_size
        self.embedding_dim = self.recognizer.config.embedding_dim

    def _locate(self, pixels: np.ndarray) -> list[Detection]:
        small = Image.fromarray(pixels).resize((self.size, self.size), Image.BOX)
        x = images_to_tensor([small])  # [1, 3, 32, 32]
        with torch.no_grad():
            kps = self.inspector(x)["kps"][0].numpy()  # [5, 2] in 32-px pixels
        kps = kps * np.array([pixels.shape[1], pixels.shape[0]]) / self.size
        # The face box: the keypoints' extent, widened by the typical face-to-keypoint proportions.
        (x1, y1), (x2, y2) = kps.min(0), kps.max(0)
        w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        box = np.array([x1 - 0.6 * w, y1 - 0.9 * h, x2 + 0.6 * w, y2 + 0.8 * h], np.float32)
        return [Detection(box, 1.0, (kps, x))]

    def _describe(self, pixels: np.ndarray, detection: Detection) -> Face:
        kps, x = detection.extra
        embedding = embed_images(self.recognizer, x)[0].numpy()  # [64], unit norm
        return Face(detection.bbox, kps, embedding, detection.score, self.backend)

    def _attempts(self) -> str:
        return "the whole image as one face"


def _load_conditioner(folder: Path):
    from ..errors import ModelFilesMissingError
    from .train import load_recognizer

    path = folder / "recognizer_conditioner.safetensors"
    if not path.exists():
        raise ModelFilesMissingError(f"{path} is missing: run `python -m instantid_lab.miniature.train encoders "
                                     f"--out {folder}` or restore data/miniature from the repository")
    return load_recognizer(path)
