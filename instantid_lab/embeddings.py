"""Comparing and averaging identity embeddings (face-recognition vectors).

Inputs may be numpy arrays, torch tensors or lists of either; **outputs are numpy**:
embeddings come back as float32 (the dtype face analysis returns), scores as float64.
A set of N embeddings has shape [N, D].

Two metrics, because encoders differ in how their scores are read:

- "cosine" (higher = more similar): insightface/ArcFace embeddings; the cosine between two
  photos of one person is typically above ~0.4, between different people near 0.
- "euclidean" (a *distance*, lower = more similar): dlib's 128-d descriptors, trained so that
  a distance below 0.6 means the same person. Raw cosines between dlib descriptors are all
  high (about 0.85 to 0.97), so a cosine of 0.9 means little there.

`pair_ranking_accuracy` compares encoders on the same photos without choosing a threshold.
`color_histogram_feature` is a deliberately generic image feature for contrast: it groups
photos by colour and lighting, not by person. `photo_variants` and `variant_scores` measure
how much an edit of the photo (mirror, crop, blur, low resolution) moves its embedding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .errors import InputError, NoFaceError
from .images import ImageLike, load_image

#: Metrics understood here; "euclidean" is a distance (lower = more similar).
METRICS = ("cosine", "euclidean")
#: Modes of `mean_embedding`.
MEAN_MODES = ("mean", "norm_mean")
#: dlib's documented threshold: descriptors closer than this (Euclidean) are the same person.
DLIB_SAME_PERSON_DISTANCE = 0.6
_EPS = 1e-12


class PairScores(NamedTuple):
    """Scores of all unordered pairs (i < j), split by whether both photos show the same person."""

    same: np.ndarray  # [S]
    different: np.ndarray  # [P - S]
    metric: str


def metric_for(backend: str) -> str:
    """The metric an encoder's embeddings are meant to be compared with: "euclidean" for dlib,
    "cosine" for everything else (insightface)."""
    return "euclidean" if backend == "dlib" else "cosine"


def higher_is_more_similar(metric: str) -> bool:
    """True for similarities (cosine), False for distances (euclidean)."""
    _check_metric(metric)
    return metric == "cosine"


# ----------------------------------------------------------------------------- conversion


def to_numpy(x) -> np.ndarray:
    """A numpy float array from a numpy array, a torch tensor (any device) or a list of either."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    elif isinstance(x, (list, tuple)):
        x = np.stack([to_numpy(v) for v in x]) if len(x) else np.zeros((0, 0))
    array = np.asarray(x)
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"expected numbers (embeddings), got an array of dtype {array.dtype}")
    return array.astype(np.float64)


def as_embeddings(embs) -> np.ndarray:
    """Validate a set of embeddings: shape [N, D] (a single [D] vector becomes [1, D]), finite.

    :raises InputError: wrong number of dimensions, empty, or NaN/inf values.
    """
    array = to_numpy(embs)
    if array.ndim == 1:
        array = array[None, :]  # [1, D]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"embeddings must have shape [N, D] or [D] with N, D > 0; got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InputError("embeddings contain NaN or infinite values.")
    return array


def l2_normalize(x, axis: int = -1) -> np.ndarray:
    """x / ||x|| along `axis`; a zero vector stays zero."""
    x = to_numpy(x)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), _EPS)


# ----------------------------------------------------------------------------- similarity


def cosine_similarity(a, b):
    """cos(a, b) = a . b / (||a|| ||b||), along the last axis with numpy broadcasting.

    :param a: shape [..., D].
    :param b: shape [..., D].
    :return: a float for two vectors, else an array of the broadcast shape [...].
        The cosine with a zero vector is 0.
    """
    a, b = to_numpy(a), to_numpy(b)
    if a.shape[-1] != b.shape[-1]:
        raise InputError(f"embedding sizes differ: {a.shape[-1]} vs {b.shape[-1]}")
    cos = (l2_normalize(a) * l2_normalize(b)).sum(axis=-1)
    return float(cos) if np.ndim(cos) == 0 else cos


