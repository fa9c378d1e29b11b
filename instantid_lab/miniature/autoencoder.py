"""The miniature's autoencoder: 32x32 RGB faces <-> 16x16x8 latents (one 2x downsampling).

It is a diffusers `AutoencoderKL` at a tiny configuration, so the kit's pipeline decodes its
latents unchanged (`vae.decode(latents / scaling_factor)`). Trained with

    L = |x - x_hat|_1 + |x - x_hat|_2^2 + beta * KL(q(z|x) || N(0, I))

on rendered faces; after training, `scaling_factor` is set to 1 / std(z) so that the scaled latents
the diffusion model sees have about unit standard deviation. Then the decoder alone is fine-tuned
(L1 + MSE of decode(posterior mean), encoder frozen): the latent space stays fixed while the eyes and
mouths, which the joint phase leaves blurred, sharpen (`training.autoencoder.finetune_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ModelFilesMissingError
from .objective import Shard


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes and training settings of the miniature autoencoder."""

    block_out_channels: tuple = (32, 64)  # len - 1 = number of 2x downsamplings
    latent_channels: int = 8
    norm_num_groups: int = 16
    image_size: int = 32
    kl_weight: float = 1e-6
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    train_images: int = 8000
    checkpoint_every: int = 100
    # phase 2: the decoder alone, on the frozen encoder's posterior means
    decoder_steps: int = 600
    decoder_batch_size: int = 32
    decoder_lr: float = 1e-3
    decoder_train_images: int = 8000

    @classmethod
    def quick(cls) -> "AutoencoderConfig":
        """A few steps at reduced width: for tests and smoke runs."""
        return cls(block_out_channels=(8, 16), norm_num_groups=4, steps=10, batch_size=8, train_images=64,
                   checkpoint_every=5, decoder_steps=4, decoder_batch_size=8, decoder_train_images=64)

    @classmethod
    def full(cls) -> "AutoencoderConfig":
        return cls()


def build_autoencoder(config: AutoencoderConfig, seed: int = 0):
    """A randomly initialised `AutoencoderKL` (no weights loaded).

    :return: the model; 32x32x3 images map to 16x16x8 latents with the default sizes.
    """
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=config.block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=config.latent_channels, layers_per_block=1, norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size, scaling_factor=1.0,
    )


def reconstruction_loss(vae, images: Tensor, kl_weight: float, generator=None, shard: Shard = Shard()) -> Tensor:
    """L1 + MSE reconstruction of a posterior sample, plus `kl_weight` * KL (mean per element).

    :param images: the global batch, shape [B, 3, H, W] in [-1, 1]; this process scores its `shard`.
    """
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    b, _, h, w = images.shape
    noise = torch.randn((b, vae.config.latent_channels, h // f, w // f), generator=generator)  # the whole batch's
    images = shard.take(images)
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.mean + posterior.std * shard.take(noise)).sample  # [b, 3, H, W]
    kl = posterior.kl().mean() / images[0].numel()
    return F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * kl


@torch.no_grad()
def latent_std(vae, images: Tensor, batch_size: int = 256) -> float:
    """Standard deviation of the posterior means of `images` ([N, 3, H, W] in [-1, 1])."""
    means = [vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return float(torch.cat(means).std())


@torch.no_grad()
def encode(vae, images: Tensor, batch_size: int = 256) -> Tensor:
    """Scaled posterior means, the diffusion model's training targets: [N, 4, H/f, W/f]."""
    factor = vae.config.scaling_factor
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean * factor
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def psnr(vae, images: Tensor, batch_size: int = 256) -> float:
    """Reconstruction PSNR in dB (posterior mean decoded) of images in [-1, 1], peak-to-peak 2."""
    errors = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        errors.append(((vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) - x) ** 2).flatten(1).mean(1))
    mse = torch.cat(errors).mean()
    return float(10 * torch.log10(4.0 / mse))


def save_vae(vae, folder: Path) -> None:
    """Save the autoencoder as `folder/vae` (a diffusers `AutoencoderKL` folder, safetensors)."""
    vae.save_pretrained(str(Path(folder) / "vae"), safe_serialization=True)


def load_vae(folder: Path):
    """The autoencoder saved by `save_vae` in `folder`, frozen and in eval mode.

    :raises ModelFilesMissingError: `folder/vae` is missing (says which stage writes it).
    """
    from diffusers import AutoencoderKL

    path = Path(folder) / "vae"
    if not path.is_dir():
        raise ModelFilesMissingError(f"{path} is missing: run the autoencoder stage first "
                                     f"(python -m instantid_lab.miniature.train autoencoder --out {folder})")
    return AutoencoderKL.from_pretrained(str(path)).eval().requires_grad_(False)
