"""Turning the pipeline's flexible arguments into tensors of known shapes (or a clear `InputError`).

- identity embeddings: one vector [D], several references of one person [N, D] (averaged), or
  one entry per prompt ([B, N, D] or a list of B vectors / reference sets) -> [B, D];
- images (keypoint image, source image): a path, PIL image, HWC array, tensor [3, H, W] in [0, 1],
  or one per prompt -> [B, 3, H, W] in [0, 1] at the requested size;
- masks: the same, one channel -> [B, 1, H, W] in [0, 1];
- scales: a number, or one per prompt / per generated image -> float or Tensor [B * n].
"""

from __future__ import annotations

import numbers
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..embeddings import mean_embedding
from ..errors import InputError
from ..images import load_image

Scale = Union[float, Tensor]


def as_prompts(prompt) -> list[str]:
    """A prompt or a list of prompts -> list of prompts."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise InputError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")


def as_negative_prompts(negative_prompt, n_prompts: int) -> list[str]:
    """None / a string / a list of `n_prompts` strings -> list of `n_prompts` strings."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return [negative_prompt or ""] * n_prompts
    negatives = as_prompts(negative_prompt)
    if len(negatives) != n_prompts:
        raise InputError(f"got {len(negatives)} negative prompts for {n_prompts} prompts; give one per prompt or one string")
    return negatives


# ----------------------------------------------------------------------------- identity embeddings


def as_identity_embeddings(face_embedding, n_prompts: int, dim: int, mode: str = "mean") -> Tensor:
    """One identity embedding per prompt.

    :param face_embedding: [D] (one identity for every prompt), [N, D] (N reference photos of one
        person, combined with `embeddings.mean_embedding(mode)`), [B, N, D] or a list of B such
        entries (one identity per prompt). Tensor, numpy array or nested lists.
    :param n_prompts: B, the number of prompts.
    :param dim: the embedding width the Resampler takes.
    :param mode: how references are combined: "mean" or "norm_mean".
    :return: shape [B, D], float32.
    """
    identities = [_one_identity(x, mode) for x in _split_identities(face_embedding)]
    if len(identities) == 1:
        identities = identities * n_prompts
    if len(identities) != n_prompts:
        raise InputError(f"got {len(identities)} identity embeddings for {n_prompts} prompts; give one, or one per prompt")
    embeds = torch.stack(identities)                               # [B, D]
    _check_dim(embeds.shape[-1], dim)
    return embeds


def _split_identities(face_embedding) -> list[Tensor]:
    if isinstance(face_embedding, (list, tuple)) and face_embedding and isinstance(face_embedding[0], (Tensor, np.ndarray)):
        return [_as_float_tensor(x) for x in face_embedding]
    t = _as_float_tensor(face_embedding)
    if t.ndim == 3:
        return list(t)                                             # [B, N, D] -> B x [N, D]
    if t.ndim in (1, 2):
        return [t]
    raise InputError(f"face_embedding must have shape [D], [N, D] or [B, N, D]; got {list(t.shape)}")


def _as_float_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().float().cpu()
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise InputError(f"face_embedding must be numbers (tensor, array or lists), got {type(x).__name__}") from e


def _one_identity(t: Tensor, mode: str) -> Tensor:
    if t.ndim == 1:
        return t
    if t.ndim == 2 and t.shape[0] == 1:
        return t[0]
    if t.ndim == 2:
        return torch.from_numpy(mean_embedding(t.numpy(), mode=mode))  # [N, D] -> [D]
    raise InputError(f"each identity must be [D] or [N, D]; got {list(t.shape)}")


def _check_dim(got: int, dim: int) -> None:
    if got == dim:
        return
    hint = "use embeddings from the face model this adapter was trained with"
    if got == 128 and dim == 512:
        hint = ("128-d vectors come from dlib; the InstantID adapter was trained on insightface antelopev2 "
                "(512-d, raw `embedding`): use the insightface backend")
    raise InputError(f"the face embedding is {got}-d but the adapter's Resampler takes {dim}-d embeddings: {hint}.")


