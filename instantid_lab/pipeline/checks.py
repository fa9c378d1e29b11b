"""The rules every plain argument of `InstantIDPipeline.__call__` must follow, checked before any work.

Each rule is one small function that returns a problem (what is wrong and what to pass instead) or
None; `check_arguments` applies the table `RULES` to the call's arguments and raises the first
problem as an `InputError` naming the argument. Arguments that are converted elsewhere (prompts,
embeddings, images, scales: `inputs`) are checked where they are converted. `check_output_size`
bounds the output size before anything is allocated.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import InputError

#: Outputs the pipeline can return.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: The default bound on pixels per call (all images together): 64 images of 1024 x 1024.
MAX_PIXELS_PER_CALL = 64 * 1024 * 1024
#: More denoising steps than the training schedule has timesteps are never meaningful.
MAX_STEPS = 1000

Rule = Callable[[Any], Optional[str]]


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_finite_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def positive_int(maximum: Optional[int] = None) -> Rule:
    def rule(x) -> Optional[str]:
        if not _is_int(x) or x < 1 or (maximum is not None and x > maximum):
            bound = f"between 1 and {maximum}" if maximum else ">= 1"
            return f"must be a whole number {bound}, got {x!r}"
        return None

    return rule


def optional_positive_int(x) -> Optional[str]:
    return None if x is None else positive_int()(x)


def finite_number(x) -> Optional[str]:
    return None if _is_finite_number(x) else f"must be a finite number, got {x!r}"


def whole_number(x) -> Optional[str]:
    return None if _is_int(x) else f"must be a whole number, got {x!r}"


def fractions(x) -> Optional[str]:
    """A fraction of the steps in [0, 1], or a list of them (one per ControlNet)."""
    values = list(x) if isinstance(x, (list, tuple)) else [x]
    if not values or not all(_is_finite_number(v) and 0.0 <= float(v) <= 1.0 for v in values):
        return f"must be a fraction of the steps in [0, 1] (or a list of them, one per ControlNet), got {x!r}"
    return None


def one_of(options: tuple) -> Rule:
    def rule(x) -> Optional[str]:
        return None if isinstance(x, str) and x in options else f"must be one of {options}, got {x!r}"

    return rule


def generator_like(x) -> Optional[str]:
    items = x if isinstance(x, list) else [x]
    if x is None or (items and all(isinstance(g, torch.Generator) for g in items)):
        return None
    return f"must be None, a torch.Generator or a list of them (one per image), got {type(x).__name__}"


def optional_callable(x) -> Optional[str]:
    return None if x is None or callable(x) else f"must be a function f(pipe, step, t, tensors) or None, got {x!r}"


def finite_scale(x) -> Optional[str]:
    """A number, or a list / array / tensor of numbers (one per prompt or per image), all finite."""
    if isinstance(x, bool):
        return f"must be a number or a list / tensor of numbers, got {x!r}"
    try:
        values = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    except (TypeError, ValueError):
        return f"must be a number or a list / tensor of numbers, got {type(x).__name__}"
    return None if np.isfinite(values).all() else "holds NaN or infinite values; give finite numbers"


def finite_latents(x) -> Optional[str]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        return f"must be a tensor [B * n, C, h, w] or None, got {type(x).__name__}"
    return None if bool(torch.isfinite(x).all()) else "holds NaN or infinite values; pass finite starting noise"


#: argument name -> its rule
RULES: dict[str, Rule] = {
    "num_inference_steps": positive_int(MAX_STEPS),
    "num_images_per_prompt": positive_int(),
    "guidance_scale": finite_number,
    "adapter_scale": finite_scale,
    "identitynet_scale": finite_scale,
    "extra_scales": finite_scale,
    "height": optional_positive_int,
    "width": optional_positive_int,
    "strength": finite_number,
    "negative_identity_strength": finite_number,
    "negative_identity_seed": whole_number,
    "control_guidance_start": fractions,
    "control_guidance_end": fractions,
    "output_type": one_of(OUTPUT_TYPES),
    "generator": generator_like,
    "callback_on_step_end": optional_callable,
    "latents": finite_latents,
}


def check_arguments(arguments: dict) -> None:
    """Apply `RULES` to the arguments present in `arguments`; raise the first problem.

    :raises InputError: names the argument, says what it must be and what it got.
    """
    for name, rule in RULES.items():
        problem = rule(arguments[name]) if name in arguments else None
        if problem:
            raise InputError(f"{name} {problem}")
    _check_window(arguments.get("control_guidance_start", 0.0), arguments.get("control_guidance_end", 1.0))


def _check_window(start, end) -> None:
    starts, ends = (np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (start, end))
    if starts.size == ends.size and bool((starts > ends).any()):
        raise InputError(f"control_guidance_start ({start}) must not be after control_guidance_end ({end})")


def check_output_size(height: int, width: int, images: int, max_pixels: int = MAX_PIXELS_PER_CALL) -> None:
    """Positive sides, and at most `max_pixels` pixels over all `images` images of one call.

    :raises InputError: says the limit and how to lift it (before anything is allocated).
    """
    if not (_is_int(height) and _is_int(width)) or height < 1 or width < 1:
        raise InputError(f"height and width must be positive whole numbers, got {height!r} x {width!r}")
    if images * height * width > max_pixels:
        raise InputError(
            f"{images} image(s) of {width}x{height} are {images * height * width:,} pixels, more than this "
            f"pipeline's limit of {max_pixels:,} per call: generate fewer or smaller images per call, or raise "
            f"the limit with pipe.max_pixels_per_call = N if your memory allows it")
