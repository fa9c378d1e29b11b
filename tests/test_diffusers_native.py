"""`InstantIDPipeline` used like any diffusers pipeline (LoRAs, save / load, one-file bases, memory
options) on tiny random components, and never silently losing the identity on the way."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.models.attention_processor import AttnProcessor2_0

from instantid_lab.attention import (IdentityAttnProcessor, attention_layers, identity_processors, install_adapter,
                                     remove_adapter, set_layer_scale)
from instantid_lab.checkpoint import load_adapter_state, save_adapter_state
from instantid_lab.errors import InputError, ModelFilesMissingError
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.pipeline.lora import transformers_peft_problem
from instantid_lab.tiny import (TINY_KPS, TINY_PROMPT, TinyConfig, tiny_adapter_state, tiny_components, tiny_pipeline)

try:  # diffusers' LoRA loading needs peft (the dev extra); only the LoRA tests do
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict
except ImportError:
    LoraConfig = None
needs_peft = pytest.mark.skipif(LoraConfig is None, reason="diffusers' LoRA loading needs peft (pip install peft)")

KPS = np.array(TINY_KPS, np.float32)


def run(pipe, kps_image, emb, **kw):
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    return pipe(TINY_PROMPT, emb, kps_image, **{**args, **kw}).images


def max_diff(a, b) -> float:
    return float(np.abs(a - b).max())


def same_processors(before: dict, unet) -> bool:
    after = identity_processors(unet)
    return after.keys() == before.keys() and all(after[n] is p for n, p in before.items())


# ----------------------------------------------------------------------------- LoRA


def random_lora(model, targets, seed=0, adapter_name="default"):
    """A LoRA state dict for `model` with random A and B (peft's `init_lora_weights=False`: B is not zero)."""
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), model,
                            adapter_name=adapter_name)
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def unet_lora_folder(folder, kind="sdxl", seed=0):
    """A UNet-only LoRA (as LCM-LoRA and most style LoRAs are) saved with diffusers' `save_lora_weights`."""
    unet = tiny_components(kind, seed=7)["unet"]
    layers = random_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], seed)
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return unet_lora_folder(tmp_path_factory.mktemp("lora"))


def has_lora(model) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@needs_peft
def test_a_lora_changes_the_image_and_unloading_restores_it_exactly(lora_dir, kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    before, base = identity_processors(pipe.unet), run(pipe, kps_image, emb)
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    attn2 = dict(attention_layers(pipe.unet))["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]
    assert isinstance(attn2.to_k, BaseTunerLayer) and isinstance(attn2.processor, IdentityAttnProcessor)
    assert not any(isinstance(m, BaseTunerLayer) for p in before.values() for m in p.modules())  # no LoRA on to_k_ip
    assert same_processors(before, pipe.unet)
    assert max_diff(run(pipe, kps_image, emb), base) > 1e-3
    pipe.unload_lora_weights()
    assert not has_lora(pipe.unet) and same_processors(before, pipe.unet)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(),
                                                 tiny_pipeline("sdxl").unet.state_dict().values()))  # the weights, exactly
    # the image to float32 rounding (2e-6 with torch 2.13: as much as running on 1 thread instead of 2 changes it)
    assert max_diff(run(pipe, kps_image, emb), base) <= 1e-5


@needs_peft
def test_a_lora_with_adapter_scale_zero_equals_the_same_lora_on_the_plain_base(lora_dir, kps_image, emb):
    with_adapter = tiny_pipeline("sdxl")
    plain = tiny_pipeline("sdxl")
    remove_adapter(plain.unet)                    # the base without identity attention (IdentityNet stays)
    for pipe in (with_adapter, plain):
        pipe.load_lora_weights(lora_dir)
    off = run(with_adapter, kps_image, emb, adapter_scale=0.0)
    assert max_diff(off, run(plain, kps_image, emb, adapter_scale=0.8)) <= 1e-5
    assert max_diff(off, run(with_adapter, kps_image, emb, adapter_scale=0.8)) > 1e-3   # the identity still acts


