"""Several reference photos of one person -> what the Resampler sees (the paper's Fig. 4, multi-reference).

InstantID conditions on one identity embedding; a user often has several photos of the person. The
combiners (`COMBINERS`) of N reference embeddings e_1..e_N of one person, shape [N, D]:

- "mean"       e = (1/N) sum_i e_i                           (the paper: average the embeddings)
- "norm_mean"  e = m * u / ||u||,  u = (1/N) sum_i e_i / ||e_i||,  m = (1/N) sum_i ||e_i||
               (every photo counts equally; `embeddings.mean_embedding(mode="norm_mean")`)
- "weighted"   e = sum_i w_i e_i / sum_i w_i,  w_i >= 0       (w from the user, or `face_weights`:
               the detector's score or the face-box area)
- "concat"     no averaging: T = [R(e_1); ...; R(e_N)], every reference through the Resampler R and the
               identity tokens concatenated (N x 16 tokens); the negative identity is [R(0); ...; R(0)].

With one reference every combiner returns it unchanged; N copies of one embedding give that
embedding's image with every combiner (for "concat" because attention over duplicated keys equals
attention over one copy). The pipeline takes the record `References` as its `face_embedding`:

    refs = References(np.stack([f.embedding for f in faces]), combine="weighted", weights=face_weights(faces))
    pipe(prompt, face_embedding=refs, keypoint_image=kps_image)

This module is core: it imports only errors, embeddings, torch and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .embeddings import mean_embedding, to_numpy
from .errors import InputError

#: The ways to use several reference embeddings of one person.
COMBINERS = ("mean", "norm_mean", "weighted", "concat")
#: What `face_weights` can weight a reference by.
WEIGHT_SOURCES = ("area", "det_score")


def check_combiner(combine: str, name: str = "combine") -> str:
    """`combine` if it is one of `COMBINERS`.

    :param name: the argument's name, for the message.
    :raises InputError: another value (the message names the argument and the valid values).
    """
    if combine not in COMBINERS:
        raise InputError(f"{name} must be one of {COMBINERS}, got {combine!r}")
    return combine


# ----------------------------------------------------------------------------- the combiners (pure)


def mean_combine(embeddings: Tensor) -> Tensor:
    """e = (1/N) sum_i e_i.

    :param embeddings: shape [N, D].
    :return: shape [D], float32.
    """
    return torch.from_numpy(mean_embedding(embeddings.numpy(), mode="mean"))


def norm_mean_combine(embeddings: Tensor) -> Tensor:
    """e = m * u / ||u||, with u = (1/N) sum_i e_i / ||e_i|| and m = (1/N) sum_i ||e_i||.

    :param embeddings: shape [N, D].
    :return: shape [D], float32.
    """
    return torch.from_numpy(mean_embedding(embeddings.numpy(), mode="norm_mean"))


def weighted_combine(embeddings: Tensor, weights: Tensor) -> Tensor:
    """e = sum_i w_i e_i / sum_i w_i.

    :param embeddings: shape [N, D].
    :param weights: shape [N], w_i >= 0 and sum_i w_i > 0 (see `normalised_weights`).
    :return: shape [D].
    """
    w = normalised_weights(weights, len(embeddings))                 # [N], sums to 1
    return (w[:, None] * embeddings).sum(0)                          # [N, 1] * [N, D] -> [D]


def identity_tokens(resampler: Callable[[Tensor], Tensor], embeddings: Tensor) -> Tensor:
    """T_b = [R(e_b1); ...; R(e_bK)]: the Resampler on every embedding, each prompt's tokens concatenated
    ("concat"; with K = 1 simply R(e_b)).

    :param resampler: the image projection, [M, D] -> [M, Q, C].
    :param embeddings: shape [B, K, D]: K = 1 (one, or combined), or K = N references ("concat").
    :return: shape [B, K * Q, C].
    """
    b, k, d = embeddings.shape
    tokens = resampler(embeddings.reshape(b * k, d))                 # [B * K, Q, C]
    return tokens.reshape(b, k * tokens.shape[1], tokens.shape[2])   # [B * K, Q, C] -> [B, K * Q, C]


def combine_references(embeddings: Tensor, combine: str = "mean", weights: Optional[Tensor] = None) -> Tensor:
    """What goes through the Resampler for one person's N references.

    :param embeddings: shape [N, D].
    :param combine: one of `COMBINERS`.
    :param weights: shape [N], for "weighted" (None: equal weights).
    :return: shape [1, D] (combined; with N = 1 the reference itself), or [N, D] for "concat".
    """
    if len(embeddings) == 1 or check_combiner(combine) == "concat":
        return embeddings
    if combine == "weighted":
        weights = torch.ones(len(embeddings)) if weights is None else weights
        return weighted_combine(embeddings, weights)[None]
    return (mean_combine if combine == "mean" else norm_mean_combine)(embeddings)[None]


# ----------------------------------------------------------------------------- weights


def normalised_weights(weights, n: int) -> Tensor:
    """w / sum(w), checked: N finite, non-negative numbers with a positive sum.

    :param weights: shape [N] (tensor, array or list).
    :param n: N, the number of references.
    :return: shape [N], float32, sums to 1.
    :raises InputError: another length, NaN/inf, a negative weight, or all zero.
    """
    w = torch.as_tensor(to_numpy(weights), dtype=torch.float32).flatten()
    if w.numel() != n:
        raise InputError(f"weights must have one number per reference: got {w.numel()} for {n} references")
    if not torch.isfinite(w).all():
        raise InputError("weights contain NaN or infinite values")
    if (w < 0).any() or w.sum() <= 0:
        raise InputError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    return w / w.sum()


def face_weights(faces: Sequence[Any], by: str = "area") -> np.ndarray:
    """One weight per reference face, for "weighted": its face-box area (bigger, sharper faces weigh
    more) or its detection score.

    :param faces: analysed faces (`face_analysis.Face`: `.area`, `.det_score`).
    :param by: "area" or "det_score".
    :return: shape [N], float64.
    """
    if by not in WEIGHT_SOURCES:
        raise InputError(f"by must be one of {WEIGHT_SOURCES}, got {by!r}")
    return np.array([float(getattr(face, by)) for face in faces])


# ----------------------------------------------------------------------------- the record


@dataclass(frozen=True, eq=False)
class References:
    """N reference embeddings of one person and how to use them; pass it as the pipeline's `face_embedding`
    (alone: the same person for every prompt; or one per prompt in a list).

    :param embeddings: shape [N, D] (or [D], N = 1): tensor, array, or a list of vectors. Kept as a
        float32 Tensor [N, D].
    :param combine: one of `COMBINERS`: "mean", "norm_mean", "weighted" or "concat".
    :param weights: shape [N], "weighted" only (None: equal weights); kept as a Tensor [N].
    :raises InputError: another shape, NaN/inf embeddings, an unknown combiner, weights with another
        combiner, or weights of another length, not finite, negative or summing to zero.
    """

    embeddings: Any
    combine: str = "mean"
    weights: Optional[Any] = None

    def __post_init__(self):
        check_combiner(self.combine, "References.combine")
        object.__setattr__(self, "embeddings", _as_matrix(self.embeddings))
        if self.weights is not None and self.combine != "weighted":
            raise InputError(f"weights are used only by combine='weighted', not {self.combine!r}")
        if self.weights is not None:
            normalised_weights(self.weights, self.n)  # checked here, so a bad record fails where it is made
            object.__setattr__(self, "weights", torch.as_tensor(to_numpy(self.weights), dtype=torch.float32))

    @property
    def n(self) -> int:
        """N, the number of references."""
        return len(self.embeddings)

    def resampler_inputs(self) -> Tensor:
        """The combined embedding [1, D], or every reference [N, D] for "concat" (`combine_references`)."""
        return combine_references(self.embeddings, self.combine, self.weights)


def _as_matrix(embeddings) -> Tensor:
    """Reference embeddings -> float32 Tensor [N, D], finite."""
    e = to_numpy(embeddings)
    e = e[None] if e.ndim == 1 else e                                # [D] -> [1, D]
    if e.ndim != 2 or 0 in e.shape:
        raise InputError(f"reference embeddings must have shape [N, D] or [D]; got {list(e.shape)}")
    if not np.isfinite(e).all():
        raise InputError("reference embeddings contain NaN or infinite values")
    return torch.from_numpy(e.astype(np.float32))
