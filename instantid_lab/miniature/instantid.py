"""The miniature's InstantID stage: the kit's own Resampler, decoupled attention and IdentityNet,
trained on top of the frozen miniature base with the base's objective (`base.diffusion_loss`).

Per training sample: the latent of a rendered face, its caption, the conditioning recogniser's
embedding of the same image (64-d, unit norm) and its keypoint image. The identity embedding goes
through the Resampler to 16 identity tokens; the UNet's cross-attention layers attend to them through
their own key/value projections (`attention.install_adapter`), and IdentityNet (a ControlNet copied
from the UNet's encoder) sees the keypoint image and the identity tokens. Only these parts train.

As in the released layout, the adapter is saved as {"image_proj", "ip_adapter"} and IdentityNet as a
diffusers ControlNet folder, so generation is `InstantIDPipeline` + `load_adapter` (`load_miniature`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..adapter import Resampler, ResamplerConfig
from ..attention import install_adapter
from ..errors import ModelFilesMissingError
from ..identitynet import identitynet_from_unet, run_identitynet
from ..keypoints import draw_kps

#: The keypoint image is drawn at this size with the release's `draw_kps` (radius 10, stick width 4),
#: then box-downsampled to the image size: at 32 px a point is a ~5 px disc, the limbs ~1 px.
KEYPOINT_CANVAS = 128
ADAPTER_FILE = "instantid_adapter.safetensors"


def keypoint_image(kps: np.ndarray, size: int = 32) -> Image.Image:
    """The miniature's keypoint image: `draw_kps` at `KEYPOINT_CANVAS` px, box-downsampled to `size`.

    :param kps: shape [5, 2], pixels in a `size` x `size` image.
    """
    factor = KEYPOINT_CANVAS / size
    drawn = draw_kps(np.asarray(kps, dtype=np.float64) * factor, (KEYPOINT_CANVAS, KEYPOINT_CANVAS))
    return drawn.resize((size, size), Image.BOX)


@dataclass(frozen=True)
class InstantIDConfig:
    """Sizes and training settings of the miniature's InstantID parts."""

    resampler_dim: int = 128
    resampler_depth: int = 2
    embedding_dim: int = 64  # the conditioning recogniser's output
    conditioning_channels: tuple = (16, 32)  # one 2x downsampling: 32 px keypoint image -> 16x16 latents
    steps: int = 11000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    identity_dropout: float = 0.1  # zero embedding: what the pipeline's negative identity uses
    min_snr_gamma: float = 5.0
    train_images: int = 24000
    checkpoint_every: int = 100
    eval_identities: int = 48

    @classmethod
    def quick(cls) -> "InstantIDConfig":
        return cls(resampler_dim=32, resampler_depth=1, steps=6, batch_size=4, warmup=1, train_images=32,
                   checkpoint_every=3, eval_identities=0)

    @classmethod
    def full(cls) -> "InstantIDConfig":
        return cls()


class InstantIDParts(nn.Module):
    """The trainable parts; state-dict prefixes equal the checkpoint's ("image_proj", "ip_adapter") plus IdentityNet."""

    def __init__(self, image_proj: Resampler, ip_adapter: nn.ModuleList, identitynet: nn.Module):
        super().__init__()
        self.image_proj, self.ip_adapter, self.identitynet = image_proj, ip_adapter, identitynet

    @classmethod
    def build(cls, unet, config: InstantIDConfig, seed: int = 0) -> "InstantIDParts":
        """Freeze `unet`, copy IdentityNet from its encoder, THEN install the adapter on it (in place)."""
        unet.requires_grad_(False)
        torch.manual_seed(seed)
        identitynet = identitynet_from_unet(unet, conditioning_embedding_out_channels=config.conditioning_channels)
        identitynet.requires_grad_(True)
        processors = install_adapter(unet)
        resampler = Resampler(ResamplerConfig.mini(
            dim=config.resampler_dim, depth=config.resampler_depth, embedding_dim=config.embedding_dim,
            output_dim=unet.config.cross_attention_dim))
        return cls(resampler, processors, identitynet)

    def adapter_state(self) -> dict:
        """The adapter in the released layout: {"image_proj": Resampler weights, "ip_adapter": processor weights}."""
        return {"image_proj": self.image_proj.state_dict(), "ip_adapter": self.ip_adapter.state_dict()}

    def pipeline(self, vae, text_encoder, tokenizer, unet, base: Path):
        """An `InstantIDPipeline` that generates with these parts as they are (e.g. during training).

        :param unet: the UNet these parts were built on (it carries their attention processors).
        :param base: folder of the base, for its scheduler.
        """
        from diffusers import DDIMScheduler

        from ..pipeline import InstantIDPipeline

        scheduler = DDIMScheduler.from_pretrained(Path(base) / "scheduler")
        return InstantIDPipeline(vae, text_encoder, None, tokenizer, None, unet, self.identitynet, scheduler,
                                 image_proj=self.image_proj)

    def save(self, out: Path) -> None:
        from ..checkpoint import save_adapter_state

        save_adapter_state(self.adapter_state(), Path(out) / ADAPTER_FILE)
        self.identitynet.save_pretrained(str(Path(out) / "identitynet"), safe_serialization=True)


