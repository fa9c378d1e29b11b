"""Metrics: does a generated image keep the identity, follow the keypoints, follow the prompt?

Every scorer returns a tidy `pandas.DataFrame`, one row per image, and says which model scored
(column `scored_by`): identity is never judged by the encoder that conditioned generation.

- identity: cosine similarity of the generated face's embedding to the wanted identity's gallery
  (mean embedding of its reference images), and rank-1 (the nearest gallery identity is the wanted one);
- face detected: whether the scoring face analyzer finds a face (photos; the miniature draws one face
  by construction, so the column is empty there);
- keypoint error: detected vs requested keypoints, mean distance over the 5 points; in pixels in the
  miniature, divided by the requested inter-ocular distance for photos;
- prompt adherence: the inspector's reading of the caption in the miniature (per attribute and all
  four), the CLIP score (torchmetrics) for photos when CLIP weights are on disk.

    scorer = MiniatureScorer()                      # evaluator recogniser + inspector
    table = scorer.score(images, [Request(identity=i, kps=k, prompt=p, caption=c), ...])
    table[["identity_similarity", "rank1", "keypoint_error", "caption_all"]].mean()

Scoring is batched: one recogniser call and one inspector call for all images (miniature); photos go
through the face analyzer one by one (detection is per image) and through CLIP in one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from ..data import MINIATURE_DIR
from ..errors import InputError
from ..face_analysis import FaceAnalyzer, get_face_analyzer
from ..images import ImageLike, load_image
from ..miniature.evaluate import identity_scores, keypoint_distances
from ..miniature.inspector import ATTRIBUTES, inspect, load_inspector
from ..miniature.recognizer import embed_images, load_recognizer
from ..miniature.world import Caption, Pose, images_to_tensor, render_id
from ..types import PathLike


@dataclass(frozen=True)
class Request:
    """What one generated image was asked to show.

    :param identity: the wanted identity's label: a miniature identity id, or a key of `PhotoScorer`'s gallery.
    :param kps: the requested keypoints [5, 2] in pixels of the generated image (None: not scored).
    :param prompt: the prompt it was generated with.
    :param caption: the miniature caption behind the prompt (scored by the inspector), or None.
    """

    identity: Any
    kps: Optional[np.ndarray] = None
    prompt: str = ""
    caption: Optional[Caption] = None


def gallery_scores(embeddings: torch.Tensor, gallery: torch.Tensor, wanted: Sequence[int]) -> pd.DataFrame:
    """`evaluate.identity_scores` as a table: identity_similarity and rank1 per image."""
    similarity, hits = identity_scores(embeddings, gallery, wanted)
    return pd.DataFrame({"identity_similarity": similarity.numpy(), "rank1": hits.numpy()})


def _gallery_rows(requests: Sequence[Request], gallery_ids: Optional[Sequence]) -> tuple[list, list[int]]:
    ids = list(dict.fromkeys(r.identity for r in requests)) if gallery_ids is None else list(gallery_ids)
    missing = sorted({str(r.identity) for r in requests} - {str(i) for i in ids})
    if missing:
        raise InputError(f"requested identities {missing} are not in the gallery {ids}; add them to gallery_ids")
    return ids, [ids.index(r.identity) for r in requests]


class MiniatureScorer:
    """Scores miniature images with the *evaluating* recogniser (not the conditioner) and the inspector.

    :param folder: the miniature's weights (default: the shipped `data/miniature`).
    :param gallery_renders: renders per identity (random pose and caption) averaged into its gallery row.
    """

    scored_by = "miniature evaluator recogniser + inspector"

    def __init__(self, folder: Optional[PathLike] = None, gallery_renders: int = 3, seed: int = 0):
        folder = Path(folder) if folder is not None else MINIATURE_DIR
        self.evaluator = load_recognizer(folder / "recognizer_evaluator.safetensors")
        self.inspector = load_inspector(folder / "inspector.safetensors")
        self.gallery_renders, self.seed, self._gallery = gallery_renders, seed, {}

    def gallery(self, ids: Sequence[int]) -> torch.Tensor:
        """Mean evaluator embedding of `gallery_renders` renders per identity id: [K, E] (cached per id)."""
        for i in ids:
            if i not in self._gallery:
                rng = np.random.default_rng([self.seed, int(i)])
                renders = [render_id(int(i), Pose.sample(rng), Caption.sample(rng)).image
                           for _ in range(self.gallery_renders)]
                self._gallery[i] = embed_images(self.evaluator, images_to_tensor(renders)).mean(0)
        return torch.stack([self._gallery[i] for i in ids])

    def score(self, images: Sequence[ImageLike], requests: Sequence[Request],
              gallery_ids: Optional[Sequence[int]] = None) -> pd.DataFrame:
        """One row per image: identity_similarity, rank1, face_detected (empty), keypoint_error (px),
        caption_<attribute> and caption_all (when the request has a caption), scored_by.

        :param gallery_ids: the identities rank-1 chooses among (default: those requested).
        """
        _check_lengths(images, requests)
        x = images_to_tensor([load_image(im) for im in images])
        ids, wanted = _gallery_rows(requests, gallery_ids)
        table = gallery_scores(embed_images(self.evaluator, x), self.gallery(ids), wanted)
        table.insert(0, "identity", [r.identity for r in requests])
        table["face_detected"] = np.nan
        read = inspect(self.inspector, x)
        table["keypoint_error"] = _keypoint_errors(read["kps"], requests)
        table = pd.concat([table, caption_hits(read, requests)], axis=1)
        return table.assign(scored_by=self.scored_by, chance_rank1=1 / len(ids))


def _keypoint_errors(read_kps: torch.Tensor, requests: Sequence[Request]) -> np.ndarray:
    """Per image, the mean pixel distance between the read and the requested keypoints (NaN if none requested)."""
    out = np.full(len(requests), np.nan)
    asked = [k for k, r in enumerate(requests) if r.kps is not None]
    if asked:
        wanted = torch.from_numpy(np.stack([np.asarray(requests[k].kps, np.float32) for k in asked]))
        out[asked] = keypoint_distances(read_kps[asked], wanted).numpy()
    return out


def caption_hits(read: dict, requests: Sequence[Request]) -> pd.DataFrame:
    """Per image and attribute, whether the inspector read the requested value; `caption_all`: all four."""
    columns = {}
    for name in ATTRIBUTES:
        columns[f"caption_{name}"] = [np.nan if r.caption is None else float(v == getattr(r.caption, name))
                                      for v, r in zip(read[name], requests)]
    table = pd.DataFrame(columns)
    table["caption_all"] = table.prod(axis=1, skipna=False)
    return table


class PhotoScorer:
    """Scores photos with a face analyzer that did not condition generation, plus CLIP when available.

    :param references: identity label -> its reference photos (their mean embedding is the gallery row).
    :param analyzer: the scoring face analyzer; default dlib (offline), the right choice when antelopev2
        conditioned generation.
    :param clip_dir: a local CLIP model folder (transformers layout) for the CLIP score; None or missing:
        the CLIP column stays empty and `clip_message` says why.
    """

    def __init__(self, references: dict, analyzer: Optional[FaceAnalyzer] = None, clip_dir: Optional[PathLike] = None):
        self.analyzer = analyzer or get_face_analyzer("dlib")
        self.scored_by = f"{self.analyzer.backend} face analyzer"
        self.labels = list(references)
        rows = [np.mean([self.analyzer.embed(p) for p in photos], axis=0) for photos in references.values()]
        self.gallery = torch.from_numpy(np.stack(rows)).float()  # [K, E]
        self.clip, self.clip_message = _clip_score(clip_dir)

    def score(self, images: Sequence[ImageLike], requests: Sequence[Request]) -> pd.DataFrame:
        """One row per image: identity, face_detected, identity_similarity, rank1 and keypoint_error
        (divided by the requested inter-ocular distance; NaN where no face is found), clip_score, scored_by."""
        _check_lengths(images, requests)
        faces = [_largest(self.analyzer.detect(im)) for im in images]
        rows = [self._face_row(face, r) for face, r in zip(faces, requests)]
        table = pd.DataFrame(rows)
        table["clip_score"] = self._clip(images, requests)
        return table.assign(scored_by=self.scored_by, chance_rank1=1 / len(self.labels))

    def _face_row(self, face, request: Request) -> dict:
        row = {"identity": request.identity, "face_detected": face is not None, "identity_similarity": np.nan,
               "rank1": np.nan, "keypoint_error": np.nan}
        if face is None:
            return row
        scores = gallery_scores(torch.from_numpy(face.embedding)[None].float(), self.gallery,
                                [self.labels.index(request.identity)])
        row.update(identity_similarity=float(scores.identity_similarity[0]), rank1=bool(scores.rank1[0]))
        if request.kps is not None:
            row["keypoint_error"] = normalised_keypoint_error(face.kps, request.kps)
        return row

    def _clip(self, images, requests) -> np.ndarray:
        if self.clip is None:
            return np.full(len(images), np.nan)
        pixels = [torch.from_numpy(np.asarray(load_image(im))).permute(2, 0, 1) for im in images]  # [3, H, W] uint8
        with torch.no_grad():
            return np.array([float(self.clip(p, r.prompt)) for p, r in zip(pixels, requests)])


def normalised_keypoint_error(detected: np.ndarray, requested: np.ndarray) -> float:
    """Mean distance between detected and requested keypoints [5, 2], over the requested inter-ocular distance."""
    requested = np.asarray(requested, np.float64)
    eyes = max(float(np.linalg.norm(requested[0] - requested[1])), 1e-6)
    return float(np.linalg.norm(np.asarray(detected) - requested, axis=-1).mean() / eyes)


def _largest(faces: list):
    return faces[0] if faces else None  # `detect` sorts the largest face first


def _clip_score(clip_dir: Optional[PathLike]):
    """(torchmetrics `CLIPScore` on local weights, "") or (None, why not)."""
    if clip_dir is None or not (Path(clip_dir) / "config.json").is_file():
        return None, (f"CLIP score skipped: no CLIP model folder at {clip_dir} (pass clip_dir= a local "
                      "transformers CLIP folder, e.g. openai/clip-vit-large-patch14 downloaded by hand)")
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=str(clip_dir)), ""


def _check_lengths(images: Sequence, requests: Sequence) -> None:
    if len(images) != len(requests) or not len(images):
        raise InputError(f"give one Request per image: got {len(images)} images and {len(requests)} requests")


def summary(table: pd.DataFrame, by: Sequence[str], columns: Sequence[str] = ("identity_similarity", "rank1")) -> pd.DataFrame:
    """Mean and standard error of `columns` per group of `by` (a tidy table for plots with error bars)."""
    values = table[list(by)].join(table[list(columns)].astype(float))
    out = values.groupby(list(by)).agg(["mean", "sem", "count"])
    out.columns = [f"{c}_{stat}" for c, stat in out.columns]
    return out.reset_index()
