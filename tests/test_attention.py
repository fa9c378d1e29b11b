"""Decoupled cross-attention: the equation, its wiring into a UNet, scales, regions, capture,
and agreement with diffusers' own IP-Adapter path."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from attention_inputs import identity_layer, qkv
from instantid_lab.adapter import Resampler, ResamplerConfig
from instantid_lab.attention import (
    IdentityAttnProcessor,
    PlainAttnProcessor,
    adapter_processors,
    capture_attention,
    decoupled_cross_attention,
    identity_processors,
    install_adapter,
    remove_adapter,
    set_layer_scale,
    token_grid,
)
from instantid_lab.checkpoint import expected_ip_adapter_shapes
from instantid_lab.errors import InputError
from instantid_lab.tiny import TinyConfig, tiny_unet
from instantid_lab.types import per_sample_scale

CROSS_DIM = TinyConfig.sd().cross_attention_dim  # 32


def naive_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V written out, [B, h, L, d]."""
    w = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    return w.softmax(-1) @ v


# ------------------------------------------------------------------------ the equation


def test_equation_matches_naive_softmax():
    q, k, v, k_id, v_id = qkv()
    region = torch.rand(2, 6)
    out = decoupled_cross_attention(q, k, v, k_id, v_id, scale=0.7, region=region)
    want = naive_attention(q, k, v) + 0.7 * region[:, None, :, None] * naive_attention(q, k_id, v_id)
    assert out.shape == (2, 2, 6, 8)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_scale_zero_is_plain_attention():
    q, k, v, k_id, v_id = qkv()
    out = decoupled_cross_attention(q, k, v, k_id, v_id, scale=0.0)
    torch.testing.assert_close(out, naive_attention(q, k, v), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(decoupled_cross_attention(q, k, v, k_id, v_id, scale=0.5), out)


def test_per_sample_scale_tensor():
    q, k, v, k_id, v_id = qkv()
    both = decoupled_cross_attention(q, k, v, k_id, v_id, scale=torch.tensor([0.0, 0.9]))
    for i, s in enumerate([0.0, 0.9]):
        alone = decoupled_cross_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], k_id[i:i + 1], v_id[i:i + 1], scale=s)
        torch.testing.assert_close(both[i:i + 1], alone, atol=1e-6, rtol=1e-6)
    with pytest.raises(InputError):
        decoupled_cross_attention(q, k, v, k_id, v_id, scale=torch.tensor([0.1, 0.2, 0.3]))


def test_text_mask_does_not_touch_identity_branch():
    q, k, v, k_id, v_id = qkv(b=1, lt=5)
    keep = torch.tensor([True, True, False, True, False])
    out = decoupled_cross_attention(q, k, v, k_id, v_id, scale=1.0, attention_mask=keep[None, None, None, :])
    want = naive_attention(q, k[:, :, keep], v[:, :, keep]) + naive_attention(q, k_id, v_id)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_token_grid_follows_aspect_ratio():
    assert token_grid(64, 8, 8) == (8, 8)
    assert token_grid(70, 13, 20) == (7, 10)      # a 13 x 20 latent after one stride-2 conv
    assert token_grid(70, 104, 160) == (7, 10)    # the same, given in image space
    assert token_grid(32, 512, 256) == (8, 4)


# ------------------------------------------------------------------------ one attention layer


def one_layer(seed=0):
    attn, proc, x, text = identity_layer(16, seed)  # 16 queries = a 4 x 4 grid
    ids = torch.randn(1, 4, 8)
    return attn, proc, x, text, ids


@torch.no_grad()
def test_processor_without_identity_equals_diffusers_default():
    attn, proc, x, text, ids = one_layer()
    plain = AttnProcessor2_0()(attn, x, text)
    assert torch.equal(proc(attn, x, text), plain)
    assert torch.equal(proc(attn, x, text, identity_tokens=ids, adapter_scale=0.0), plain)
    assert torch.equal(PlainAttnProcessor()(attn, x, text, identity_tokens=ids), plain)
    assert not torch.allclose(proc(attn, x, text, identity_tokens=ids), plain)


