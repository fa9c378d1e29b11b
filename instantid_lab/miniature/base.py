"""The miniature's base model: caption-conditioned latent diffusion, trained once and then frozen.

A small CLIP text encoder (on a word-level vocabulary of the miniature's captions) and an SD-shaped
`UNet2DConditionModel` on the autoencoder's 16x16x8 latents are trained jointly, the caption dropped
(replaced by the empty prompt) 10% of the time so that classifier-free guidance works. The base knows
captions (background, expression, accessory, style) but no particular identity: identities are
drawn afresh for every render from 100k training ids. The caption reaches the UNet twice: through
cross-attention at the two lower resolutions, and pooled (attention pooling, diffusers' "text" addition
embedding) into the time embedding, so every ResNet block at every resolution sees it — global
attributes like the drawing style and the expression need that at 32 px.

Objective (v-prediction with min-SNR weighting, Hang et al. 2023), with alpha_bar_t from a cosine
schedule, x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps and SNR_t = alpha_bar / (1 - alpha_bar):

    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0,
    L = E_t[ min(SNR_t, gamma) / (SNR_t + 1) * |v_theta(x_t, t, c) - v|^2 ],   gamma = 5.

The objective lives in `objective` (`diffusion_loss`); the InstantID stage trains its parts with it too.
`load_base` returns the trained base as an `InstantIDPipeline` with no adapter and no IdentityNet: the
plain text-to-image model, sampled by the same pipeline as everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..building import word_tokenizer
from ..errors import ModelFilesMissingError
from ..pipeline import InstantIDPipeline
from .autoencoder import load_vae
from .world import ACCESSORIES, BACKGROUNDS, EXPRESSIONS, STYLES

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
    caption_embedding: bool = True  # also pool the caption into the time embedding (every ResNet block sees it)
    steps: int = 6000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    train_images: int = 24000
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
    return word_tokenizer(CAPTION_WORDS, max_length)


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


def build_unet(config: BaseConfig, latent_channels: int = 4, seed: int = 0):
    """A randomly initialised SD-shaped UNet on `latent_channels`-channel latents: cross-attention in the
    lower two resolutions, and (`config.caption_embedding`) the caption pooled into the time embedding."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        addition_embed_type="text" if config.caption_embedding else None,
        addition_embed_type_num_heads=config.attention_heads,
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




#: The miniature's sampler defaults (DDIM, `sampling_scheduler`): denoising steps and classifier-free guidance
#: scale. The notebooks, the evaluation protocol, the experiments and the lab sample with these unless told
#: otherwise. Guidance 3.5 was chosen on validation identities (model card, "Sampler"): more guidance draws the
#: caption better and the identity worse.
SAMPLING_STEPS = 20
GUIDANCE_SCALE = 3.5

#: The base's parts, each a diffusers / transformers folder in the miniature's folder.
BASE_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def save_base(pipe: InstantIDPipeline, folder: Path) -> None:
    """Save the text encoder, tokenizer, UNet and scheduler of `pipe` into `folder` (the VAE is saved by its stage)."""
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        part = getattr(pipe, name)
        safe = {"safe_serialization": True} if isinstance(part, torch.nn.Module) else {}
        part.save_pretrained(str(Path(folder) / name), **safe)


def load_base(folder: Path) -> InstantIDPipeline:
    """The trained base as an `InstantIDPipeline` with no adapter and no IdentityNet, every part frozen (float32).

    :raises ModelFilesMissingError: a part is missing (names them and the stage that writes them).
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    missing = [p for p in BASE_PARTS if not (folder / p).is_dir()]
    if missing:
        raise ModelFilesMissingError(f"{folder} lacks {missing}: train the miniature first "
                                     f"(python -m instantid_lab.miniature.train autoencoder|base --out {folder})")
    text_encoder = _quietly(CLIPTextModel.from_pretrained, folder / "text_encoder", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    pipe = InstantIDPipeline(load_vae(folder), text_encoder, None, CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                             None, unet, None, DDIMScheduler.from_pretrained(folder / "scheduler"))
    for model in (pipe.vae, pipe.text_encoder, pipe.unet):
        model.eval().requires_grad_(False)
    return pipe


def _quietly(load, *args, **kwargs):
    """`load(*args, **kwargs)` without transformers' per-file progress bar (a 0.1 M-parameter model loads at once)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
