"""The released adapter layout loads through diffusers' own IP-Adapter path and gives the kit's images.

diffusers can load InstantID's `ip-adapter` file as an "IP-Adapter Plus" (a Resampler taking a
512-d embedding, 16 queries; it assumes 64-wide heads) with `load_ip_adapter(...,
image_encoder_folder=None)` and sums the two attentions with `IPAdapterAttnProcessor2_0`. With
IdentityNet off, the kit's pipeline and diffusers' `StableDiffusionXLPipeline` must then agree.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from instantid_lab.adapter import Resampler, ResamplerConfig
from instantid_lab.checkpoint import expected_ip_adapter_shapes, save_adapter_state
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.tiny import TINY_PROMPT, tiny_components

PROMPT = TINY_PROMPT


def diffusers_compatible_state(unet, seed=0) -> dict:
    """A random adapter checkpoint in the released layout, at sizes diffusers' loader can infer."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=16, embedding_dim=512,
                             output_dim=unet.config.cross_attention_dim)
    ip = {k: torch.randn(s, generator=g) / s[1] ** 0.5 for k, s in expected_ip_adapter_shapes(unet).items()}
    return {"image_proj": Resampler(config).state_dict(), "ip_adapter": ip}


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    components = tiny_components("sdxl", seed=0)
    state = diffusers_compatible_state(components["unet"])
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter_state(state, folder / "ip-adapter.safetensors")
    return state, folder


@torch.no_grad()
def test_diffusers_load_ip_adapter_gives_the_kit_image(state):
    state, folder = state
    embedding = torch.randn(512, generator=torch.Generator().manual_seed(1)) * 20  # raw, not normalised

    kit_components = tiny_components("sdxl", seed=0)
    kit_components["controlnet"] = None  # IdentityNet off: the image adapter alone
    kit = InstantIDPipeline(**kit_components)
    kit.load_adapter(state)
    ours = kit(PROMPT, embedding, adapter_scale=0.8, num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(7), output_type="np").images

    theirs_components = tiny_components("sdxl", seed=0)
    theirs_components.pop("controlnet")
    native = StableDiffusionXLPipeline(**theirs_components)
    native.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    native.set_ip_adapter_scale(0.8)
    negative = torch.zeros(512)  # InstantID's negative identity: the Resampler of a zero vector
    embeds = torch.stack([negative, embedding])[:, None, None, :]  # [2B, 1, 1, 512], negative half first
    theirs = native(PROMPT, ip_adapter_image_embeds=[embeds], num_inference_steps=3, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(7), output_type="np").images

    assert ours.shape == theirs.shape
    print(f"max abs pixel difference, kit vs diffusers: {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() < 1e-4

    without = kit(PROMPT, embedding, adapter_scale=0.0, num_inference_steps=3, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(7), output_type="np").images
    assert np.abs(ours - without).max() > 1e-3  # the adapter did something, so the match means something
