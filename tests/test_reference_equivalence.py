"""The kit's pipeline computes what the released InstantID code computes.

The reference semantics are re-implemented here, independently and in the released code's
style: identity tokens appended after the text tokens and split again by position inside an
attention processor; IdentityNet called with the identity tokens; a denoising loop written out
step by step. Both run on identical tiny SDXL-shaped weights, scheduler, seed and inputs.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from instantid_lab.adapter import Resampler
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.tiny import TINY_KPS, tiny_adapter_state, tiny_components, tiny_embedding

PROMPT = "a photo of an astronaut in space"
KPS = TINY_KPS
STEPS, GUIDANCE, ADAPTER_SCALE, IDENTITYNET_SCALE, SEED = 3, 5.0, 0.8, 0.8, 7


class ReferenceIPAttnProcessor(torch.nn.Module):
    """Cross-attention of the released code: the last `num_tokens` context tokens are the
    identity tokens; they get their own key/value projections and a separate softmax."""

    def __init__(self, hidden_size, cross_attention_dim, scale, num_tokens):
        super().__init__()
        self.scale, self.num_tokens = scale, num_tokens
        self.to_k_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = torch.nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        end_pos = encoder_hidden_states.shape[1] - self.num_tokens
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end_pos], encoder_hidden_states[:, end_pos:]

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        ip_key = self.to_k_ip(ip_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_value = self.to_v_ip(ip_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ip_hidden_states = F.scaled_dot_product_attention(query, ip_key, ip_value)
        ip_hidden_states = ip_hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = hidden_states + self.scale * ip_hidden_states
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_reference_processors(unet, ip_adapter_state, scale, num_tokens):
    """AttnProcessor2_0 on self-attention, ReferenceIPAttnProcessor (checkpoint weights) on cross-attention."""
    processors = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        weight_k, weight_v = ip_adapter_state[f"{i}.to_k_ip.weight"], ip_adapter_state[f"{i}.to_v_ip.weight"]
        proc = ReferenceIPAttnProcessor(weight_k.shape[0], weight_k.shape[1], scale, num_tokens)
        proc.to_k_ip.weight.data.copy_(weight_k)
        proc.to_v_ip.weight.data.copy_(weight_v)
        processors[name] = proc
    unet.set_attn_processor(processors)


@torch.no_grad()
def reference_generate(c, image_proj, face_emb, kps_image):
    """The released pipeline's computation, step by step."""
    # 1. prompt: penultimate hidden states of both encoders, pooled from the second; zero negatives
    prompt_embeds_list = []
    for tokenizer, text_encoder in [(c["tokenizer"], c["text_encoder"]), (c["tokenizer_2"], c["text_encoder_2"])]:
        ids = tokenizer([PROMPT], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = text_encoder(ids, output_hidden_states=True)
        pooled_prompt_embeds = out[0]
        prompt_embeds_list.append(out.hidden_states[-2])
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    negative_prompt_embeds = torch.zeros_like(prompt_embeds)
    negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)

    # 2. identity tokens; the negative identity is the Resampler of a zero embedding
    face_emb = torch.as_tensor(face_emb).reshape(1, -1)
    prompt_image_emb = image_proj(torch.cat([torch.zeros_like(face_emb), face_emb]))  # [2, 16, C]

    # 3. identity tokens concatenated after the text tokens
    prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
    encoder_hidden_states = torch.cat([prompt_embeds, prompt_image_emb], dim=1)
    add_text_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
    height, width = kps_image.size[1], kps_image.size[0]
    add_time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)
    added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}

    # 4. keypoint image in [0, 1], doubled for guidance
    image = torch.from_numpy(np.array(kps_image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    image = torch.cat([image] * 2)

    # 5. latents
    scheduler = c["scheduler"]
    scheduler.set_timesteps(STEPS)
    shape = (1, 4, height // 8, width // 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(SEED)) * scheduler.init_noise_sigma

    # 6. denoising loop
    for t in scheduler.timesteps:
        latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        down_block_res_samples, mid_block_res_sample = c["controlnet"](
            latent_model_input, t, encoder_hidden_states=prompt_image_emb, controlnet_cond=image,
            conditioning_scale=IDENTITYNET_SCALE, guess_mode=False, added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        noise_pred = c["unet"](
            latent_model_input, t, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down_block_res_samples, mid_block_additional_residual=mid_block_res_sample,
            added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )[0]
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    # 7. decode
    decoded = c["vae"].decode(latents / c["vae"].config.scaling_factor, return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def setup():
    components = tiny_components("sdxl", seed=3)
    state = tiny_adapter_state(components["unet"], seed=4)
    kps_image = draw_kps(np.array(KPS, np.float32), (64, 64))
    return components, state, kps_image, tiny_embedding(16, seed=5).numpy()


def test_kit_pipeline_matches_the_reference_computation(setup):
    components, state, kps_image, face_emb = setup
    pipe = InstantIDPipeline(**components)
    pipe.load_adapter(state)
    pipe.set_progress_bar_config(disable=True)
    kit = pipe(PROMPT, face_emb, kps_image, adapter_scale=ADAPTER_SCALE, identitynet_scale=IDENTITYNET_SCALE,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
               output_type="np").images

    image_proj = Resampler.from_state_dict(state["image_proj"]).eval()
    set_reference_processors(components["unet"], state["ip_adapter"], ADAPTER_SCALE, image_proj.config.num_queries)
    reference = reference_generate(components, image_proj, face_emb, kps_image)

    assert kit.shape == reference.shape == (1, 64, 64, 3)
    assert np.abs(kit - reference).max() <= 1e-3
    # the comparison can fail: without the identity the reference gives another image
    changed = reference_generate(components, image_proj, face_emb * 0 + 1.0, kps_image)
    assert np.abs(changed - reference).max() > 1e-2
