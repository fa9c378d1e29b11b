"""IdentityNet: the ControlNet on keypoints whose cross-attention sees the identity tokens."""

import numpy as np
import pytest
import torch

from instantid_lab.attention import install_adapter
from instantid_lab.errors import InputError
from instantid_lab.identitynet import (SDXL_IDENTITYNET_CONFIG, identitynet_from_unet, identitynet_sdxl,
                                       run_identitynet, zero_pad_uncond)
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import ControlWindow, ExtraControlNet, InstantIDPipeline
from instantid_lab.tiny import TINY_KPS, TINY_PROMPT, TinyConfig, tiny_adapter_state, tiny_components, tiny_identitynet, tiny_unet

KPS = np.array(TINY_KPS, np.float32)
PROMPT = TINY_PROMPT


@pytest.fixture(scope="module")
def components():
    return tiny_components("sdxl", seed=0)


@pytest.fixture(scope="module")
def inputs():
    """(latents [2, 4, 8, 8], identity tokens [2, 4, 32], keypoint image [2, 3, 64, 64], added_cond_kwargs)."""
    g = torch.Generator().manual_seed(0)
    image = torch.from_numpy(np.asarray(draw_kps(KPS, (64, 64)), np.float32) / 255).permute(2, 0, 1)
    added = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 32, generator=g), torch.stack([image, image]), added


def residuals(net, inputs, **kw):
    latents, tokens, image, added = inputs
    with torch.no_grad():
        return run_identitynet(net, latents, 500, tokens, image, added_cond_kwargs=added, **kw)


def test_sdxl_identitynet_has_the_published_shapes():
    from accelerate import init_empty_weights

    with init_empty_weights():
        net = identitynet_sdxl()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["controlnet_cond_embedding.conv_in.weight"] == (16, 3, 3, 3)
    assert shapes["controlnet_cond_embedding.conv_out.weight"] == (320, 256, 3, 3)
    assert shapes["add_embedding.linear_1.weight"] == (1280, 2816)
    assert shapes["down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert len(net.controlnet_down_blocks) == 9
    assert SDXL_IDENTITYNET_CONFIG["cross_attention_dim"] == 2048


def test_identitynet_from_unet_copies_the_encoder_and_refuses_after_the_adapter():
    unet = tiny_unet(TinyConfig.sdxl(), seed=0)
    net = identitynet_from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    assert torch.equal(net.down_blocks[1].attentions[0].proj_in.weight, unet.down_blocks[1].attentions[0].proj_in.weight)
    install_adapter(unet)
    with pytest.raises(InputError, match="before|first"):
        identitynet_from_unet(unet)


def test_identitynet_attending_at_every_level_starts_as_the_plain_copy(inputs):
    unet = tiny_unet(TinyConfig.sdxl(), seed=0)
    plain = identitynet_from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    attending = identitynet_from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16), attend_at_every_level=True)
    assert unet.config.down_block_types[0] == "DownBlock2D" and not hasattr(plain.down_blocks[0], "attentions")
    assert len(attending.down_blocks[0].attentions) == unet.config.layers_per_block
    assert torch.equal(attending.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    torch.manual_seed(1)
    for zero_conv in [*plain.controlnet_down_blocks, plain.controlnet_mid_block]:  # make the residuals non-zero
        torch.nn.init.normal_(zero_conv.weight, std=0.1)
    attending.load_state_dict(plain.state_dict(), strict=False)
    (down_plain, mid_plain), (down_attending, mid_attending) = residuals(plain, inputs), residuals(attending, inputs)
    assert down_plain[0].abs().max() > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip([*down_plain, mid_plain], [*down_attending, mid_attending]))
    torch.nn.init.normal_(attending.down_blocks[0].attentions[0].proj_out.weight, std=0.1)  # the new block now speaks
    down_changed, _ = residuals(attending, inputs)
    assert not torch.allclose(down_changed[1], down_plain[1], atol=1e-4)


def test_per_sample_scale_equals_each_samples_float_scale(components, inputs):
    net = components["controlnet"]
    down, mid = residuals(net, inputs, scale=torch.tensor([0.0, 0.7]))
    down_07, mid_07 = residuals(net, inputs, scale=0.7)
    assert all(d[0].abs().max() == 0 for d in down) and mid[0].abs().max() == 0
    for d, d_07 in zip([*down, mid], [*down_07, mid_07]):
        torch.testing.assert_close(d[1], d_07[1], atol=1e-6, rtol=1e-5)
    assert mid_07[1].abs().max() > 0


