"""Turning the pipeline's flexible arguments into tensors of known shapes (or a clear `InputError`).

- identity embeddings: one vector [D], several references of one person ([N, D], or a `References`
  record), or one entry per prompt ([B, N, D] or a list of B vectors / reference sets) -> the
  Resampler's inputs [B, K, D] (K = 1, or N for "concat"), or combined [B, D];
- images (keypoint image, source image): a path, PIL image, HWC array, tensor [3, H, W] in [0, 1],
  or one per prompt -> [B, 3, H, W] in [0, 1] at the requested size;
- masks: the same, one channel -> [B, 1, H, W] in [0, 1];
- scales: a number, or one per prompt / per generated image -> float or Tensor [B * n];
- ControlNet settings: `control_guidance_start/end` and the extra ControlNets (parallel lists, or
  `ExtraControlNet` records) -> IdentityNet's `ControlWindow` and a list of `ExtraControlNet`.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..images import load_image
from ..references import References, check_combiner
from ..types import Scale, per_sample_scale
from .records import ControlWindow, ExtraControlNet

#: What a list of per-prompt identities holds.
_ENTRIES = (Tensor, np.ndarray, References)


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
    """One identity embedding per prompt, references combined (see `as_reference_sets`).

    :return: shape [B, D], float32.
    :raises InputError: as `as_reference_sets`, or "concat" references (they stay N embeddings).
    """
    sets = as_reference_sets(face_embedding, n_prompts, dim, mode)          # [B, K, D]
    if sets.shape[1] != 1:
        raise InputError("'concat' keeps every reference (N embeddings per prompt); use as_reference_sets")
    return sets[:, 0]                                                        # [B, 1, D] -> [B, D]


def as_reference_sets(face_embedding, n_prompts: int, dim: int, mode: str = "mean") -> Tensor:
    """Per prompt, the embeddings that go through the Resampler: one (a single embedding, or references
    combined), or all N references ("concat", see `references`).

    :param face_embedding: [D] (one identity for every prompt); [N, D] (N reference photos of one person,
        combined by `mode`); a `References` record (embeddings, combine, weights); or one per prompt:
        [B, N, D] or a list of B such entries. Tensor, numpy array or nested lists.
    :param n_prompts: B, the number of prompts.
    :param dim: the embedding width the Resampler takes.
    :param mode: how a plain [N, D] is used: one of `references.COMBINERS` ("weighted": equal weights).
    :return: shape [B, K, D], float32: K = 1, or K = N for "concat" (the same N for every prompt).
    """
    check_combiner(mode, "reference_mode")
    sets = [_resampler_inputs(x, mode) for x in _split_identities(face_embedding)]   # each [K, D]
    if len(sets) == 1:
        sets = sets * n_prompts
    if len(sets) != n_prompts:
        raise InputError(f"got {len(sets)} identity embeddings for {n_prompts} prompts; give one, or one per prompt")
    for s in sets:
        _check_dim(s.shape[-1], dim)
    counts = sorted({len(s) for s in sets})
    if len(counts) > 1:
        raise InputError(f"'concat' gives each prompt N times the Resampler's identity tokens, so every prompt of one "
                         f"call needs the same number of references N; got N in {counts}. Call once per N, or "
                         "combine them (mean, norm_mean, weighted).")
    return torch.stack(sets)                                                 # B x [K, D] -> [B, K, D]


def _split_identities(face_embedding) -> list:
    if isinstance(face_embedding, References):
        return [face_embedding]
    if isinstance(face_embedding, (list, tuple)) and face_embedding and isinstance(face_embedding[0], _ENTRIES):
        return list(face_embedding)
    t = _as_float_tensor(face_embedding)
    if t.ndim == 3:
        return list(t)                                             # [B, N, D] -> B x [N, D]
    if t.ndim in (1, 2):
        return [t]
    raise InputError(f"face_embedding must have shape [D], [N, D] or [B, N, D]; got {list(t.shape)}")


def _as_float_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().float().cpu()
    if hasattr(x, "embedding") and hasattr(x, "kps"):
        raise InputError("face_embedding got a whole face (a `Face`); pass its vector: face.embedding")
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise InputError(f"face_embedding must be numbers (tensor, array or lists), got {type(x).__name__}") from e


def _resampler_inputs(x, mode: str) -> Tensor:
    """One prompt's identity -> [K, D] (a plain [D] or [N, D] becomes `References(x, mode)`)."""
    if isinstance(x, References):
        return x.resampler_inputs()
    t = _as_float_tensor(x)
    if t.ndim not in (1, 2):
        raise InputError(f"each identity must be [D] or [N, D]; got {list(t.shape)}")
    return References(t, mode).resampler_inputs()


def _check_dim(got: int, dim: int) -> None:
    if got == dim:
        return
    hint = "use embeddings from the face model this adapter was trained with"
    if dim == 64:
        hint = ("the miniature's adapter takes the miniature's own 64-d embeddings: "
                "get_face_analyzer(\"miniature\").get_face(image).embedding")
    elif got == 128 and dim == 512:
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


def output_size(keypoint_image, height, width, native: int, multiple: int) -> tuple[int, int]:
    """(height, width): the requested size; a missing side from the keypoint image's aspect with the
    short side `native` and each side a multiple of `multiple` (square `native` without an image)."""
    from ..keypoints import fit_size

    if height is not None and width is not None:
        return int(height), int(width)
    fitted_w, fitted_h = (native, native)
    if keypoint_image is not None:
        fitted_w, fitted_h = fit_size(image_size(keypoint_image), target_short=native, multiple=multiple)
    return int(height or fitted_h), int(width or fitted_w)


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