@needs_peft
def test_lora_weights_scale_it_and_fusing_changes_nothing(lora_dir, kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    before, base = identity_processors(pipe.unet), run(pipe, kps_image, emb)
    pipe.load_lora_weights(lora_dir, adapter_name="style")
    full = run(pipe, kps_image, emb)
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert max_diff(run(pipe, kps_image, emb), base) <= 1e-5  # float32 rounding (see the test above)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = run(pipe, kps_image, emb)
    assert max_diff(half, base) > 1e-3 and max_diff(half, full) > 1e-3
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    assert max_diff(run(pipe, kps_image, emb), full) <= 1e-4
    pipe.unfuse_lora()
    assert max_diff(run(pipe, kps_image, emb), full) <= 1e-4
    assert same_processors(before, pipe.unet)


@needs_peft
def test_an_sd_shaped_pipeline_takes_a_lora_for_its_unet(tmp_path, kps_image, emb):
    pipe = tiny_pipeline("sd")
    base = run(pipe, kps_image, emb)
    pipe.load_lora_weights(unet_lora_folder(tmp_path, "sd"))
    assert max_diff(run(pipe, kps_image, emb), base) > 1e-3
    pipe.unload_lora_weights()
    assert max_diff(run(pipe, kps_image, emb), base) <= 1e-6


@needs_peft
def test_the_lcm_lora_recipe_runs_few_steps_with_the_identity(lora_dir, kps_image, emb):
    """The README's few-step recipe: LCMScheduler + a (here random) UNet LoRA, 4 steps, guidance 1.5."""
    pipe = tiny_pipeline("sdxl")
    before = identity_processors(pipe.unet)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(lora_dir, adapter_name="lcm")
    lcm = dict(num_inference_steps=4, guidance_scale=1.5)
    images = {s: run(pipe, kps_image, emb, adapter_scale=s, **lcm) for s in (0, 0.8)}
    assert images[0.8].shape == (1, 64, 64, 3) and np.isfinite(images[0.8]).all()
    assert max_diff(images[0.8], images[0]) > 1e-3 and same_processors(before, pipe.unet)


def text_encoder_lora(kind="sdxl"):
    """A LoRA with a UNet part and a part for each text encoder, as a diffusers state dict."""
    c = tiny_components(kind, seed=7)
    parts = {"unet": random_lora(c["unet"], ["to_k", "to_v"])}
    for name in ("text_encoder", "text_encoder_2"):
        if c[name] is not None:
            parts[name] = random_lora(c[name], ["q_proj", "v_proj"], seed=1)
    return {f"{part}.{k}": v for part, layers in parts.items() for k, v in layers.items()}


@needs_peft
def test_an_sdxl_lora_on_an_sd_shaped_pipeline_is_refused_before_anything_loads():
    pipe = tiny_pipeline("sd")
    lora = {k: v for k, v in text_encoder_lora("sdxl").items() if not k.startswith("unet.")}
    with pytest.raises(InputError, match="second text encoder"):
        pipe.load_lora_weights(lora)
    assert not has_lora(pipe.unet) and not has_lora(pipe.text_encoder)


@needs_peft
@pytest.mark.skipif(transformers_peft_problem() is None, reason="transformers accepts this peft")
def test_a_text_encoder_lora_that_transformers_cannot_load_is_refused_whole():
    """transformers 5.x loads text-encoder LoRAs only with a newer peft than PyPI may offer: then the whole
    LoRA is refused (naming both versions) before its UNet part is loaded."""
    pipe = tiny_pipeline("sdxl")
    with pytest.raises(InputError, match="peft"):
        pipe.load_lora_weights(text_encoder_lora())
    assert not has_lora(pipe.unet) and not has_lora(pipe.text_encoder)


@needs_peft
@pytest.mark.skipif(transformers_peft_problem() is not None, reason="transformers refuses this peft")
def test_a_lora_with_text_encoder_parts_loads_and_unloads(kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    base = run(pipe, kps_image, emb)
    pipe.load_lora_weights(text_encoder_lora())
    assert has_lora(pipe.text_encoder) and has_lora(pipe.text_encoder_2)
    assert max_diff(run(pipe, kps_image, emb), base) > 1e-3
    pipe.unload_lora_weights()
    assert max_diff(run(pipe, kps_image, emb), base) <= 1e-6


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["sdxl", "sd"])
def test_save_pretrained_and_from_pretrained_keep_the_adapter_and_identitynet(tmp_path, kind, kps_image, emb):
    pipe = tiny_pipeline(kind)
    set_layer_scale(pipe.unet, {"up": 1.0, "down": 0.5})        # layer scales travel in the file's header
    pipe.save_pretrained(tmp_path)

    state = load_adapter_state(tmp_path / "ip-adapter.safetensors")               # the released layout
    assert state["ip_adapter"].keys() == pipe.adapter_state()["ip_adapter"].keys()
    assert json.loads((tmp_path / "model_index.json").read_text())["image_proj"] == [None, None]
    from safetensors.torch import load_file
    assert not any("processor" in k for k in load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert pipe.has_identity_attention and pipe.image_proj is not None             # saving changed nothing

    loaded = InstantIDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.has_identity_attention
    assert {n: p.layer_scale for n, p in identity_processors(loaded.unet).items()} == \
           {n: p.layer_scale for n, p in identity_processors(pipe.unet).items()}
    for name, value in pipe.controlnet.state_dict().items():                        # IdentityNet
        assert torch.equal(loaded.controlnet.state_dict()[name], value), name
    assert max_diff(run(loaded, kps_image, emb), run(pipe, kps_image, emb)) <= 1e-5


def test_a_pipeline_without_the_adapter_saves_and_loads_without_one(tmp_path):
    pipe = InstantIDPipeline(**{**tiny_components("sd"), "controlnet": None})
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "ip-adapter.safetensors").exists()
    loaded = InstantIDPipeline.from_pretrained(tmp_path)
    assert loaded.image_proj is None and not loaded.has_identity_attention


def test_saving_half_an_adapter_is_refused(tmp_path):
    pipe = tiny_pipeline("sd")
    remove_adapter(pipe.unet)                          # image_proj stays, the identity attention is gone
    with pytest.raises(InputError, match="half"):
        pipe.save_pretrained(tmp_path)


# ----------------------------------------------------------------------------- a fine-tuned base in one file


def original_layout(c) -> dict:
    """Tiny SDXL components in the original (SGM) single-file key layout.

    diffusers ships only the reading direction (`loaders.single_file_utils.convert_ldm_*`), so this is
    that mapping inverted, for the blocks of the tiny UNet and VAE; its static part is diffusers' own
    table `DIFFUSERS_TO_LDM_MAPPING`. The test then reads the file back with diffusers' loader.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING as M

    per_block = c["unet"].config.layers_per_block + 1
    up_attn = ["Attn" in t for t in c["unet"].config.up_block_types]
    unet_static = {**M["unet"]["layers"], **M["unet"]["addition_embed_type"]}
    out = {f"model.diffusion_model.{unet_key(k, per_block, up_attn, unet_static)}": v
           for k, v in c["unet"].state_dict().items()}
    n_up = len(c["vae"].config.up_block_types)
    for k, v in c["vae"].state_dict().items():
        key = M["vae"].get(k) or vae_key(k, n_up)
        out[f"first_stage_model.{key}"] = v[:, :, None, None] if "mid.attn_1." in key and v.ndim == 2 else v
    for k, v in c["text_encoder"].state_dict().items():
        out[f"conditioner.embedders.0.transformer.text_model.{k.removeprefix('text_model.')}"] = v
    out.update(open_clip_layout(c["text_encoder_2"].state_dict(), M["openclip"]))
    return out


RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_key(k, per_block, up_attn, static):
    if k in static:
        return static[k]
    m = re.match(r"(down|up|mid)_blocks?\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", k)
    where, b, part, j, rest = m.groups()
    if part == "resnets":
        for ours, theirs in RESNET:
            rest = rest.replace(ours, theirs)
    b, j, sub = int(b or 0), int(j), 0 if part == "resnets" else 1
    if where == "mid":
        return f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
    if part == "downsamplers":
        return f"input_blocks.{(b + 1) * per_block}.0.op.{rest.removeprefix('conv.')}"
    if part == "upsamplers":
        return f"output_blocks.{b * per_block + per_block - 1}.{2 if up_attn[b] else 1}.{rest}"
    return f"input_blocks.{1 + b * per_block + j}.{sub}.{rest}" if where == "down" else \
        f"output_blocks.{b * per_block + j}.{sub}.{rest}"


def vae_key(k, n_up):
    k = k.replace("conv_shortcut", "nin_shortcut")
    if "mid_block.attentions.0." in k:
        for ours, theirs in [("mid_block.attentions.0.", "mid.attn_1."), ("group_norm.", "norm."), ("to_q.", "q."),
                             ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]:
            k = k.replace(ours, theirs)
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
    k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
    k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block.", k)
    return re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.", k)


def open_clip_layout(sd, table, prefix="conditioner.embedders.1.model."):
    """CLIPTextModelWithProjection -> OpenCLIP keys: q, k, v joined into `in_proj`, the projection transposed."""
    out = {prefix + theirs: (sd[ours].T if theirs == "text_projection" else sd[ours])
           for ours, theirs in table["layers"].items()}
    renames = [(a, b) for a, b in table["transformer"].items() if not a.startswith("transformer.")]
    for k, v in sd.items():
        if not k.startswith("text_model.encoder.layers.") or ".k_proj." in k or ".v_proj." in k:
            continue
        if ".q_proj." in k:                                   # [3 * hidden, ...]: q, k, v stacked
            v = torch.cat([sd[k.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"])
            k = k.replace(".q_proj.", ".in_proj_")
        for ours, theirs in renames:
            k = k.replace(ours, theirs)
        out[prefix + "transformer." + k] = v
    return out


#: The two text encoders differ in width, as SDXL's do (768 and 1280): diffusers' single-file loader tells
#: them apart by it.
ONE_FILE_CONFIG = TinyConfig.sdxl(text_hidden=(16, 32))


@pytest.fixture(scope="module")
def single_file_world(tmp_path_factory):
    """A diffusers SDXL folder (configs + tokenizers), a fine-tune of it as one original-layout file,
    the InstantID folder, and the fine-tune's own components to compare with."""
    root = tmp_path_factory.mktemp("single_file")
    base = tiny_components(ONE_FILE_CONFIG, seed=0)
    StableDiffusionXLPipeline(**{k: v for k, v in base.items() if k != "controlnet"}).save_pretrained(root / "sdxl")
    tuned = tiny_components(ONE_FILE_CONFIG, seed=11)                             # other weights, same shapes
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in original_layout(tuned).items()}, root / "tuned.safetensors")
    base["controlnet"].save_pretrained(root / "instantid" / "ControlNetModel")
    save_adapter_state(tiny_adapter_state(base["unet"], seed=4), root / "instantid" / "ip-adapter.safetensors")
    return root, tuned, base