@torch.no_grad()
def test_region_mask_limits_identity_to_the_region():
    attn, proc, x, text, ids = one_layer()
    left = torch.zeros(1, 1, 8, 8)
    left[..., :4] = 1.0                                       # left half, in a 2x finer "image" space
    plain = proc(attn, x, text).view(1, 4, 4, 16)            # [B, 16, C] -> [B, rows, cols, C]
    full = proc(attn, x, text, identity_tokens=ids).view(1, 4, 4, 16)
    masked = proc(attn, x, text, identity_tokens=ids, region_mask=left).view(1, 4, 4, 16)
    torch.testing.assert_close(masked[:, :, 2:], plain[:, :, 2:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(masked[:, :, :2], full[:, :, :2], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_processor_rejects_wrong_identity_tokens():
    attn, proc, x, text, _ = one_layer()
    with pytest.raises(InputError, match="identity_tokens"):
        proc(attn, x, text, identity_tokens=torch.randn(1, 4, 9))
    with pytest.raises(InputError, match="adapter_scale"):
        proc(attn, x, text, identity_tokens=torch.randn(1, 4, 8), adapter_scale=torch.ones(3))


# ------------------------------------------------------------------------ on a tiny UNet


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, 7, CROSS_DIM, generator=g),
        ids=torch.randn(2, 4, CROSS_DIM, generator=g),
    )


@pytest.fixture(scope="module")
def plain_out(inputs):
    with torch.no_grad():
        return run(tiny_unet(TinyConfig.sd()), inputs, None)


@pytest.fixture
def unet():
    u = tiny_unet(TinyConfig.sd())
    install_adapter(u)
    return u


@torch.no_grad()
def run(unet, inputs, ids, **kwargs):
    cak = None if ids is None else {"identity_tokens": ids, **kwargs}
    x, t, text = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
    return unet(x, t, text, cross_attention_kwargs=cak).sample


def test_install_keys_are_the_checkpoint_layout(unet):
    procs = adapter_processors(unet)
    n_layers = len(unet.attn_processors)
    assert len(procs) == n_layers
    assert all(isinstance(p, IdentityAttnProcessor) == (i % 2 == 1) for i, p in enumerate(procs))
    assert list(procs.state_dict()) == list(expected_ip_adapter_shapes(unet))
    assert list(procs.state_dict())[:2] == ["1.to_k_ip.weight", "1.to_v_ip.weight"]
    install_adapter(unet)                                   # again: replaced, not stacked
    assert len(adapter_processors(unet)) == n_layers == len(unet.attn_processors)


def test_scale_zero_and_no_tokens_equal_the_plain_unet(unet, inputs, plain_out):
    torch.testing.assert_close(run(unet, inputs, None), plain_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(unet, inputs, inputs["ids"], adapter_scale=0.0), plain_out, atol=1e-6, rtol=0)
    set_layer_scale(unet, 0.0)
    torch.testing.assert_close(run(unet, inputs, inputs["ids"]), plain_out, atol=1e-6, rtol=0)


def test_scale_changes_the_output(unet, inputs, plain_out):
    weak = run(unet, inputs, inputs["ids"], adapter_scale=0.3)
    strong = run(unet, inputs, inputs["ids"], adapter_scale=1.0)
    assert (weak - plain_out).abs().max() > 1e-3
    assert (strong - plain_out).abs().mean() > (weak - plain_out).abs().mean()


def test_per_sample_scales_equal_separate_runs(unet, inputs):
    s = 0.8
    batched = run(unet, inputs, inputs["ids"], adapter_scale=torch.tensor([0.0, s]))
    for i, scale in enumerate([0.0, s]):
        one = {k: v[i:i + 1] for k, v in inputs.items()}
        alone = run(unet, one, one["ids"], adapter_scale=scale)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_block_scales_by_prefix(unet, inputs, plain_out):
    scales = set_layer_scale(unet, {"down": 0.0, "up_blocks.1": 0.5})
    assert all(v == (0.5 if n.startswith("up_blocks.1") else 0.0) for n, v in scales.items())
    assert any(v == 0.5 for v in scales.values()) and any(n.startswith("mid") for n in scales)
    only_up = run(unet, inputs, inputs["ids"])
    assert (only_up - plain_out).abs().max() > 1e-4
    set_layer_scale(unet, {"up_blocks.1": 0.0})
    torch.testing.assert_close(run(unet, inputs, inputs["ids"]), plain_out, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="sideways"):
        set_layer_scale(unet, {"sideways": 1.0})


def test_processor_scale_times_call_scale(unet, inputs):
    set_layer_scale(unet, 0.5)
    a = run(unet, inputs, inputs["ids"], adapter_scale=0.8)
    set_layer_scale(unet, 1.0)
    torch.testing.assert_close(a, run(unet, inputs, inputs["ids"], adapter_scale=0.4), atol=1e-6, rtol=1e-6)


def test_layer_scale_at_install_equals_setting_it_later(unet, inputs):
    halved = tiny_unet(TinyConfig.sd())
    install_adapter(halved, layer_scale=0.5)
    assert all(p.layer_scale == 0.5 for p in identity_processors(halved).values())
    set_layer_scale(unet, 0.5)
    torch.testing.assert_close(run(halved, inputs, inputs["ids"]), run(unet, inputs, inputs["ids"]), atol=0, rtol=0)


def test_one_check_normalises_every_scale_and_names_the_argument():
    assert per_sample_scale(0.5, 3) == 0.5 and isinstance(per_sample_scale(1, 3), float)
    assert torch.equal(per_sample_scale(torch.tensor(0.5), 3), torch.full((3,), 0.5))          # [] -> [B]
    assert torch.equal(per_sample_scale([1, 2, 3], 3), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(InputError, match="identitynet_scale"):
        per_sample_scale(torch.ones(2), 3, name="identitynet_scale")
    with pytest.raises(InputError, match="adapter_scale"):
        per_sample_scale(torch.ones(3, 1), 3, name="adapter_scale")


def test_full_region_equals_no_region(unet, inputs):
    ones = torch.ones(2, 1, 64, 64)
    torch.testing.assert_close(run(unet, inputs, inputs["ids"], region_mask=ones), run(unet, inputs, inputs["ids"]),
                               atol=1e-6, rtol=1e-6)


def test_remove_adapter_restores_diffusers(unet, inputs, plain_out):
    remove_adapter(unet)
    assert not identity_processors(unet)
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert not any("to_k_ip" in k for k in unet.state_dict())
    torch.testing.assert_close(run(unet, inputs, None), plain_out, atol=0, rtol=0)


# ------------------------------------------------------------------------ capture


def test_capture_records_both_softmaxes_and_changes_nothing(unet, inputs):
    expected = run(unet, inputs, inputs["ids"])
    with capture_attention(unet) as maps:
        out = run(unet, inputs, inputs["ids"])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert set(maps.layers) == set(identity_processors(unet))
    for name in maps.layers:
        (text,), (ident,) = maps.text[name], maps.identity[name]
        assert text.shape[::2] == (2, 7) and ident.shape[::2] == (2, 4)     # [B, Lq, Lt], [B, Lq, Li]
        torch.testing.assert_close(text.sum(-1), torch.ones(text.shape[:2]))
        torch.testing.assert_close(ident.sum(-1), torch.ones(ident.shape[:2]))
    assert maps.token_maps((8, 8)).shape == (2, 4, 8, 8)
    assert maps.token_maps((8, 8), kind="text", layers=["mid"]).shape == (2, 7, 8, 8)


def test_capture_leaves_nothing_attached_and_does_not_stack(unet, inputs):
    for _ in range(2):
        with capture_attention(unet) as maps:
            run(unet, inputs, inputs["ids"])
        assert all(len(calls) == 1 for calls in maps.text.values())
        assert all(p.recorder is None for p in identity_processors(unet).values())
    with capture_attention(unet) as outer:
        with capture_attention(unet, layers=["up"]) as inner:
            run(unet, inputs, inputs["ids"])
        run(unet, inputs, None)
    assert inner.layers and all(n.startswith("up") for n in inner.layers)
    for name, calls in outer.text.items():                 # the inner block took over the up blocks only
        assert len(calls) == (1 if name.startswith("up") else 2)
    assert outer.identity and all(not n.startswith("up") for n in outer.identity)
    assert all(p.recorder is None for p in identity_processors(unet).values())


def test_capture_needs_an_installed_adapter():
    with pytest.raises(InputError, match="install_adapter"):
        with capture_attention(tiny_unet(TinyConfig.sd())):
            pass


# ------------------------------------------------------------------------ diffusers' native IP-Adapter path


@torch.no_grad()
def test_diffusers_native_ip_adapter_path_gives_the_same_unet_output():
    """diffusers loads the same checkpoint as an "IP-Adapter Plus" (512-d input, 16 queries;
    it assumes 64-wide heads and 4 layers) and sums the two attentions the same way."""
    config = TinyConfig.sdxl()
    resampler = Resampler(ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=16,
                                          embedding_dim=512, output_dim=config.cross_attention_dim)).eval()
    kit, native = tiny_unet(config), tiny_unet(config)
    g = torch.Generator().manual_seed(3)
    ip = {k: torch.randn(s, generator=g) / s[1] ** 0.5 for k, s in expected_ip_adapter_shapes(kit).items()}
    install_adapter(kit).load_state_dict(ip)
    native._load_ip_adapter_weights([{"image_proj": resampler.state_dict(), "ip_adapter": ip}], low_cpu_mem_usage=False)
    assert any(isinstance(p, IPAdapterAttnProcessor2_0) for p in native.attn_processors.values())

    emb = torch.randn(2, 512, generator=g) * 20
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(2, config.projection_dim, generator=g),
             "time_ids": torch.randn(2, 6, generator=g)}
    t = torch.tensor([300, 300])
    ours = kit(latents, t, text, added_cond_kwargs=added,
               cross_attention_kwargs={"identity_tokens": resampler(emb)}).sample
    theirs = native(latents, t, text, added_cond_kwargs={**added, "image_embeds": [emb[:, None, None, :]]}).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    plain = kit(latents, t, text, added_cond_kwargs=added).sample
    assert (ours - plain).abs().max() > 1e-3                 # the identity branch did something


def test_gradients_reach_the_adapter_only_where_trained():
    unet = tiny_unet(TinyConfig.sd()).requires_grad_(False)       # the base model stays frozen
    procs = install_adapter(unet)
    resampler = Resampler(ResamplerConfig.tiny(output_dim=CROSS_DIM))
    g = torch.Generator().manual_seed(0)
    out = unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 7, CROSS_DIM, generator=g),
               cross_attention_kwargs={"identity_tokens": resampler(torch.randn(1, 16, generator=g))}).sample
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in procs.parameters())
    assert all(p.grad is not None for p in resampler.parameters())
    assert all(p.grad is None for n, p in unet.named_parameters() if "_ip" not in n)
