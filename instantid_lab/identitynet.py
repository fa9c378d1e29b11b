"""IdentityNet: a ControlNet on the keypoint image whose cross-attention sees the identity tokens.

IdentityNet is an ordinary diffusers `ControlNetModel` (a copy of the UNet's encoder plus zero
convolutions). Two things make it InstantID's:

- its spatial condition is the 5-keypoint image (weak spatial control), fed in [0, 1] RGB;
- its cross-attention reads the identity tokens (the Resampler output) instead of the text
  (strong semantic control). The SDXL "text_time" embedding still receives the pooled text
  embedding and the time ids.

Its residuals are added to the UNet's skip connections::

    down_i, mid = IdentityNet(z_t, t, identity_tokens, keypoint_image)
    UNet(z_t, t, text_tokens, down_residuals = s * m * down_i, mid_residual = s * m * mid)

with `s` the conditioning scale (one number, or one per sample) and `m` an optional face-region
mask resized to each residual's resolution. Extra ControlNets (pose, canny, depth) are run with
the same function, but see the text tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .attention.equation import batch_scale
from .types import Scale

#: The published `ControlNetModel/config.json` of the released IdentityNet (SDXL 1.0).
SDXL_IDENTITYNET_CONFIG = dict(
    in_channels=4,
    conditioning_channels=3,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    conditioning_embedding_out_channels=(16, 32, 96, 256),
    global_pool_conditions=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
)

Residuals = tuple[list[Tensor], Tensor]


def identitynet_sdxl(**overrides):
    """A randomly initialised IdentityNet with the released SDXL configuration.

    Build it under `accelerate.init_empty_weights()` to get it on the meta device (no memory),
    e.g. to check a checkpoint's key names and shapes.

    :param overrides: `ControlNetModel` config entries to change.
    """
    from diffusers import ControlNetModel

    return ControlNetModel(**{**SDXL_IDENTITYNET_CONFIG, **overrides})


def identitynet_from_unet(unet, conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
                          copy_weights: bool = True, attend_at_every_level: bool = False):
    """An IdentityNet shaped like `unet`'s encoder (the ControlNet recipe), e.g. for the miniature.

    Build it BEFORE identity processors are installed on `unet`: the copied encoder weights must
    not contain the adapter's extra key/value projections.

    :param unet: a diffusers `UNet2DConditionModel`.
    :param conditioning_embedding_out_channels: channels of the keypoint-image encoder; its
        length - 1 is the number of 2x downsamplings, which must equal log2 of the VAE factor.
    :param copy_weights: start from the UNet's encoder weights (True) or from random ones.
    :param attend_at_every_level: give every encoder level cross-attention to the identity tokens, also
        those where the UNet has none (the released IdentityNet and the miniature's have none at the
        top level). The added blocks start with a zero output projection, so the copy starts as the
        UNet's encoder did.
    :raises InputError: the UNet already carries identity processors with parameters.
    """
    from diffusers import ControlNetModel

    if _has_parametrised_processors(unet):
        raise InputError(
            "the UNet already has identity attention processors installed; build IdentityNet from the "
            "UNet first (identitynet_from_unet), then install the adapter."
        )
    net = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        load_weights_from_unet=copy_weights,
    )
    _copy_pooling_heads(unet, net, copy_weights)
    return _attending_at_every_level(net) if attend_at_every_level else net


def _attending_at_every_level(net):
    """`net` with cross-attention in every down block; its weights carried over, the new blocks silent."""
    from diffusers import ControlNetModel

    types = ["CrossAttnDownBlock2D"] * len(net.config.down_block_types)
    attending = ControlNetModel.from_config({**net.config, "down_block_types": types})
    missing, unexpected = attending.load_state_dict(net.state_dict(), strict=False)
    if unexpected or any(".attentions." not in key for key in missing):
        raise RuntimeError(f"IdentityNet layouts differ beyond the added attention: {unexpected or missing}")
    for block, old_type in zip(attending.down_blocks, net.config.down_block_types):
        if old_type != "CrossAttnDownBlock2D":
            for attention in block.attentions:
                nn.init.zeros_(attention.proj_out.weight)
                nn.init.zeros_(attention.proj_out.bias)
    return attending


def _copy_pooling_heads(unet, net, copy_weights: bool) -> None:
    """`ControlNetModel.from_unet` leaves the heads of a "text" addition embedding at its default: rebuild it
    with the UNet's (in the copy the pooled context is the identity tokens)."""
    from diffusers.models.embeddings import TextTimeEmbedding

    heads = unet.config.get("addition_embed_type_num_heads")
    if unet.config.addition_embed_type != "text" or heads == net.config.addition_embed_type_num_heads:
        return
    net.add_embedding = TextTimeEmbedding(unet.add_embedding.norm1.normalized_shape[0],
                                          unet.time_embedding.linear_2.out_features, num_heads=heads)
    net.register_to_config(addition_embed_type_num_heads=heads)
    if copy_weights:
        net.add_embedding.load_state_dict(unet.add_embedding.state_dict())


def _has_parametrised_processors(unet) -> bool:
    processors = unet.attn_processors.values()
    return any(isinstance(p, nn.Module) and next(p.parameters(), None) is not None for p in processors)


