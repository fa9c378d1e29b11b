"""The Resampler: the released checkpoint's layout, presets, shapes, and agreement with diffusers."""

import pytest
import torch

from instantid_lab.adapter import Resampler, ResamplerConfig
from instantid_lab.errors import CheckpointError, InputError


def released_image_proj_layout() -> dict:
    """The `image_proj` entry of InstantID's ip-adapter.bin, written out from its documented layout."""
    shapes = {
        "latents": (1, 16, 1280),
        "proj_in.weight": (1280, 512), "proj_in.bias": (1280,),
        "proj_out.weight": (2048, 1280), "proj_out.bias": (2048,),
        "norm_out.weight": (2048,), "norm_out.bias": (2048,),
    }
    for i in range(4):
        a, ff = f"layers.{i}.0", f"layers.{i}.1"
        shapes.update({
            f"{a}.norm1.weight": (1280,), f"{a}.norm1.bias": (1280,),
            f"{a}.norm2.weight": (1280,), f"{a}.norm2.bias": (1280,),
            f"{a}.to_q.weight": (1280, 1280),               # 20 heads x 64
            f"{a}.to_kv.weight": (2560, 1280),
            f"{a}.to_out.weight": (1280, 1280),
            f"{ff}.0.weight": (1280,), f"{ff}.0.bias": (1280,),   # LayerNorm
            f"{ff}.1.weight": (5120, 1280),                  # Linear up, no bias
            f"{ff}.3.weight": (1280, 5120),                  # Linear down, no bias (2 is GELU)
        })
    return shapes


def test_sdxl_preset_has_the_released_checkpoint_layout():
    with torch.device("meta"):
        model = Resampler(ResamplerConfig.sdxl())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == released_image_proj_layout()


def test_config_is_read_back_from_state_dicts():
    with torch.device("meta"):
        sdxl = Resampler(ResamplerConfig.sdxl()).state_dict()
    assert ResamplerConfig.from_state_dict(sdxl) == ResamplerConfig.sdxl()
    for config in (ResamplerConfig.tiny(), ResamplerConfig.mini(), ResamplerConfig.tiny(depth=3, ff_mult=2)):
        assert ResamplerConfig.from_state_dict(Resampler(config).state_dict()) == config
    odd = ResamplerConfig.tiny(dim_head=4, heads=4)               # 16-wide attention: not inferable
    assert ResamplerConfig.from_state_dict(Resampler(odd).state_dict(), dim_head=4) == odd


def test_overrides_and_presets():
    assert Resampler(ResamplerConfig.tiny(), num_queries=6).config.num_queries == 6
    assert ResamplerConfig.tiny(output_dim=48).output_dim == 48
    assert ResamplerConfig() == ResamplerConfig.sdxl()


@torch.no_grad()
def test_output_shape_and_one_token_input():
    torch.manual_seed(0)
    model = Resampler(ResamplerConfig.tiny()).eval()
    e = torch.randn(3, 16)
    out = model(e)
    assert out.shape == (3, 4, 32)
    torch.testing.assert_close(model(e[:, None, :]), out)         # [B, D] is [B, 1, D]
    assert model(torch.randn(3, 5, 16)).shape == (3, 4, 32)         # several tokens per sample


@torch.no_grad()
def test_samples_do_not_mix():
    torch.manual_seed(0)
    model = Resampler(ResamplerConfig.tiny()).eval()
    e = torch.randn(2, 16)
    both = model(e)
    torch.testing.assert_close(both[:1], model(e[:1]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both[1:], model(e[1:]), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(both[0], both[1])


@torch.no_grad()
def test_perceiver_attention_is_scaled_softmax_over_inputs_and_latents():
    torch.manual_seed(0)
    attn = Resampler(ResamplerConfig.tiny()).layers[0][0]
    x, lat = torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    xn, ln = attn.norm1(x), attn.norm2(lat)
    q = attn.to_q(ln)
    k, v = attn.to_kv(torch.cat([xn, ln], 1)).chunk(2, -1)
    heads = lambda t: t.view(2, t.shape[1], 2, 8).transpose(1, 2)          # noqa: E731  [B, L, 16] -> [B, 2, L, 8]
    w = (heads(q) @ heads(k).transpose(-2, -1) / 8**0.5).softmax(-1)
    want = attn.to_out((w @ heads(v)).transpose(1, 2).reshape(2, 4, 16))
    torch.testing.assert_close(attn(x, lat), want, atol=1e-5, rtol=1e-5)


def test_bad_embeddings_are_refused():
    model = Resampler(ResamplerConfig.tiny())
    with pytest.raises(InputError, match="16-d"):
        model(torch.randn(2, 512))
    with pytest.raises(InputError):
        model(torch.randn(16))


def test_from_state_dict_loads_and_explains_mismatches():
    torch.manual_seed(0)
    sd = Resampler(ResamplerConfig.tiny()).state_dict()
    loaded = Resampler.from_state_dict(sd)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="latents"):
        ResamplerConfig.from_state_dict({k: v for k, v in sd.items() if k != "latents"})
    with pytest.raises(CheckpointError, match="layers.0.0.to_k.weight"):
        Resampler.from_state_dict({**sd, "layers.0.0.to_k.weight": torch.zeros(16, 32)})


@torch.no_grad()
def test_same_tokens_as_diffusers_ip_adapter_plus_projection():
    """diffusers reads this layout as an IP-Adapter-Plus projection (4 layers, 64-wide heads)."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    torch.manual_seed(0)
    ours = Resampler(ResamplerConfig(dim=128, depth=4, dim_head=64, heads=2, num_queries=16,
                                     embedding_dim=512, output_dim=32)).eval()
    loader = type("Loader", (UNet2DConditionLoadersMixin,), {"device": torch.device("cpu"), "dtype": torch.float32})()
    theirs = loader._convert_ip_adapter_image_proj_to_diffusers(ours.state_dict(), low_cpu_mem_usage=False).eval()
    assert type(theirs).__name__ == "IPAdapterPlusImageProjection"
    e = torch.randn(3, 1, 512) * 20
    torch.testing.assert_close(ours(e), theirs(e), atol=1e-5, rtol=1e-5)
