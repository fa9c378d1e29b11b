"""Adapter checkpoints: safe loading, round trips, and checking them against a UNet's layout."""

import os
import pickle

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from instantid_lab.adapter import Resampler, ResamplerConfig
from instantid_lab.attention import IdentityAttnProcessor, install_adapter
from instantid_lab.checkpoint import (
    check_ip_adapter_state,
    convert_to_safetensors,
    expected_ip_adapter_shapes,
    load_adapter_state,
    save_adapter_state,
)
from instantid_lab.errors import CheckpointError, ModelFilesMissingError, UnsafeCheckpointError
from instantid_lab.tiny import TinyConfig, tiny_unet

#: the reference page's "SDXL 1.0 shapes"
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


@pytest.fixture(scope="module")
def sdxl_unet():
    with init_empty_weights():
        return UNet2DConditionModel(**SDXL_UNET)


def sd15_ip_adapter() -> dict:
    """An SD 1.5-shaped ip_adapter: 16 cross-attention layers reading 768-d tokens (meta tensors)."""
    # attn_processors order: down 0,1,2 (2 layers each), up 1,2,3 (3 each), mid (1)
    hidden = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    sd = {}
    for n, h in enumerate(hidden):
        for kind in ("to_k_ip", "to_v_ip"):
            sd[f"{2 * n + 1}.{kind}.weight"] = torch.empty(h, 768, device="meta")
    return sd


def tiny_state(seed=0) -> dict:
    torch.manual_seed(seed)
    unet = tiny_unet(TinyConfig.sd())
    return {"image_proj": Resampler(ResamplerConfig.tiny()).state_dict(),
            "ip_adapter": install_adapter(unet).state_dict()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


# ------------------------------------------------------------------------ the SDXL layout


def test_sdxl_unet_gives_the_released_ip_adapter_layout(sdxl_unet):
    procs = install_adapter(sdxl_unet)
    assert len(procs) == 140
    cross = [i for i, p in enumerate(procs) if isinstance(p, IdentityAttnProcessor)]
    assert cross == list(range(1, 140, 2))                  # 70 layers at odd indices 1..139
    sd = procs.state_dict()
    assert len(sd) == 140 and list(sd)[:2] == ["1.to_k_ip.weight", "1.to_v_ip.weight"]
    assert {tuple(v.shape) for v in sd.values()} == {(640, 2048), (1280, 2048)}
    assert sum(tuple(v.shape) == (640, 2048) for v in sd.values()) == 2 * (2 * 2 + 3 * 2)  # down_blocks.1, up_blocks.1
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_ip_adapter_shapes(sdxl_unet)
    check_ip_adapter_state(sdxl_unet, sd)                    # fits: no error


def test_sd15_adapter_is_rejected_with_the_likely_cause(sdxl_unet):
    with pytest.raises(CheckpointError) as err:
        check_ip_adapter_state(sdxl_unet, sd15_ip_adapter())
    msg = str(err.value)
    assert "768" in msg and "Stable Diffusion 1.x" in msg and "SDXL" in msg
    assert "missing" in msg and "wrong shape" in msg and "33.to_k_ip.weight" in msg


def test_whole_checkpoint_passed_as_ip_adapter_is_explained(sdxl_unet):
    prefixed = {f"ip_adapter.{k}": v for k, v in expected_placeholder(sdxl_unet).items()}
    with pytest.raises(CheckpointError, match=r"checkpoint\['ip_adapter'\]"):
        check_ip_adapter_state(sdxl_unet, prefixed)


def expected_placeholder(unet) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in expected_ip_adapter_shapes(unet).items()}


def test_wrong_key_is_named():
    unet = tiny_unet(TinyConfig.sd())
    sd = expected_placeholder(unet)
    sd["2.to_k_ip.weight"] = sd.pop("1.to_k_ip.weight")
    with pytest.raises(CheckpointError) as err:
        check_ip_adapter_state(unet, sd)
    assert "2.to_k_ip.weight" in str(err.value) and "1.to_k_ip.weight" in str(err.value)


# ------------------------------------------------------------------------ files


def test_bin_round_trip(tmp_path):
    state = tiny_state()
    torch.save(state, tmp_path / "ip-adapter.bin")
    assert_same(load_adapter_state(tmp_path / "ip-adapter.bin"), state)
    assert_same(load_adapter_state(str(tmp_path / "ip-adapter.bin")), state)


def test_safetensors_round_trip_and_conversion(tmp_path):
    state = tiny_state()
    save_adapter_state(state, tmp_path / "sub" / "adapter.safetensors")
    assert_same(load_adapter_state(tmp_path / "sub" / "adapter.safetensors"), state)

    torch.save(state, tmp_path / "ip-adapter.bin")
    convert_to_safetensors(tmp_path / "ip-adapter.bin", tmp_path / "converted.safetensors")
    from safetensors.torch import load_file

    flat = load_file(str(tmp_path / "converted.safetensors"))
    assert "image_proj.latents" in flat and "ip_adapter.1.to_k_ip.weight" in flat
    assert_same(load_adapter_state(tmp_path / "converted.safetensors"), state)


def test_loaded_state_fits_the_models(tmp_path):
    state = tiny_state()
    save_adapter_state(state, tmp_path / "a.safetensors")
    loaded = load_adapter_state(tmp_path / "a.safetensors")
    unet = tiny_unet(TinyConfig.sd())
    check_ip_adapter_state(unet, loaded["ip_adapter"])
    install_adapter(unet).load_state_dict(loaded["ip_adapter"])
    assert Resampler.from_state_dict(loaded["image_proj"]).config == ResamplerConfig.tiny()


def test_in_memory_states_nested_or_flat():
    state = tiny_state()
    flat = {f"{p}.{k}": v for p in state for k, v in state[p].items()}
    assert_same(load_adapter_state(flat), state)
    assert_same(load_adapter_state(state), state)


class Exploit:
    """Unpickling this would create a file (the classic pickle attack)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenExploit(Exploit):
    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("exploit", [Exploit, OpenExploit])
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, exploit, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "ip-adapter.bin"
    payload = {"image_proj": {"latents": exploit(marker)}, "ip_adapter": {}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="nothing in it was executed"):
        load_adapter_state(path)
    assert not marker.exists()


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "models" / "ip-adapter.bin"
    with pytest.raises(ModelFilesMissingError, match="ip-adapter.bin") as err:
        load_adapter_state(path)
    assert str(path) in str(err.value)


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    torch.save(tiny_state(), tmp_path / "full.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "full.bin").read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.bin"):
        load_adapter_state(tmp_path / "cut.bin")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_adapter_state(tmp_path / "cut.safetensors")


def test_wrong_top_level_key_is_named(tmp_path):
    state = tiny_state()
    torch.save({"image_proj": state["image_proj"], "ip_adaptor": state["ip_adapter"]}, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="ip_adaptor"):
        load_adapter_state(tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="ip_adapter"):
        load_adapter_state({"image_proj": state["image_proj"]})
    with pytest.raises(CheckpointError, match="not tensors"):
        load_adapter_state({"image_proj": {"latents": [1, 2]}, "ip_adapter": state["ip_adapter"]})
