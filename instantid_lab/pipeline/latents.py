"""Where denoising starts: pure noise (text-to-image), a noised source image (img2img), and the
known region kept from the source at every step (inpainting with an ordinary 4-channel UNet).

img2img with strength s skips the first (1 - s) of the schedule and starts from
z = add_noise(E(x_source), noise, t_start). Inpainting additionally replaces, after every step,
the region outside the mask by the source noised to the next timestep:

    z <- m * z + (1 - m) * add_noise(E(x_source), noise, t_next)       (m = 1 where repainted)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import InputError


@dataclass
class LatentState:
    """The starting latents and, for img2img / inpainting, what the loop needs to keep the source.

    :param latents: where denoising starts, [B, 4, h, w].
    :param source: the encoded source image (already times the VAE scaling factor), [B, 4, h, w].
    :param noise: the noise the source was noised with, [B, 4, h, w].
    :param mask: inpainting mask at latent size, [B, 1, h, w], 1 = repaint, 0 = keep.
    """

    latents: Tensor
    source: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    mask: Optional[Tensor] = None


def schedule(scheduler, num_inference_steps: int, strength: float, device) -> Tensor:
    """The timesteps to run: all of them, or the last `strength` fraction (img2img).

    :return: shape [T'] with T' = int(num_inference_steps * strength) (times the scheduler order).
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    if strength >= 1.0:
        return scheduler.timesteps
    skip = (num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)) * scheduler.order
    timesteps = scheduler.timesteps[skip:]
    if len(timesteps) == 0:
        raise InputError(
            f"strength={strength} with {num_inference_steps} steps leaves no step to run; raise strength or steps"
        )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(skip)
    return timesteps


def noised_source(scheduler, source: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The source latents noised to timestep `t` (the same for every sample).

    :param source: shape [B, 4, h, w]; :param noise: same shape; :param t: a 0-d timestep.
    """
    return scheduler.add_noise(source, noise, t.reshape(1).repeat(source.shape[0]))


def keep_known_region(scheduler, latents: Tensor, state: LatentState, next_t: Optional[Tensor]) -> Tensor:
    """Inpainting: outside the mask, replace the latents by the source at the next noise level
    (the clean source after the last step, `next_t` None). Without a mask, `latents` unchanged."""
    if state.mask is None:
        return latents
    known = state.source if next_t is None else noised_source(scheduler, state.source, state.noise, next_t)
    mask = state.mask.to(latents.dtype)
    return mask * latents + (1 - mask) * known


def start_latents(scheduler, noise: Tensor, source: Optional[Tensor], t_start: Tensor, strength: float) -> Tensor:
    """Pure noise (times the scheduler's initial sigma), or the source noised to `t_start`."""
    if source is None or strength >= 1.0:
        return noise * scheduler.init_noise_sigma
    return noised_source(scheduler, source, noise, t_start)


def random_latents(shape: tuple, generator, device, dtype) -> Tensor:
    """Gaussian latents; `generator` may be one `torch.Generator` or one per sample."""
    from diffusers.utils.torch_utils import randn_tensor

    if isinstance(generator, list) and len(generator) != shape[0]:
        raise InputError(f"got {len(generator)} generators for {shape[0]} images; give one, or one per image")
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


def step_kwargs(scheduler, generator) -> dict:
    """`scheduler.step`'s extra keyword arguments: the generator, if it takes one (one generator only)."""
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted and not isinstance(generator, list) else {}