def face_region_mask(bbox: Sequence[float], size: Sequence[int], margin: float = 0.0) -> Tensor:
    """A mask that is 1 inside the face box (grown by `margin` times its size on every side), else 0.

    The release's "enhance non-face region" option: IdentityNet and the identity attention then act
    only around the face, and the prompt alone decides the rest of the picture.

    :param bbox: (x1, y1, x2, y2) in pixels of an image of `size`.
    :param size: (width, height).
    :return: shape [1, height, width], float32.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    dx, dy = margin * (x2 - x1), margin * (y2 - y1)
    width, height = (int(v) for v in size)
    xs, ys = torch.arange(width) + 0.5, torch.arange(height) + 0.5        # pixel centres
    inside_x = (xs >= x1 - dx) & (xs <= x2 + dx)                          # [W]
    inside_y = (ys >= y1 - dy) & (ys <= y2 + dy)                          # [H]
    return (inside_y[:, None] & inside_x[None, :]).float()[None]          # [1, H, W]


def run_identitynet(identitynet, latents: Tensor, timestep, identity_tokens: Tensor, keypoint_image: Tensor,
                    scale: Scale = 1.0, added_cond_kwargs: Optional[dict] = None,
                    face_mask: Optional[Tensor] = None, guess_mode: bool = False) -> Residuals:
    """Run IdentityNet once: the keypoint image as spatial condition, identity tokens as context.

    :param identitynet: a `ControlNetModel`.
    :param latents: the (scaled) model input, shape [B, 4, h, w].
    :param timestep: the diffusion timestep (number or 0-d tensor).
    :param identity_tokens: shape [B, N, C] (C = its cross_attention_dim).
    :param keypoint_image: shape [B, 3, H, W], RGB in [0, 1], H = h * VAE factor.
    :param scale: conditioning scale: a float, or a tensor of shape [B] (one per sample).
    :param added_cond_kwargs: {"text_embeds": [B, P], "time_ids": [B, 6]} for "text_time" nets.
    :param face_mask: optional region mask, shape [B, 1, H', W'] in [0, 1] (any resolution).
    :param guess_mode: diffusers' guess mode (residuals weighted 0.1 ... 1 from shallow to deep).
    :return: (down residuals, list of [B, c_i, h_i, w_i]; mid residual [B, c, h_m, w_m]).
    """
    return controlnet_residuals(identitynet, latents, timestep, identity_tokens, keypoint_image, scale,
                                added_cond_kwargs, face_mask, guess_mode)


def controlnet_residuals(controlnet, latents: Tensor, timestep, context: Tensor, cond_image: Tensor,
                         scale: Scale = 1.0, added_cond_kwargs: Optional[dict] = None,
                         region_mask: Optional[Tensor] = None, guess_mode: bool = False) -> Residuals:
    """Residuals of any ControlNet, scaled per sample and optionally masked to a region.

    :param context: the tokens its cross-attention sees, shape [B, L, C] (identity tokens for
        IdentityNet, text tokens for extra ControlNets).
    :param cond_image: its spatial condition, shape [B, 3, H, W].
    :param scale: a float, or a tensor of shape [B].
    :param region_mask: shape [B, 1, H', W'] or None; resized to every residual's resolution.
    :return: (down residuals, mid residual), as `run_identitynet`.
    """
    scale = batch_scale(scale, latents.shape[0], name="conditioning scale")  # float or [1] / [B]: shapes only
    per_sample = isinstance(scale, Tensor)
    down, mid = controlnet(
        latents, timestep, encoder_hidden_states=context, controlnet_cond=cond_image,
        conditioning_scale=1.0 if per_sample else float(scale), guess_mode=guess_mode,
        added_cond_kwargs=added_cond_kwargs, return_dict=False,
    )
    if per_sample:
        down, mid = scale_residuals(down, mid, scale.to(device=latents.device, dtype=latents.dtype))
    if region_mask is not None:
        down, mid = mask_residuals(down, mid, region_mask)
    return list(down), mid


def scale_residuals(down: Sequence[Tensor], mid: Tensor, scale: Tensor) -> Residuals:
    """Multiply every residual by a per-sample scale.

    :param scale: shape [B] (or [1]).
    """
    s = scale.reshape(-1, 1, 1, 1)  # [B] or [1] -> [B, 1, 1, 1] or [1, 1, 1, 1]
    return [d * s for d in down], mid * s


def mask_residuals(down: Sequence[Tensor], mid: Tensor, mask: Tensor) -> Residuals:
    """Multiply every residual by `mask`, resized (area average) to the residual's resolution.

    :param mask: shape [B, 1, H, W] (or [1, 1, H, W], broadcast), values in [0, 1].
    """
    return [d * resize_mask(mask, d) for d in down], mid * resize_mask(mask, mid)


def resize_mask(mask: Tensor, like: Tensor) -> Tensor:
    """`mask` [B, 1, H, W] resized to `like`'s spatial size [.., h, w] (fraction of masked pixels per cell)."""
    mask = mask.to(device=like.device, dtype=like.dtype)
    if mask.shape[-2:] == like.shape[-2:]:
        return mask
    return F.interpolate(mask, size=like.shape[-2:], mode="area")


def add_residuals(a: Optional[Residuals], b: Optional[Residuals]) -> Optional[Residuals]:
    """The sum of two ControlNets' residuals (None counts as zero)."""
    if a is None or b is None:
        return a if b is None else b
    return [x + y for x, y in zip(a[0], b[0])], a[1] + b[1]


def zero_pad_uncond(residuals: Residuals) -> Residuals:
    """Guess mode with guidance: residuals computed on the conditional half only get a zero
    unconditional half, so the batch is [uncond, cond] like the UNet's.

    :return: every residual with batch 2B, the first B zeros.
    """
    down, mid = residuals
    return [_with_zero_half(d) for d in down], _with_zero_half(mid)


def _with_zero_half(x: Tensor) -> Tensor:
    return torch.cat([torch.zeros_like(x), x])  # [B, ...] -> [2B, ...]
