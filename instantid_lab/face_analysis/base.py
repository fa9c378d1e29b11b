"""The `Face` record and the `FaceAnalyzer` interface every backend implements.

A backend does two things: `_locate` finds face boxes (cheap), `_describe` turns one box into
a `Face` with 5 keypoints and an identity embedding (costly). `get_face` describes only the
largest box, `detect` describes them all. Both work on `_prepare(rgb)`, the image in the
layout the backend's models read (dlib: RGB; insightface: BGR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import NoFaceError
from ..images import ImageLike, to_array


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    :param bbox: shape [4], float32: x1, y1, x2, y2 in image pixels.
    :param kps: shape [5, 2], float32: left eye, right eye, nose tip, left mouth corner,
        right mouth corner ("left" = image left), (x, y) in image pixels.
    :param embedding: shape [D], float32, raw (insightface: 512-d, not normalised; dlib: 128-d).
    :param det_score: detector confidence (its scale depends on the backend and detector).
    :param backend: "insightface" or "dlib".
    """

    bbox: np.ndarray
    kps: np.ndarray
    embedding: np.ndarray
    det_score: float
    backend: str

    def __post_init__(self):
        object.__setattr__(self, "bbox", np.asarray(self.bbox, np.float32).reshape(4))
        object.__setattr__(self, "kps", np.asarray(self.kps, np.float32).reshape(5, 2))
        object.__setattr__(self, "embedding", np.asarray(self.embedding, np.float32).reshape(-1))
        object.__setattr__(self, "det_score", float(self.det_score))

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding divided by its L2 norm, shape [D]."""
        return self.embedding / max(float(np.linalg.norm(self.embedding)), 1e-12)

    @property
    def area(self) -> float:
        """Area of the bounding box in square pixels."""
        return box_area(self.bbox)

    def __repr__(self) -> str:
        x1, y1, x2, y2 = (round(float(v), 1) for v in self.bbox)
        return (
            f"Face(backend={self.backend!r}, bbox=({x1}, {y1}, {x2}, {y2}), "
            f"det_score={self.det_score:.3f}, embedding_dim={self.embedding.shape[0]})"
        )


@dataclass(frozen=True, eq=False)
class Detection:
    """A located face before description.

    :param bbox: shape [4]: x1, y1, x2, y2 in image pixels.
    :param score: the detector's confidence.
    :param kps: shape [5, 2], when the detector also finds the 5 keypoints (insightface's SCRFD,
        the miniature's inspector); None when they come later from a landmark fit (dlib).
    :param detector: which detector found it, when a backend has several (dlib: "hog" or "cnn").
    """

    bbox: np.ndarray
    score: float
    kps: Optional[np.ndarray] = None
    detector: str = ""


def box_area(bbox) -> float:
    """Area of a box x1, y1, x2, y2 (0 for an empty box)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceAnalyzer:
    """Finds faces and describes them with 5 keypoints and an identity embedding.

    `image` arguments accept anything `images.load_image` accepts: a path, a PIL image or a
    numpy array (RGB, channels last).
    """

    backend: str = ""
    embedding_dim: int = 0

    def detect(self, image: ImageLike) -> list[Face]:
        """All faces in `image`, largest bounding box first; [] if there is none."""
        pixels = self._prepare(to_array(image))  # [H, W, 3] uint8
        faces = [self._describe(pixels, d) for d in self._locate(pixels)]
        return sorted(faces, key=lambda face: -face.area)

    def get_face(self, image: ImageLike) -> Face:
        """The largest face in `image` (by bounding-box area), as InstantID uses it.

        :raises NoFaceError: no face was found; the message says what was tried.
        """
        pixels = self._prepare(to_array(image))  # [H, W, 3] uint8
        detections = self._locate(pixels)
        if not detections:
            height, width = pixels.shape[:2]
            raise NoFaceError(
                f"no face found in the {width}x{height} image by the {self.backend} backend; "
                f"tried {self._attempts()}. Use a photo where the face is clearly visible, "
                "roughly frontal and at least ~80 px wide (crop or upscale a distant face)."
            )
        return self._describe(pixels, max(detections, key=lambda d: box_area(d.bbox)))

    def embed(self, image: ImageLike) -> np.ndarray:
        """The identity embedding of the largest face in `image`, shape [embedding_dim]."""
        return self.get_face(image).embedding

    def _prepare(self, rgb: np.ndarray) -> np.ndarray:
        """The image as the backend's models read it. :param rgb: shape [H, W, 3], uint8, RGB."""
        return np.ascontiguousarray(rgb)

    def _locate(self, pixels: np.ndarray) -> list[Detection]:
        """Boxes of all faces. :param pixels: `_prepare`'s output, shape [H, W, 3], uint8."""
        raise NotImplementedError

    def _describe(self, pixels: np.ndarray, detection: Detection) -> Face:
        """Keypoints and embedding of one located face. :param pixels: as for `_locate`."""
        raise NotImplementedError

    def _attempts(self) -> str:
        """What `_locate` tries, in words, for the `NoFaceError` message."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, embedding_dim={self.embedding_dim})"