def similarity_matrix(embs, metric: str = "cosine") -> np.ndarray:
    """All pairwise scores of N embeddings.

    :param embs: shape [N, D].
    :param metric: "cosine" (similarity) or "euclidean" (distance ||e_i - e_j||).
    :return: shape [N, N], symmetric; diagonal 1 (cosine) or 0 (euclidean).
    """
    _check_metric(metric)
    e = as_embeddings(embs)
    if metric == "cosine":
        unit = l2_normalize(e)
        return np.clip(unit @ unit.T, -1.0, 1.0)  # [N, N]
    squared = (e**2).sum(axis=1)
    gram = e @ e.T  # [N, N]
    return np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0))


def nearest(query, embs, k: int = 5, metric: str = "cosine") -> list[tuple[int, float]]:
    """The k embeddings of `embs` most similar to `query`, best first.

    :param query: shape [D].
    :param embs: shape [N, D].
    :return: up to k pairs (index into embs, score).
    """
    scores = similarity_matrix(np.vstack([as_embeddings(query), as_embeddings(embs)]), metric)[0, 1:]
    order = np.argsort(-scores if higher_is_more_similar(metric) else scores, kind="stable")
    return [(int(i), float(scores[i])) for i in order[:k]]


# ----------------------------------------------------------------------------- averaging


def mean_embedding(embs, mode: str = "mean", target_norm: Optional[float] = None) -> np.ndarray:
    """Combine the embeddings of several reference photos of one person into one.

    - "mean": the plain average (1/N) sum_i e_i, as the paper does. Photos whose embedding
      has a larger norm weigh more, and disagreeing directions shrink the norm.
    - "norm_mean": each e_i is first scaled to unit length, so every photo counts equally;
      the average of unit vectors is shorter than 1 (the more they disagree, the shorter), so
      it is rescaled to `target_norm`, by default the mean norm of the inputs: the adapter was
      trained on raw embeddings (insightface norms ~15-25) and should see that scale.

    Averaging N copies of one embedding returns that embedding in both modes.

    :param embs: shape [N, D] (or [D]).
    :param mode: "mean" or "norm_mean".
    :param target_norm: if given, the result is rescaled to this L2 norm (either mode).
    :return: shape [D], float32.
    """
    if mode not in MEAN_MODES:
        raise InputError(f"mode must be one of {MEAN_MODES}, got {mode!r}")
    e = as_embeddings(embs)
    norms = np.linalg.norm(e, axis=1)  # [N]
    if mode == "mean":
        combined = e.mean(axis=0)
    else:
        combined = l2_normalize(e).mean(axis=0)
        target_norm = norms.mean() if target_norm is None else target_norm
    if target_norm is not None:
        combined = l2_normalize(combined) * float(target_norm)
    return combined.astype(np.float32)


# ----------------------------------------------------------------------------- same vs different


def same_vs_different(embs, labels: Sequence, metric: str = "cosine") -> PairScores:
    """Split the scores of all unordered pairs (i < j) by whether labels[i] == labels[j].

    :param embs: shape [N, D].
    :param labels: N identity labels (any hashable values).
    """
    matrix = similarity_matrix(embs, metric)
    if len(labels) != len(matrix):
        raise InputError(f"got {len(matrix)} embeddings but {len(labels)} labels")
    labels = np.asarray(labels, dtype=object)
    i, j = np.triu_indices(len(labels), k=1)  # all pairs i < j
    same = labels[i] == labels[j]
    scores = matrix[i, j]
    return PairScores(same=scores[same], different=scores[~same], metric=metric)


def pair_ranking_accuracy(embs, labels: Sequence, metric: str = "cosine") -> float:
    """Fraction of (same-person pair, different-person pair) comparisons in which the same-person
    pair is the more similar one; ties count one half. This is the ROC AUC of the pair scores:
    1.0 = every same pair beats every different pair, 0.5 = chance. No threshold is needed.

    :param embs: shape [N, D].
    :param labels: N identity labels; at least one same and one different pair are needed.
    """
    scores = same_vs_different(embs, labels, metric)
    if len(scores.same) == 0 or len(scores.different) == 0:
        raise InputError("need at least one pair of the same person and one pair of different people")
    sign = 1.0 if higher_is_more_similar(metric) else -1.0
    same, different = np.sort(sign * scores.same), np.sort(sign * scores.different)
    below = np.searchsorted(different, same, side="left")  # different pairs strictly less similar
    ties = np.searchsorted(different, same, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(same) * len(different)))