def test_a_fine_tuned_base_in_one_file_loads_with_local_configs(single_file_world, monkeypatch, kps_image, emb):
    from instantid_lab.loading import load_sdxl_instantid

    root, tuned, base = single_file_world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_sdxl_instantid(root / "tuned.safetensors", instantid_dir=root / "instantid",
                               single_file_config=root / "sdxl")
    for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:       # the file's weights, not the folder's
        ours, theirs = pipe.components[name].state_dict(), tuned[name].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
    expected = InstantIDPipeline(**{**tuned, "controlnet": base["controlnet"]})
    expected.load_adapter(tiny_adapter_state(base["unet"], seed=4))
    for p in (pipe, expected):
        p.set_progress_bar_config(disable=True)
    assert max_diff(run(pipe, kps_image, emb), run(expected, kps_image, emb)) <= 1e-5


def test_a_single_file_base_without_its_configuration_says_what_is_missing(single_file_world, tmp_path, monkeypatch):
    from instantid_lab.loading import load_sdxl_instantid

    root, _, _ = single_file_world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = root / "instantid"
    with pytest.raises(ModelFilesMissingError, match="single_file_config"):
        load_sdxl_instantid(root / "tuned.safetensors", instantid_dir=ids, single_file_config=tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelFilesMissingError, match="unet/config.json"):
        load_sdxl_instantid(root / "tuned.safetensors", instantid_dir=ids, single_file_config=tmp_path / "half")
    with pytest.raises(ModelFilesMissingError, match="does not exist"):
        load_sdxl_instantid(tmp_path / "missing.safetensors", instantid_dir=ids, single_file_config=root / "sdxl")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(ModelFilesMissingError, match="pickle"):
        load_sdxl_instantid(tmp_path / "model.ckpt", instantid_dir=ids, single_file_config=root / "sdxl")