def predict(parts: InstantIDParts, unet, noisy: Tensor, t: Tensor, text_tokens: Tensor, embeds: Tensor,
            kps_images: Tensor) -> Tensor:
    """The UNet's prediction with both InstantID paths, as the pipeline computes it (scales 1).

    :param noisy: shape [B, 4, h, w]
    :param text_tokens: shape [B, L, C]
    :param embeds: identity embeddings, shape [B, E]
    :param kps_images: keypoint images, shape [B, 3, H, W] in [0, 1]
    """
    identity_tokens = parts.image_proj(embeds)  # [B, 16, C]
    down, mid = run_identitynet(parts.identitynet, noisy, t, identity_tokens, kps_images)
    return unet(noisy, t, encoder_hidden_states=text_tokens, down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                cross_attention_kwargs={"identity_tokens": identity_tokens, "adapter_scale": 1.0}).sample


def drop_identities(embeds: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Zero each row of `embeds` [B, E] with probability p (the zero vector is the negative identity)."""
    keep = torch.rand(len(embeds), generator=generator) >= p  # [B]
    return embeds * keep[:, None]


def keypoint_tensor(kps_list: Sequence[np.ndarray], size: int = 32) -> Tensor:
    """Keypoint images of many faces as uint8 [N, 3, size, size] (divide by 255 for the [0, 1] input)."""
    arrays = np.stack([np.asarray(keypoint_image(k, size)) for k in kps_list])  # [N, H, W, 3]
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def load_miniature(folder: Path, instantid: Optional[Path] = None):
    """The trained miniature as an `InstantIDPipeline` (SD-shaped; IdentityNet and adapter if trained).

    :param folder: holds vae/, text_encoder/, tokenizer/, unet/, scheduler/ and optionally identitynet/
        and `instantid_adapter.safetensors` (as written by `python -m instantid_lab.miniature.train`).
    :param instantid: take identitynet/ and the adapter from this folder instead (a retrained InstantID
        on the same base).
    :raises ModelFilesMissingError: a base part is missing.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..pipeline import InstantIDPipeline

    folder = Path(folder)
    missing = [p for p in ("vae", "text_encoder", "tokenizer", "unet", "scheduler") if not (folder / p).is_dir()]
    if missing:
        raise ModelFilesMissingError(f"{folder} lacks {missing}: train the miniature first "
                                     f"(python -m instantid_lab.miniature.train autoencoder|base --out {folder})")
    parts = Path(instantid) if instantid is not None else folder
    f32 = {"torch_dtype": torch.float32}
    has_identitynet = (parts / "identitynet").is_dir()
    identitynet = ControlNetModel.from_pretrained(parts / "identitynet", **f32) if has_identitynet else None
    pipe = InstantIDPipeline(
        AutoencoderKL.from_pretrained(folder / "vae", **f32),
        _quietly(CLIPTextModel.from_pretrained, folder / "text_encoder", **f32), None,
        CLIPTokenizer.from_pretrained(folder / "tokenizer"), None,
        UNet2DConditionModel.from_pretrained(folder / "unet", **f32), identitynet,
        DDIMScheduler.from_pretrained(folder / "scheduler"))
    if (parts / ADAPTER_FILE).exists():
        pipe.load_adapter(parts / ADAPTER_FILE)
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