# ----------------------------------------------------------------------------- a generic feature


def color_histogram_feature(image: ImageLike, bins: Sequence[int] = (8, 4, 4), size: int = 128) -> np.ndarray:
    """A generic whole-image feature, for contrast with an identity embedding: the joint HSV
    colour histogram of the photo (hue x saturation x value bins), L2-normalised.

    It describes lighting, background and clothing colours, not who is in the photo, so two
    photos from one shoot look "similar" even when they show different people.

    :param image: a path, PIL image or array (see `load_image`).
    :param bins: number of bins for hue, saturation and value.
    :param size: the photo is first shrunk to fit size x size (speed; the histogram barely changes).
    :return: shape [prod(bins)], float32, unit length (compare with "cosine").
    """
    pil = load_image(image).copy()
    pil.thumbnail((size, size))
    hsv = np.asarray(pil.convert("HSV")).reshape(-1, 3)  # [H*W, 3], each channel 0..255
    cells = (hsv.astype(np.int64) * np.asarray(bins)) // 256  # [H*W, 3] bin index per channel
    flat = np.ravel_multi_index(cells.T, tuple(bins))  # [H*W]
    histogram = np.bincount(flat, minlength=int(np.prod(bins))).astype(np.float64)
    return l2_normalize(histogram).astype(np.float32)


# ----------------------------------------------------------------------------- robustness to edits


def photo_variants(image: ImageLike, bbox, margin: float = 0.1, blur: float = 1 / 30,
                   low_res_face: int = 24) -> dict[str, Image.Image]:
    """Edited copies of a photo, to see how each edit moves the face's embedding.

    :param image: the photo.
    :param bbox: shape [4], the face's box x1, y1, x2, y2 (sets the crop and the edit strengths).
    :param margin: the crop keeps the box plus this fraction of its width on every side.
    :param blur: Gaussian blur radius as a fraction of the face width.
    :param low_res_face: for "low resolution" the photo is shrunk until the face is this many
        pixels wide, then enlarged back to its size (detail is lost, the size is not).
    :return: {"mirrored", "cropped", "blurred", "low resolution"} -> PIL image.
    """
    pil = load_image(image)
    x1, y1, x2, y2 = (float(v) for v in np.asarray(bbox).reshape(4))
    width = max(x2 - x1, 1.0)
    pad = margin * width
    crop_box = (max(0, int(x1 - pad)), max(0, int(y1 - pad)),
                min(pil.width, int(x2 + pad)), min(pil.height, int(y2 + pad)))
    factor = min(1.0, low_res_face / width)
    small = pil.resize((max(1, round(pil.width * factor)), max(1, round(pil.height * factor))), Image.BILINEAR)
    return {
        "mirrored": ImageOps.mirror(pil),
        "cropped": pil.crop(crop_box),
        "blurred": pil.filter(ImageFilter.GaussianBlur(blur * width)),
        "low resolution": small.resize(pil.size, Image.BICUBIC),
    }


def variant_scores(analyzer, image: ImageLike, variants: Optional[dict] = None,
                   metric: Optional[str] = None) -> dict[str, float]:
    """Score between the largest face of `image` and the largest face of each edited copy.

    :param analyzer: a `FaceAnalyzer` (`get_face`, `.backend`).
    :param variants: {name: image}; default `photo_variants(image, face.bbox)`.
    :param metric: default `metric_for(analyzer.backend)`.
    :return: {name: score}; NaN where no face is found in the copy.
    """
    metric = metric or metric_for(analyzer.backend)
    face = analyzer.get_face(image)
    variants = photo_variants(image, face.bbox) if variants is None else variants
    scores = {}
    for name, edited in variants.items():
        try:
            other = analyzer.get_face(edited).embedding
        except NoFaceError:
            scores[name] = float("nan")
            continue
        scores[name] = float(similarity_matrix(np.stack([face.embedding, other]), metric)[0, 1])
    return scores


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