# ----------------------------------------------------------------------------- images and masks


def image_size(image) -> tuple[int, int]:
    """(width, height) of an image argument (the first one of a list)."""
    if isinstance(image, (list, tuple)):
        return image_size(image[0])
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return load_image(image).size


def as_image_batch(image, n: int, height: int, width: int) -> Tensor:
    """One image (repeated) or `n` images -> [n, 3, height, width], RGB in [0, 1].

    :param image: path, PIL image, HWC array, Tensor [3, H, W] or [B, 3, H, W] in [0, 1], or a list.
    """
    items = _split_batch(image, n, "image")
    return torch.stack([_resize(_image_tensor(x), height, width) for x in items])


def as_mask_batch(mask, n: int, height: int, width: int) -> Tensor:
    """One mask (repeated) or `n` masks -> [n, 1, height, width] in [0, 1] (white / 1 = selected).

    :param mask: path, PIL image, [H, W] array, Tensor [H, W], [1, H, W] or [B, 1, H, W], or a list.
    """
    items = _split_batch(mask, n, "mask")
    return torch.stack([_resize(_mask_tensor(x), height, width, mask=True) for x in items])


def _split_batch(x, n: int, what: str) -> list:
    if isinstance(x, Tensor) and x.ndim == 4:
        items = list(x)
    elif isinstance(x, (list, tuple)):
        items = list(x)
    else:
        items = [x]
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise InputError(f"got {len(items)} {what}s for a batch of {n}; give one, or one per prompt")
    return items


def _image_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        if x.ndim != 3 or x.shape[0] != 3:
            raise InputError(f"an image tensor must have shape [3, H, W] (RGB in [0, 1]); got {list(x.shape)}")
        return x.detach().float().cpu()
    array = np.asarray(load_image(x), dtype=np.float32) / 255.0    # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1)               # [H, W, 3] -> [3, H, W]


def _mask_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach().float().cpu()
        if t.ndim == 2:
            t = t[None]                                            # [H, W] -> [1, H, W]
        if t.ndim != 3 or t.shape[0] != 1:
            raise InputError(f"a mask tensor must have shape [H, W] or [1, H, W]; got {list(x.shape)}")
        return t.clamp(0, 1)
    if isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype != np.uint8:
        return torch.from_numpy(np.clip(x.astype(np.float32), 0, 1))[None]
    gray = load_image(x).convert("L")
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None]  # [1, H, W]


def _resize(t: Tensor, height: int, width: int, mask: bool = False) -> Tensor:
    """[c, H, W] -> [c, height, width]: bilinear (antialiased); a mask is area-averaged when shrinking,
    so a cell's value is the fraction of selected pixels in it."""
    if tuple(t.shape[-2:]) == (height, width):
        return t
    if mask and height <= t.shape[-2] and width <= t.shape[-1]:
        return F.interpolate(t[None], size=(height, width), mode="area")[0]
    return F.interpolate(t[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


# ----------------------------------------------------------------------------- scales


def as_sample_scale(scale, n_prompts: int, n_per_prompt: int) -> Scale:
    """A scale for every generated image: a float, or a Tensor of shape [n_prompts * n_per_prompt].

    :param scale: a number; or one per prompt (length n_prompts, repeated for each image of the
        prompt); or one per generated image (length n_prompts * n_per_prompt, prompt-major).
    """
    if isinstance(scale, numbers.Number):
        return float(scale)
    t = torch.as_tensor(scale, dtype=torch.float32).detach().cpu().flatten()
    if t.numel() == n_prompts * n_per_prompt:
        return t
    if t.numel() == n_prompts:
        return t.repeat_interleave(n_per_prompt)                   # [B] -> [B * n]
    if t.numel() == 1:
        return float(t)
    raise InputError(
        f"a scale must be a number, or have {n_prompts} (one per prompt) or {n_prompts * n_per_prompt} "
        f"(one per image) entries; got {t.numel()}"
    )