# ----------------------------------------------------------------------------- memory options


def test_attention_slicing_is_refused_while_the_identity_attention_is_installed(kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    before, base = identity_processors(pipe.unet), run(pipe, kps_image, emb)
    with pytest.raises(InputError, match="silently drop the identity.*enable_vae_slicing"):
        pipe.enable_attention_slicing()
    pipe.disable_attention_slicing()                                  # allowed: nothing to turn off
    assert same_processors(before, pipe.unet) and max_diff(run(pipe, kps_image, emb), base) == 0

    plain = tiny_pipeline("sdxl")
    remove_adapter(plain.unet)                                        # without the adapter: diffusers' own slicing
    unsliced = run(plain, kps_image, emb)
    plain.enable_attention_slicing(1)
    assert max_diff(run(plain, kps_image, emb), unsliced) <= 1e-5


def test_every_diffusers_way_to_replace_the_processors_is_refused(kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    unet, before = pipe.unet, identity_processors(pipe.unet)
    refused = [lambda: unet.set_attn_processor(AttnProcessor2_0()), unet.set_default_attn_processor,
               lambda: unet.set_attention_slice("auto"), unet.enable_xformers_memory_efficient_attention,
               pipe.enable_xformers_memory_efficient_attention, unet.fuse_qkv_projections]
    for call in refused:
        with pytest.raises(InputError, match="IdentityAttnProcessor"):
            call()
    pipe.disable_xformers_memory_efficient_attention()               # allowed: nothing to turn off
    unet.set_attn_processor(unet.attn_processors)                    # keeps every identity processor: allowed
    assert same_processors(before, unet)

    install_adapter(unet)                                             # the kit's own tools are not blocked
    remove_adapter(unet)
    unet.set_default_attn_processor()                                 # and without the adapter, diffusers' own
    assert not pipe.has_identity_attention


def test_vae_slicing_gives_the_same_images_and_tiling_tiles(kps_image, emb):
    pipe = tiny_pipeline("sdxl")
    big = draw_kps(KPS * 2, (128, 128))
    two = dict(num_images_per_prompt=2, height=128, width=128)
    whole = run(pipe, big, emb, **two)
    pipe.enable_vae_slicing()
    assert max_diff(run(pipe, big, emb, **two), whole) <= 1e-5       # batch of 1 vs 2: float noise only
    pipe.disable_vae_slicing()

    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 64, 8   # tiles of 64 px on a 128 px image
    seen = []
    hook = pipe.vae.decoder.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    pipe.enable_vae_tiling()
    tiled = run(pipe, big, emb, **two)
    pipe.disable_vae_tiling()
    hook.remove()
    assert (8, 8) in seen and (16, 16) not in seen                    # decoded tile by tile
    # random VAE weights make the seams visible; a trained VAE blends them far better
    assert np.abs(tiled - whole).mean() < 0.05
    assert max_diff(run(pipe, big, emb, **two), whole) == 0           # off again: the same image


def test_model_cpu_offload_keeps_the_identity(kps_image, emb):
    """accelerate's hooks move each model to the execution device only while it runs. Without a GPU the
    default call is refused by diffusers ("requires accelerator"); device="cpu" runs the same hooks."""
    pipe = tiny_pipeline("sdxl")
    before, base = identity_processors(pipe.unet), run(pipe, kps_image, emb)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="accelerator"):
            pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload(device="cpu")
    assert max_diff(run(pipe, kps_image, emb), base) <= 1e-6 and same_processors(before, pipe.unet)
