"""The miniature's base model: caption-conditioned latent diffusion, trained once and then frozen.

A small CLIP text encoder (on a word-level vocabulary of the miniature's captions) and an SD-shaped
`UNet2DConditionModel` on the autoencoder's 16x16x4 latents are trained jointly, the caption dropped
(replaced by the empty prompt) 10% of the time so that classifier-free guidance works. The base knows
captions (background, expression, accessory, style) but no particular identity: identities are
drawn afresh for every render from 100k training ids.

Objective (v-prediction with min-SNR weighting, Hang et al. 2023), with alpha_bar_t from a cosine
schedule, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps and SNR_t = alpha_bar / (1 - alpha_bar):

    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0,
    L = E_t[ min(SNR_t, gamma) / (SNR_t + 1) * |v_theta(x_t, t, c) - v|^2 ],   gamma = 5.

The InstantID stage trains its parts with exactly this objective (`diffusion_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .world import ACCESSORIES, BACKGROUNDS, EXPRESSIONS, STYLES, _BACKGROUND_RGB

#: Every word the miniature's captions use; each becomes one token.
CAPTION_WORDS = ("a", "face", "with", "background", "style", ",", *EXPRESSIONS, *ACCESSORIES, *BACKGROUNDS, *STYLES)


@dataclass(frozen=True)
class BaseConfig:
    """Sizes and training settings of the base model (text encoder + UNet)."""

    block_out_channels: tuple = (48, 96, 96)
    norm_groups: int = 16
    attention_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 16
    latent_size: int = 16
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    train_images: int = 12000
    checkpoint_every: int = 100
    eval_captions: int = 48

    @classmethod
    def quick(cls) -> "BaseConfig":
        """A narrow model and a few steps: for tests and smoke runs."""
        return cls(block_out_channels=(16, 32, 32), norm_groups=8, attention_heads=2, text_hidden=16, steps=12,
                   batch_size=8, warmup=2, train_images=64, checkpoint_every=4, eval_captions=4)

    @classmethod
    def full(cls) -> "BaseConfig":
        return cls()


def caption_tokenizer(max_length: int = 16):
    """A `CLIPTokenizer` whose vocabulary holds every caption word whole (one token per word)."""
    from transformers import CLIPTokenizer

    from ..tiny import tiny_vocab

    vocab, merges = tiny_vocab(CAPTION_WORDS)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def build_text_encoder(config: BaseConfig, tokenizer, seed: int = 0):
    """A randomly initialised `CLIPTextModel` for `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=config.text_hidden, intermediate_size=2 * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=2, max_position_embeddings=config.max_length,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))


def build_unet(config: BaseConfig, seed: int = 0):
    """A randomly initialised SD-shaped UNet: cross-attention in the lower two resolutions."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=config.block_out_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=config.text_hidden, attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_groups)


def training_scheduler():
    """The forward process: cosine schedule, 1000 steps, v-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def sampling_scheduler():
    """DDIM on the training schedule (deterministic, few steps); "trailing" spacing reaches t = 999."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


def tokenize(tokenizer, captions: Sequence[str]) -> Tensor:
    """Token ids [B, max_length], padded exactly as the pipeline pads prompts."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def drop_captions(ids: Tensor, empty_ids: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Replace each row of `ids` [B, L] by `empty_ids` [L] with probability p (for classifier-free guidance)."""
    drop = torch.rand(len(ids), generator=generator) < p  # [B]
    return torch.where(drop[:, None], empty_ids[None], ids)


def min_snr_v_loss(v_pred: Tensor, v_target: Tensor, snr: Tensor, gamma: float = 5.0) -> Tensor:
    """L = mean_b[ min(SNR_b, gamma) / (SNR_b + 1) * mean |v_pred - v|^2 ]  (min-SNR weighting for v-prediction).

    :param v_pred: shape [B, C, h, w]
    :param v_target: shape [B, C, h, w]
    :param snr: shape [B]
    """
    per_sample = F.mse_loss(v_pred, v_target, reduction="none").flatten(1).mean(1)  # [B]
    return (snr.clamp(max=gamma) / (snr + 1) * per_sample).mean()


def diffusion_loss(predict: Callable[[Tensor, Tensor], Tensor], scheduler, latents: Tensor,
                   generator: torch.Generator, gamma: float = 5.0) -> Tensor:
    """Noise `latents` [B, 4, h, w] at random timesteps and score `predict(x_t, t)` with `min_snr_v_loss`."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    alpha_bar = scheduler.alphas_cumprod[t]  # [B]
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    return min_snr_v_loss(predict(noisy, t), target, alpha_bar / (1 - alpha_bar), gamma)


def base_loss(unet, text_encoder, scheduler, latents: Tensor, ids: Tensor, generator: torch.Generator,
              gamma: float = 5.0) -> Tensor:
    """The base objective for latents [B, 4, h, w] with caption token ids [B, L] (already dropped)."""
    context = text_encoder(ids).last_hidden_state  # [B, L, C]
    return diffusion_loss(lambda x, t: unet(x, t, encoder_hidden_states=context).sample, scheduler, latents,
                          generator, gamma)


@torch.no_grad()
def sample_base(unet, text_encoder, tokenizer, vae, captions: Sequence[str], steps: int = 20,
                guidance_scale: float = 3.0, seed: int = 0) -> Tensor:
    """Images [B, 3, 32, 32] in [-1, 1] for `captions`, with classifier-free guidance against the empty caption."""
    scheduler = sampling_scheduler()
    scheduler.set_timesteps(steps)
    ids = tokenize(tokenizer, [""] * len(captions) + list(captions))
    context = text_encoder(ids).last_hidden_state  # [2B, L, C]
    size = unet.config.sample_size
    x = torch.randn((len(captions), 4, size, size), generator=torch.Generator().manual_seed(seed))
    for t in scheduler.timesteps:
        uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
    return vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)


def background_of(images: Tensor) -> list[str]:
    """The background each image [B, 3, H, W] in [-1, 1] shows, read from its two top corners.

    Stripes are recognised by a large spread of the corner pixels; otherwise the nearest plain colour.
    """
    rgb = (images + 1) * 127.5
    corners = torch.cat([rgb[:, :, :4, :4], rgb[:, :, :4, -4:]], dim=3).flatten(2)  # [B, 3, 32]
    plain = [b for b in BACKGROUNDS if b != "stripes"]
    palette = torch.tensor([_BACKGROUND_RGB[b] for b in plain], dtype=torch.float32)  # [K, 3]
    distances = torch.cdist(corners.mean(2), palette)  # [B, K]
    striped = corners.std(2).mean(1) > 30
    return ["stripes" if s else plain[int(k)] for s, k in zip(striped, distances.argmin(1))]
