"""Tiny random components with the real architecture, for tests and quick demos only.

Everything is built offline from configs with seeded random weights: no file is read and
nothing is downloaded. Two shapes:

- "sdxl": UNet with the "text_time" embedding, two CLIP text encoders (CLIPTextModel and
  CLIPTextModelWithProjection) whose hidden sizes concatenate to the UNet's cross-attention
  width, two tokenizers, an 8x VAE, Euler scheduler, IdentityNet.
- "sd": no "text_time", one text encoder; `text_encoder_2` and `tokenizer_2` are None.

Sizes: channels 8-32, 64 x 64 pixels (8 x 8 latents), a few steps. The images mean nothing;
the tiny stack exists to check behaviours (shapes, batching, "scale 0 equals no adapter").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .building import byte_alphabet, seeded, word_tokenizer, word_vocab  # noqa: F401 (byte_alphabet: re-exported)
from .errors import InputError

#: Words the tiny tokenizer knows as whole tokens (anything else is spelled byte by byte).
#: A frontal face's 5 keypoints on a 64x64 canvas (left eye, right eye, nose, mouth corners): the tests' pose.
TINY_KPS = ((22.0, 26.0), (42.0, 25.0), (32.0, 36.0), (24.0, 46.0), (41.0, 45.0))
#: The tests' prompt; every word is in the tiny vocabulary.
TINY_PROMPT = "a photo of an astronaut"

TINY_WORDS = (
    "a photo of an astronaut portrait person man woman in space suit smiling face the with "
    "watercolor painting film noir neon jungle mars snow line art blurry low quality"
).split()


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny stack.

    :param kind: "sdxl" (text_time, two text encoders) or "sd" (one text encoder).
    :param unet_channels: UNet block widths; the first block has no attention.
    :param transformer_layers: transformer layers per UNet block (SDXL: 1, 2, 10).
    :param heads: attention heads per UNet block.
    :param text_hidden: hidden size of each text encoder; they sum to the cross-attention width.
    :param projection_dim: pooled-text projection of the second encoder ("sdxl").
    :param time_embed_dim: width of each of the 6 time-id embeddings ("sdxl").
    :param vae_channels: VAE block widths; 4 blocks = 8x downsampling, as SDXL's.
    :param condition_channels: IdentityNet's keypoint-image encoder (4 entries = 8x).
    :param sample_size: latent side; pixels = sample_size * 8.
    :param max_length: tokens per prompt.
    """

    kind: str = "sdxl"
    unet_channels: tuple = (16, 32, 32)
    transformer_layers: tuple = (1, 1, 2)
    heads: tuple = (2, 4, 4)
    text_hidden: tuple = (16, 16)
    projection_dim: int = 16
    time_embed_dim: int = 8
    vae_channels: tuple = (8, 8, 16, 16)
    condition_channels: tuple = (8, 8, 16, 16)
    sample_size: int = 8
    max_length: int = 77
    norm_groups: int = 8

    @classmethod
    def sdxl(cls, **over) -> "TinyConfig":
        """SDXL-shaped: [Down, CrossAttnDown, CrossAttnDown], text_time, two text encoders."""
        return cls(**over)

    @classmethod
    def sd(cls, **over) -> "TinyConfig":
        """SD-1.5-shaped: [CrossAttnDown, Down], one text encoder of width 32."""
        sizes = dict(kind="sd", unet_channels=(16, 32), transformer_layers=(1, 1), heads=(2, 4), text_hidden=(32,))
        return cls(**{**sizes, **over})

    @property
    def cross_attention_dim(self) -> int:
        return sum(self.text_hidden)

    @property
    def image_size(self) -> int:
        return self.sample_size * 2 ** (len(self.vae_channels) - 1)


def as_config(kind_or_config) -> TinyConfig:
    """"sdxl" / "sd" / a `TinyConfig` -> `TinyConfig`."""
    if isinstance(kind_or_config, TinyConfig):
        return kind_or_config
    presets = {"sdxl": TinyConfig.sdxl, "sd": TinyConfig.sd}
    if kind_or_config not in presets:
        raise InputError(f"kind must be 'sdxl' or 'sd' (or a TinyConfig), got {kind_or_config!r}")
    return presets[kind_or_config]()


# ----------------------------------------------------------------------------- tokenizer


def tiny_vocab(words=TINY_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny byte-level BPE vocabulary: `building.word_vocab` of `words` (each one token)."""
    return word_vocab(words)


def tiny_tokenizer(max_length: int = 77):
    """A `CLIPTokenizer` on the tiny vocabulary (lower-cases, pads with `<|endoftext|>`)."""
    return word_tokenizer(TINY_WORDS, max_length)


@lru_cache(maxsize=1)
def _cached_vocab():
    return tiny_vocab()


# ----------------------------------------------------------------------------- models


def tiny_text_encoders(config: TinyConfig, seed: int = 0) -> tuple:
    """(CLIPTextModel, CLIPTextModelWithProjection or None), widths `config.text_hidden`."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if config.kind == "sd":
        with seeded(seed):
            return CLIPTextModel(_text_config(config, config.text_hidden[0])).eval(), None
    with seeded(seed):
        first = CLIPTextModel(_text_config(config, config.text_hidden[0])).eval()
        second = CLIPTextModelWithProjection(_text_config(config, config.text_hidden[1])).eval()
    return first, second


def _text_config(config: TinyConfig, hidden: int):
    from transformers import CLIPTextConfig

    vocab, _ = _cached_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=config.max_length, projection_dim=config.projection_dim,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )


