"""Small helpers the notebooks use to show the miniature at work: enlarged 32-px pictures, setting
sweeps from the same noise, and an untrained extra ControlNet (the keypoint error per image is
`evaluate.keypoint_errors`).

    rows = sweep(pipe, prompts, embeddings, keypoint_images, [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
    rows[s][k]   # image k (prompt k, identity k, keypoints k) under setting s, from noise k

A sweep is one batched call: every setting (adapter scale, IdentityNet scale) gets the same starting
noise per image, so two rows differ only in the scales, which is what the notebooks compare.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image

from ..building import seeded
from ..identitynet import identitynet_from_unet
from .base import GUIDANCE_SCALE, SAMPLING_STEPS

#: (adapter scale, IdentityNet scale) of one row of a sweep.
Setting = tuple[float, float]


@torch.no_grad()
def sweep(pipe, prompts: Sequence[str], embeddings: Sequence, keypoint_images: Sequence, settings: Sequence[Setting],
          steps: int = SAMPLING_STEPS, guidance_scale: float = GUIDANCE_SCALE, seed: int = 0, height: Optional[int] = None,
          width: Optional[int] = None) -> list[list[Image.Image]]:
    """Generate K images once per setting, in one batched call, image k from the same noise in every setting.

    :param prompts, embeddings, keypoint_images: K of each; image k uses the k-th of each
        (embeddings: [D] vectors, e.g. `face.embedding`).
    :param settings: S pairs (adapter scale, IdentityNet scale).
    :param height, width: output size; default: the model's native square size (32 for the miniature).
    :return: S rows of K PIL images: `rows[s][k]`.
    """
    k, s = len(prompts), len(settings)
    height, width = pipe.default_size(None, height, width)
    f = pipe.vae_scale_factor
    noise = torch.randn(k, pipe.unet.config.in_channels, height // f, width // f,
                        generator=torch.Generator().manual_seed(seed))                  # [K, 4, h, w]
    adapter, identitynet = (torch.tensor(column).repeat_interleave(k) for column in zip(*settings))  # [S * K] each
    images = pipe(list(prompts) * s, list(embeddings) * s, list(keypoint_images) * s, adapter_scale=adapter,
                  identitynet_scale=identitynet, num_inference_steps=steps, guidance_scale=guidance_scale,
                  height=height, width=width, latents=noise.repeat(s, 1, 1, 1).to(pipe.device, pipe.unet.dtype)).images
    return [images[i * k:(i + 1) * k] for i in range(s)]


def random_controlnet(unet, conditioning_channels: Sequence[int] = (16, 32), seed: int = 0):
    """An untrained "extra" ControlNet shaped like `unet`'s encoder: random weights, including the
    output convolutions a fresh ControlNet starts with at zero (so its effect is visible).

    Built from `unet`'s config, so `unet` may already carry the adapter's identity processors.
    """
    from diffusers import UNet2DConditionModel

    with seeded(seed), torch.no_grad():
        net = identitynet_from_unet(UNet2DConditionModel.from_config(unet.config), conditioning_channels,
                                    copy_weights=False)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            conv.reset_parameters()
    net = net.to(unet.device)
    return (net if net.dtype == unet.dtype else net.to(dtype=unet.dtype)).eval()
