"""The miniature's InstantID stage: the kit's own Resampler, decoupled attention and IdentityNet,
trained on top of the frozen miniature base with the base's objective (`objective.denoising_loss`).

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
from ..checkpoint import save_adapter_state
from ..identitynet import identitynet_from_unet
from ..keypoints import draw_kps
from ..pipeline import InstantIDPipeline
from .base import load_base

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
    identitynet_attends_everywhere: bool = False  # IdentityNet also attends to the identity at 16x16 (the UNet does not)
    steps: int = 9600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    identity_dropout: float = 0.1  # zero embedding: what the pipeline's negative identity uses
    adapter_only: float = 0.0  # fraction of samples trained with IdentityNet off (`objective.drop_paths`)
    identitynet_only: float = 0.0  # fraction of samples trained with the adapter off
    min_snr_gamma: Optional[float] = 5.0  # None: the plain v-prediction loss (`objective.min_snr_v_loss`)
    timestep_draws: int = 2  # each training timestep is the noisiest of this many uniform draws (1: uniform)
    identity_loss: float = 0.0  # weight of the identity term (`objective.IdentityTerm`; 0: the paper's loss alone)
    other_reference: float = 0.0  # fraction of training embeddings taken from another render of the identity
    ema_decay: Optional[float] = 0.999  # ship the weights' moving average (None: the last weights)
    train_images: int = 24000
    checkpoint_every: int = 500
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
        identitynet = identitynet_from_unet(unet, conditioning_embedding_out_channels=config.conditioning_channels,
                                            attend_at_every_level=config.identitynet_attends_everywhere)
        identitynet.requires_grad_(True)
        processors = install_adapter(unet)
        resampler = Resampler(ResamplerConfig.mini(
            dim=config.resampler_dim, depth=config.resampler_depth, embedding_dim=config.embedding_dim,
            output_dim=unet.config.cross_attention_dim))
        return cls(resampler, processors, identitynet)

    def adapter_state(self) -> dict:
        """The adapter in the released layout: {"image_proj": Resampler weights, "ip_adapter": processor weights}."""
        return {"image_proj": self.image_proj.state_dict(), "ip_adapter": self.ip_adapter.state_dict()}

    def attach(self, base: InstantIDPipeline) -> InstantIDPipeline:
        """A pipeline sharing `base`'s parts, with these as its IdentityNet and Resampler (e.g. during training).

        :param base: the plain base pipeline whose UNet these parts were built on (it carries their
            attention processors), e.g. `base.load_base(folder)`.
        """
        return InstantIDPipeline(**{**base.components, "controlnet": self.identitynet, "image_proj": self.image_proj})

    def save(self, out: Path) -> None:
        """The adapter as `out/instantid_adapter.safetensors` (released layout), IdentityNet as `out/identitynet`."""
        save_adapter_state(self.adapter_state(), Path(out) / ADAPTER_FILE)
        self.identitynet.save_pretrained(str(Path(out) / "identitynet"), safe_serialization=True)


def keypoint_tensor(kps_list: Sequence[np.ndarray], size: int = 32) -> Tensor:
    """Keypoint images of many faces as uint8 [N, 3, size, size] (divide by 255 for the [0, 1] input)."""
    arrays = np.stack([np.asarray(keypoint_image(k, size)) for k in kps_list])  # [N, H, W, 3]
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def load_miniature(folder: Path, instantid: Optional[Path] = None) -> InstantIDPipeline:
    """The trained miniature as an `InstantIDPipeline` (SD-shaped; IdentityNet and adapter if trained).

    :param folder: holds vae/, text_encoder/, tokenizer/, unet/, scheduler/ and optionally identitynet/
        and `instantid_adapter.safetensors` (as written by `python -m instantid_lab.miniature.train`).
    :param instantid: take identitynet/ and the adapter from this folder instead (a retrained InstantID
        on the same base).
    :raises ModelFilesMissingError: a base part is missing.
    """
    from diffusers import ControlNetModel

    pipe = load_base(folder)
    parts = Path(instantid) if instantid is not None else Path(folder)
    if (parts / "identitynet").is_dir():
        pipe.register_modules(controlnet=ControlNetModel.from_pretrained(parts / "identitynet", torch_dtype=torch.float32))
    if (parts / ADAPTER_FILE).exists():
        pipe.load_adapter(parts / ADAPTER_FILE)
    return pipe