def tiny_unet(config: TinyConfig, seed: int = 0):
    """A `UNet2DConditionModel` with the block layout of SDXL (or SD) at tiny widths."""
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        return UNet2DConditionModel(**_unet_kwargs(config)).eval()


def _unet_kwargs(config: TinyConfig) -> dict:
    sdxl = config.kind == "sdxl"
    down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") if sdxl else ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D") if sdxl else ("UpBlock2D", "CrossAttnUpBlock2D")
    kwargs = dict(
        sample_size=config.sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=config.unet_channels, down_block_types=down, up_block_types=up,
        transformer_layers_per_block=config.transformer_layers, attention_head_dim=config.heads,
        cross_attention_dim=config.cross_attention_dim, norm_num_groups=config.norm_groups,
        use_linear_projection=sdxl,
    )
    if sdxl:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=config.time_embed_dim,
                      projection_class_embeddings_input_dim=config.projection_dim + 6 * config.time_embed_dim)
    return kwargs


def tiny_vae(config: TinyConfig, seed: int = 0):
    """An `AutoencoderKL` with 4 latent channels and 8x downsampling (SDXL's scaling factor)."""
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    with seeded(seed):
        return AutoencoderKL(
            block_out_channels=config.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4, layers_per_block=1,
            norm_num_groups=config.norm_groups, sample_size=config.image_size, scaling_factor=0.13025,
        ).eval()


def tiny_scheduler():
    """`EulerDiscreteScheduler` with the SDXL 1.0 schedule (scaled-linear betas 0.00085 to 0.012)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )


def tiny_identitynet(unet, config: TinyConfig, seed: int = 0):
    """IdentityNet copied from `unet`'s encoder, its zero convolutions given random weights.

    A fresh ControlNet's output convolutions are zero (so training starts from "no effect");
    random ones make its effect visible, which tests of "scale 0 equals no IdentityNet" need.
    """
    from .identitynet import identitynet_from_unet

    with seeded(seed), torch.no_grad():
        net = identitynet_from_unet(unet, conditioning_embedding_out_channels=config.condition_channels)
        zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        for conv in zero_convs:
            conv.reset_parameters()
    return net.eval()


def tiny_controlnet(kind="sdxl", seed: int = 0):
    """A random ControlNet of the tiny shape (an "extra" ControlNet such as pose, canny or depth)."""
    config = as_config(kind)
    return tiny_identitynet(tiny_unet(config, seed), config, seed)


def tiny_components(kind="sdxl", seed: int = 0) -> dict:
    """All pipeline components except the adapter, as keyword arguments of `InstantIDPipeline`.

    :param kind: "sdxl", "sd" or a `TinyConfig`.
    :param seed: seeds every model (each model gets its own offset of it).
    """
    config = as_config(kind)
    unet = tiny_unet(config, seed)
    text_encoder, text_encoder_2 = tiny_text_encoders(config, seed + 1)
    return dict(
        vae=tiny_vae(config, seed + 2),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(config.max_length),
        tokenizer_2=tiny_tokenizer(config.max_length) if text_encoder_2 is not None else None,
        unet=unet,
        controlnet=tiny_identitynet(unet, config, seed + 3),
        scheduler=tiny_scheduler(),
    )


def tiny_adapter_state(unet, seed: int = 0, embedding_dim: int = 16) -> dict:
    """A random adapter checkpoint for `unet`, in the released layout
    {"image_proj": Resampler state dict, "ip_adapter": {"1.to_k_ip.weight": ..., ...}}.

    :param embedding_dim: width of the identity embedding the Resampler takes.
    """
    from .adapter import Resampler, ResamplerConfig
    from .checkpoint import expected_ip_adapter_shapes

    config = ResamplerConfig.tiny(output_dim=unet.config.cross_attention_dim, embedding_dim=embedding_dim)
    with seeded(seed):
        image_proj = Resampler(config).state_dict()
        ip_adapter = {k: torch.randn(shape) / shape[-1] ** 0.5 for k, shape in expected_ip_adapter_shapes(unet).items()}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def tiny_pipeline(kind="sdxl", seed: int = 0, embedding_dim: int = 16, scheduler=None):
    """A tiny `InstantIDPipeline` with a random adapter installed and the progress bar off.

    :param kind: "sdxl", "sd" or a `TinyConfig`.
    :param seed: seeds every random weight.
    :param embedding_dim: width of the identity embedding (16; 512 to take antelopev2 vectors).
    :param scheduler: another diffusers scheduler instance, if not Euler.
    """
    from .pipeline import InstantIDPipeline

    components = tiny_components(kind, seed)
    if scheduler is not None:
        components["scheduler"] = scheduler
    pipe = InstantIDPipeline(**components)
    pipe.load_adapter(tiny_adapter_state(pipe.unet, seed + 4, embedding_dim))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_embedding(dim: int = 16, seed: int = 0, norm: Optional[float] = 20.0) -> torch.Tensor:
    """A random identity embedding of shape [dim], scaled to `norm` (raw antelopev2 vectors are ~15-25)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(dim, generator=g)
    return e if norm is None else e / e.norm() * norm