def test_face_mask_multiplies_every_residual_at_its_resolution(components, inputs):
    net = components["controlnet"]
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., :, 32:] = 1.0  # right half of the image is the face region
    full = residuals(net, inputs)
    masked = residuals(net, inputs, face_mask=mask)
    for f, m in zip([*full[0], full[1]], [*masked[0], masked[1]]):
        half = m.shape[-1] // 2
        assert m[..., :half].abs().max() == 0
        torch.testing.assert_close(m[..., half:], f[..., half:])
    assert len({d.shape[-1] for d in full[0]}) == 3  # three resolutions (8, 4, 2) were masked


def test_guess_mode_residuals_get_a_zero_unconditional_half():
    down, mid = zero_pad_uncond(([torch.ones(2, 3, 4, 4)], torch.ones(2, 5, 2, 2)))
    assert down[0].shape == (4, 3, 4, 4) and mid.shape == (4, 5, 2, 2)
    assert down[0][:2].abs().max() == 0 and down[0][2:].min() == 1


# ----------------------------------------------------------------------------- in the pipeline


@pytest.fixture(scope="module")
def pipe(components):
    return _pipeline(components)


def _pipeline(components, **overrides):
    pipe = InstantIDPipeline(**{**components, **overrides})
    pipe.load_adapter(tiny_adapter_state(components["unet"], seed=4))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kw):
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    kps_image = draw_kps(KPS, (64, 64))
    return pipe(PROMPT, torch.linspace(-3, 3, 16), kps_image, **{**args, **kw}).images


def test_identitynet_scale_zero_equals_no_identitynet(pipe, components):
    zero = generate(pipe, identitynet_scale=0.0)
    assert np.abs(generate(pipe, identitynet_scale=0.8) - zero).max() > 1e-3
    without = _pipeline(components, controlnet=None)
    np.testing.assert_allclose(generate(without), zero, atol=1e-6)


def test_empty_control_window_equals_no_identitynet(pipe):
    np.testing.assert_allclose(generate(pipe, control_guidance_end=0.0), generate(pipe, identitynet_scale=0.0), atol=1e-6)
    late = generate(pipe, control_guidance_start=0.5)  # acts in the second of two steps only
    assert np.abs(late - generate(pipe)).max() > 1e-4


def test_a_zero_face_mask_turns_identity_off_and_leaves_no_state_behind(pipe):
    before = generate(pipe)
    off = generate(pipe, face_mask=np.zeros((64, 64), np.float32))
    np.testing.assert_allclose(off, generate(pipe, adapter_scale=0.0, identitynet_scale=0.0), atol=1e-5)
    np.testing.assert_array_equal(generate(pipe), before)


def test_extra_controlnet_sees_the_text_and_scale_zero_equals_none(pipe):
    extra = tiny_identitynet(tiny_unet(TinyConfig.sdxl(), seed=9), TinyConfig.sdxl(), seed=9)
    seen = []
    hook = extra.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape), with_kwargs=True)
    try:
        image = draw_kps(KPS[::-1].copy(), (64, 64))
        plain = generate(pipe)
        np.testing.assert_allclose(generate(pipe, extra_controlnets=[extra], extra_images=[image], extra_scales=0.0),
                                   plain, atol=1e-6)
        assert np.abs(generate(pipe, extra_controlnets=[extra], extra_images=[image], extra_scales=1.0) - plain).max() > 1e-4
    finally:
        hook.remove()
    assert seen and all(shape[1] == 77 for shape in seen)  # text tokens, not the 4 identity tokens


def test_extra_controlnet_records_equal_the_parallel_lists(pipe):
    extra = tiny_identitynet(tiny_unet(TinyConfig.sdxl(), seed=9), TinyConfig.sdxl(), seed=9)
    image = draw_kps(KPS[::-1].copy(), (64, 64))
    lists = generate(pipe, extra_controlnets=[extra], extra_images=[image], extra_scales=0.7,
                     control_guidance_start=[0.0, 0.5])                   # the extra acts in the second step only
    records = generate(pipe, extra_controlnets=[ExtraControlNet(extra, image, 0.7, ControlWindow(0.5, 1.0))])
    np.testing.assert_array_equal(lists, records)
    assert np.abs(records - generate(pipe, extra_controlnets=[ExtraControlNet(extra, image, 0.7)])).max() > 1e-5
    with pytest.raises(InputError, match="extra_images"):
        generate(pipe, extra_controlnets=[ExtraControlNet(extra, image)], extra_images=[image])
    with pytest.raises(InputError, match="mixes"):
        generate(pipe, extra_controlnets=[ExtraControlNet(extra, image), extra], extra_images=[image])
    with pytest.raises(InputError, match="numbers"):
        generate(pipe, extra_controlnets=[ExtraControlNet(extra, image)], control_guidance_end=[1.0, 0.5])