def as_sample_scale(scale, n_prompts: int, n_per_prompt: int, name: str = "scale") -> Scale:
    """A scale for every generated image: a float, or a Tensor of shape [n_prompts * n_per_prompt].

    :param scale: a number; or one per prompt (length n_prompts, repeated for each image of the
        prompt); or one per generated image (length n_prompts * n_per_prompt, prompt-major).
    :param name: the argument's name, for the error message.
    :raises InputError: not numbers, not finite, or another length (naming `name`).
    """
    batch = n_prompts * n_per_prompt
    if isinstance(scale, numbers.Number):
        return per_sample_scale(scale, batch, name=name)
    t = _scale_tensor(scale, name)                                # [k]
    if t.numel() == 1:
        return per_sample_scale(float(t[0]), batch, name=name)
    if t.numel() == n_prompts and n_per_prompt > 1:
        t = t.repeat_interleave(n_per_prompt)                      # [B] -> [B * n]
    return per_sample_scale(t, batch, name=name)


def _scale_tensor(scale, name: str) -> Tensor:
    """A scale given as a list / array / tensor -> a flat float tensor on the CPU (InputError if it is not numbers)."""
    try:
        t = torch.as_tensor(scale.detach().cpu() if isinstance(scale, Tensor) else np.asarray(scale, np.float32),
                            dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{name} must be a number or a list / tensor of numbers, got {type(scale).__name__}") from e
    return t.flatten()


# ----------------------------------------------------------------------------- ControlNets


def as_controlnets(start, end, extra_controlnets: Sequence, extra_images: Sequence,
                   extra_scales) -> tuple[ControlWindow, list[ExtraControlNet]]:
    """IdentityNet's window and the extra ControlNets as records, from `__call__`'s arguments.

    :param start, end: `control_guidance_start/end`: a number for every ControlNet, or a list with
        one per ControlNet, IdentityNet first. With `ExtraControlNet` records, numbers: IdentityNet's.
    :param extra_controlnets: ControlNets (then one image each in `extra_images`), or `ExtraControlNet`
        records (then `extra_images` stays empty and `extra_scales` at its default, `ExtraControlNet.scale`).
    :param extra_scales: a number for every extra ControlNet, or one per extra ControlNet.
    :raises InputError: lengths that do not match, or records mixed with the parallel lists.
    """
    nets = list(extra_controlnets)
    records = [isinstance(n, ExtraControlNet) for n in nets]
    if any(records):
        _check_records(all(records), start, end, extra_images, extra_scales)
        return ControlWindow(float(start), float(end)), nets
    if len(nets) != len(extra_images):
        raise InputError(f"got {len(nets)} extra ControlNets but {len(extra_images)} extra images; give one image each")
    starts, ends = _per_control(start, 1 + len(nets)), _per_control(end, 1 + len(nets))
    windows = [ControlWindow(float(s), float(e)) for s, e in zip(starts, ends)]   # IdentityNet first
    specs = zip(nets, extra_images, _per_control(extra_scales, len(nets)), windows[1:])
    return windows[0], [ExtraControlNet(net, image, scale, window) for net, image, scale, window in specs]


def _check_records(only_records: bool, start, end, extra_images, extra_scales) -> None:
    raise_first([
        (not only_records, "extra_controlnets mixes ExtraControlNet records and bare ControlNets; use one kind"),
        (len(extra_images) > 0 or not _is_default_scale(extra_scales),
         "with ExtraControlNet records leave extra_images and extra_scales out: each record has its image and scale"),
        (not all(isinstance(x, numbers.Number) for x in (start, end)),
         "with ExtraControlNet records give control_guidance_start/end as numbers (IdentityNet's window); "
         "each record carries its own window"),
    ])


def _is_default_scale(scale) -> bool:
    return isinstance(scale, numbers.Number) and scale == ExtraControlNet.scale


def _per_control(value, count: int) -> list:
    """A number for every ControlNet, or a list with one per ControlNet."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InputError(f"got {len(value)} values for {count} ControlNets; give one number or one per ControlNet")
        return list(value)
    return [value] * count


# ----------------------------------------------------------------------------- checks


def identity_problems(has_adapter: bool, has_identitynet: bool, has_identity: bool, has_keypoints: bool,
                      names: tuple[str, str] = ("face_embedding", "keypoint_image")) -> list[tuple[bool, str]]:
    """(failed, message) checks of the identity inputs against the loaded parts: an identity needs
    the image adapter, the adapter needs an identity, IdentityNet needs an identity and keypoints.
    Without adapter, IdentityNet and identity the pipeline is the plain base model.

    :param names: the argument names of the identity and the keypoint image, for the messages.
    """
    identity, keypoints = names
    return [
        (has_identity and not has_adapter,
         f"{identity} was given but no image adapter is loaded: call pipe.load_adapter('ip-adapter.bin') first"),
        (has_adapter and not has_identity,
         f"an image adapter is loaded but {identity} is None: pass the face's identity embedding (face.embedding)"),
        (has_identitynet and not has_identity,
         f"IdentityNet reads identity tokens but {identity} is None: load the adapter (pipe.load_adapter) and "
         "pass face.embedding, or build the pipeline with controlnet=None for the plain model"),
        (has_identitynet and not has_keypoints,
         f"{keypoints} is required with IdentityNet (keypoints.draw_kps(face.kps, size))"),
    ]


def raise_first(problems: list[tuple[bool, str]]) -> None:
    """Raise `InputError` with the message of the first failed (failed, message) check."""
    for failed, message in problems:
        if failed:
            raise InputError(message)
