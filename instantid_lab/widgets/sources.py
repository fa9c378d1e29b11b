"""Where the playground's references, keypoints, targets and scores come from, per world.

A source answers what `Studio` asks, for a tuple of reference keys:

- `keys`, `label(key)`, `image(key)`: the references to choose from, and their pictures;
- `embeddings(keys)`: their identity embeddings, [N, D] (the pipeline averages several);
- `size(keys)`, `base_kps(keys)`, `pose_center(keys)`: the output size, the keypoints the pose editor
  starts from and the point it turns about;
- `target(request)`: the world's own drawing of what was asked (None where there is none);
- `score(images, request, kps, target)`: one `Readout` per image.

`MiniatureReferences`: held-out miniature identities (never seen in training); the pose editor starts
from the identity's frontal, centred pose; the target is the identity drawn by the world with the
requested caption and pose; the judges are the evaluating recogniser and the inspector
(`experiments.metrics.MiniatureScorer`). `PhotoReferences`: bundled photos or uploads; the pose
editor starts from the photo's own keypoints; no target; the judge a face analyzer that did not
condition (`PhotoScorer`).
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..errors import InputError
from ..experiments.metrics import MiniatureScorer, PhotoScorer, Request
from ..images import load_image
from ..miniature.evaluate import HeldoutTask
from ..miniature.world import Pose, render_id
from .studio import GenerationRequest, PoseEdit, Readout


def miniature_pose(edit: PoseEdit, size: int) -> Pose:
    """The miniature renderer's `Pose` that draws the face where `edit` moves the frontal keypoints
    (before mirroring): the renderer rolls clockwise, so its roll is minus the editor's."""
    frontal = Pose()
    return Pose(cx=frontal.cx + edit.dx / size, cy=frontal.cy + edit.dy / size, scale=frontal.scale * edit.scale,
                roll=-edit.roll, yaw=edit.yaw)


class MiniatureReferences:
    """Held-out identities of the miniature as references.

    :param world: the miniature `World` (its analyzer gives the identity embedding, as antelopev2 would).
    :param scorer: a `MiniatureScorer` (default: a new one on the shipped weights).
    :param identities: how many held-out identities to offer; `seed` draws their reference renders
        (a random pose and caption each, as `HeldoutTask`).
    """

    captioned = True
    keypoint_unit = "px"

    def __init__(self, world, scorer: Optional[MiniatureScorer] = None, identities: int = 12, seed: int = 0):
        task = HeldoutTask.make(identities, seed)
        self.world, self.scorer = world, scorer or MiniatureScorer()
        self.keys = list(task.ids)
        self._references = dict(zip(task.ids, task.references))
        self._embeddings: dict = {}

    def label(self, key) -> str:
        return f"held-out #{self.keys.index(key) + 1} (id {key})"

    def image(self, key) -> Image.Image:
        return self._references[key].image

    def embeddings(self, keys: Sequence) -> np.ndarray:
        """[N, D]: the conditioning recogniser's embedding of each reference render."""
        for key in keys:
            if key not in self._embeddings:
                self._embeddings[key] = self.world.analyzer.get_face(self.image(key)).embedding
        return np.stack([self._embeddings[k] for k in keys])

    def size(self, keys: Sequence = ()) -> tuple[int, int]:
        return self.world.output_size(self.image(self.keys[0]).size)

    def base_kps(self, keys: Sequence) -> np.ndarray:
        """The first identity's keypoints in its frontal, centred pose, [5, 2] in output pixels."""
        width, _ = self.size(keys)
        return render_id(int(keys[0]), Pose(), size=width).kps

    def pose_center(self, keys: Sequence) -> tuple[float, float]:
        """The face centre the renderer scales and rolls about, in output pixels."""
        width, height = self.size(keys)
        return Pose().cx * width, Pose().cy * height

    def target(self, request: GenerationRequest) -> Image.Image:
        """The first identity drawn by the world with the requested caption and pose: a perfect answer."""
        width, _ = self.size(request.references)
        drawn = render_id(int(request.references[0]), miniature_pose(request.pose, width), request.caption, width)
        return ImageOps.mirror(drawn.image) if request.pose.mirror else drawn.image

    def score(self, images: Sequence[Image.Image], request: GenerationRequest, kps: np.ndarray,
              target: Optional[Image.Image] = None) -> list[Readout]:
        """One readout per image, from one scorer call (each image against each reference's identity)."""
        keys = list(request.references)
        judged = list(images) + ([target] if target is not None else [])
        rows = [Request(identity=k, kps=kps, prompt=request.prompt, caption=request.caption)
                for _ in judged for k in keys]
        table = self.scorer.score([im for im in judged for _ in keys], rows)
        similarity = table["identity_similarity"].to_numpy().reshape(len(judged), len(keys))  # [images, N]
        captions = table.filter(like="caption_").drop(columns="caption_all").to_numpy(float).mean(1)
        target_similarity = float(similarity[-1].mean()) if target is not None else math.nan
        return [Readout(float(similarity[i].mean()), tuple(float(s) for s in similarity[i]),
                        float(table["keypoint_error"].iloc[i * len(keys)]), self.keypoint_unit,
                        float(captions[i * len(keys)]), target_similarity) for i in range(len(images))]


class PhotoReferences:
    """Photos as references (bundled ones, or uploaded bytes), for worlds that generate photos.

    :param world: a photo `World` ("sdxl"; "tiny" runs the same code on random weights).
    :param photos: `data.Photo` records (default: every bundled single-person photo).
    :param scoring_analyzer: the face analyzer that judges identity (default: `PhotoScorer`'s, dlib).
    """

    captioned = False
    keypoint_unit = "inter-ocular distances"

    def __init__(self, world, photos: Optional[Sequence] = None, scoring_analyzer=None):
        if photos is None:
            from ..data import face_photos

            photos = [p for p in face_photos() if p.identity is not None]
        self.world, self.scoring_analyzer = world, scoring_analyzer
        self._images = {p.file: p.path for p in photos}          # key -> path, or a PIL image (uploads)
        self.keys = list(self._images)
        self._loaded: dict = {}    # key -> PIL image
        self._faces: dict = {}
        self._scorers: dict = {}

    def add(self, name: str, data: bytes) -> str:
        """Add an uploaded image (its file bytes); returns its key."""
        key = f"upload: {name}"
        self._images[key] = load_image(Image.open(io.BytesIO(data)))
        self.keys.append(key)
        return key

    def label(self, key) -> str:
        return str(key)

    def image(self, key) -> Image.Image:
        if key not in self._images:
            raise InputError(f"unknown reference {key!r}; choose one of {self.keys}")
        if key not in self._loaded:
            self._loaded[key] = load_image(self._images[key])
        return self._loaded[key]

    def face(self, key):
        """The largest face of the reference (the world's analyzer), cached."""
        if key not in self._faces:
            self._faces[key] = self.world.analyzer.get_face(self.image(key))
        return self._faces[key]

    def embeddings(self, keys: Sequence) -> np.ndarray:
        return np.stack([self.face(k).embedding for k in keys])          # [N, D]

    def size(self, keys: Sequence) -> tuple[int, int]:
        return self.world.output_size(self.image(keys[0]).size)

    def base_kps(self, keys: Sequence) -> np.ndarray:
        """The first photo's own keypoints at the output size (InstantID's default pose)."""
        kps, _ = self.world.reference_keypoint_image(self.face(keys[0]), self.image(keys[0]).size)
        return kps

    def pose_center(self, keys: Sequence) -> None:
        return None  # the keypoints' centroid

    def target(self, request: GenerationRequest) -> None:
        return None

    def score(self, images: Sequence[Image.Image], request: GenerationRequest, kps: np.ndarray,
              target=None) -> list[Readout]:
        keys = tuple(request.references)
        if keys not in self._scorers:
            self._scorers[keys] = PhotoScorer({k: [self.image(k)] for k in keys}, analyzer=self.scoring_analyzer)
        table = self._scorers[keys].score([im for im in images for _ in keys],
                                          [Request(identity=k, kps=kps) for _ in images for k in keys])
        similarity = table["identity_similarity"].to_numpy(float).reshape(len(images), len(keys))
        return [Readout(float(np.nanmean(s)) if np.isfinite(s).any() else math.nan, tuple(float(v) for v in s),
                        float(table["keypoint_error"].iloc[i * len(keys)]), self.keypoint_unit)
                for i, s in enumerate(similarity)]
