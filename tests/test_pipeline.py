"""Behaviours of `InstantIDPipeline` on tiny random components (2 steps, 64 x 64 pixels)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from instantid_lab.adapter import Resampler
from instantid_lab.attention import install_adapter, remove_adapter
from instantid_lab.errors import InputError
from instantid_lab.identitynet import run_identitynet
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.pipeline.inputs import as_identity_embeddings
from instantid_lab.pipeline.records import BatchGeometry
from instantid_lab.tiny import TINY_KPS, TINY_PROMPT, tiny_adapter_state, tiny_components, tiny_pipeline

KPS = np.array(TINY_KPS, np.float32)
PROMPT = TINY_PROMPT


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sdxl", seed=0)


def run(pipe, kps_image, emb, seed=0, **kw):
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np")
    return pipe(kw.pop("prompt", PROMPT), emb, kps_image, **{**args, **kw}).images


def fresh_pipeline(**overrides):
    """The fixture's pipeline, built again (same seeds) so it can be changed."""
    components = {**tiny_components("sdxl", seed=0), **overrides}
    pipe = InstantIDPipeline(**components)
    pipe.load_adapter(tiny_adapter_state(pipe.unet, seed=4))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_same_seed_same_image_other_seed_other_image(pipe, kps_image, emb):
    a, b, c = run(pipe, kps_image, emb, 0), run(pipe, kps_image, emb, 0), run(pipe, kps_image, emb, 1)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_num_images_per_prompt_gives_that_many_distinct_images(pipe, kps_image, emb):
    images = run(pipe, kps_image, emb, prompt=[PROMPT, "a portrait"], num_images_per_prompt=2)
    assert images.shape == (4, 64, 64, 3)
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_adapter_scale_zero_equals_the_unet_without_the_adapter(pipe, kps_image, emb):
    with_adapter_off = run(pipe, kps_image, emb, adapter_scale=0.0)
    assert np.abs(run(pipe, kps_image, emb, adapter_scale=0.8) - with_adapter_off).max() > 1e-3
    plain = fresh_pipeline()
    remove_adapter(plain.unet)  # IdentityNet still sees the identity tokens
    assert not plain.has_identity_attention
    np.testing.assert_allclose(run(plain, kps_image, emb, adapter_scale=0.8), with_adapter_off, atol=1e-5)


def test_per_sample_scales_in_one_batch_equal_separate_runs(pipe, kps_image, emb):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    adapter, identitynet = [0.0, 1.0], [1.0, 0.3]
    batch = run(pipe, kps_image, emb, prompt=[PROMPT, PROMPT], latents=noise,
                adapter_scale=torch.tensor(adapter), identitynet_scale=identitynet)
    for i in range(2):
        alone = run(pipe, kps_image, emb, latents=noise[i : i + 1], adapter_scale=adapter[i], identitynet_scale=identitynet[i])
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-4)
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_guess_mode_with_guidance_gives_zero_residuals_to_the_uncond_half(pipe, kps_image, emb):
    images = run(pipe, kps_image, emb, prompt=[PROMPT, "a portrait"], num_images_per_prompt=2, guess_mode=True)
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()
    cond = pipe.prepare_conditioning([PROMPT], BatchGeometry(1, 2, 64, 64, guided=True), emb, kps_image,
                                     guess_mode=True)
    model_input = torch.randn(4, 4, 8, 8)
    down, mid = pipe.control_residuals(model_input, pipe.scheduler.timesteps[0], cond)
    for residual in [*down, mid]:
        assert residual.shape[0] == 4
        assert residual[:2].abs().max() == 0 and residual[2:].abs().max() > 0


def test_img2img_runs_and_low_strength_stays_closer_to_the_source(pipe, kps_image, emb):
    source = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    source_latents = pipe.encode_image(source, 1, 64, 64)
    kw = dict(image=source, num_inference_steps=4, output_type="latent")
    light, strong = (run(pipe, kps_image, emb, strength=s, **kw) for s in (0.25, 1.0))
    assert light.shape == source_latents.shape == (1, 4, 8, 8)
    assert (light - source_latents).abs().mean() < (strong - source_latents).abs().mean()


def test_inpainting_keeps_the_unmasked_latents_and_repaints_the_masked(pipe, kps_image, emb):
    source = np.random.default_rng(1).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0  # repaint the left half
    out = run(pipe, kps_image, emb, image=source, mask_image=mask, strength=1.0, num_inference_steps=3,
              output_type="latent")
    source_latents = pipe.encode_image(source, 1, 64, 64)
    torch.testing.assert_close(out[..., 4:], source_latents[..., 4:], atol=1e-5, rtol=0)
    assert (out[..., :4] - source_latents[..., :4]).abs().max() > 1e-2


@pytest.mark.parametrize("scheduler_cls, guidance", [(DDIMScheduler, 5.0), (LCMScheduler, 1.0)])
def test_other_schedulers_run(pipe, kps_image, emb, scheduler_cls, guidance):
    euler = pipe.scheduler
    try:
        pipe.scheduler = scheduler_cls.from_config(euler.config)
        images = run(pipe, kps_image, emb, guidance_scale=guidance)
    finally:
        pipe.scheduler = euler
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_output_size_follows_the_request_not_the_keypoint_image(pipe, emb):
    big = draw_kps(KPS * 4, (256, 256))
    assert run(pipe, big, emb).shape == (1, 64, 64, 3)                   # native size, not 256
    wide = draw_kps(KPS * [2, 1], (128, 64))
    assert run(pipe, wide, emb).shape == (1, 64, 128, 3)                 # the keypoint image's aspect
    assert run(pipe, big, emb, height=32, width=96).shape == (1, 32, 96, 3)


def test_wrong_embedding_width_is_an_input_error_that_says_what_to_do(pipe, kps_image):
    with pytest.raises(InputError, match="16-d"):
        run(pipe, kps_image, torch.randn(128))
    with pytest.raises(InputError, match="insightface"):
        as_identity_embeddings(np.zeros(128), 1, 512)


def test_several_references_of_one_person_average_to_that_person(pipe, kps_image, emb):
    one = run(pipe, kps_image, emb)
    three_copies = run(pipe, kps_image, torch.stack([emb, emb, emb]))
    np.testing.assert_allclose(one, three_copies, atol=1e-5)


def test_noise_negative_identity_is_seeded_and_differs_from_zeros(pipe, kps_image, emb):
    zeros = run(pipe, kps_image, emb)
    noise_a, noise_b = (run(pipe, kps_image, emb, negative_identity="noise", negative_identity_seed=s) for s in (0, 0))
    assert np.array_equal(noise_a, noise_b)
    assert np.abs(noise_a - zeros).max() > 1e-4


def test_callback_sees_every_step_and_can_replace_the_latents(pipe, kps_image, emb):
    seen = []

    def callback(p, step, t, tensors):
        seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = run(pipe, kps_image, emb, num_inference_steps=3, callback_on_step_end=callback, output_type="latent")
    assert seen == [0, 1, 2] and out.abs().max() == 0


def test_sd_shaped_pipeline_with_one_text_encoder_works(kps_image, emb):
    sd = tiny_pipeline("sd", seed=0)
    assert sd.text_encoder_2 is None and sd.tokenizer_2 is None
    images = run(sd, kps_image, emb, num_images_per_prompt=2)
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()


def test_misuse_is_an_input_error(pipe, kps_image, emb):
    with pytest.raises(InputError, match="keypoint_image"):
        pipe(PROMPT, emb, None, num_inference_steps=1)
    with pytest.raises(InputError, match="image="):
        run(pipe, kps_image, emb, mask_image=np.ones((64, 64), np.float32))
    with pytest.raises(InputError, match="multiples of 8"):
        run(pipe, kps_image, emb, height=60, width=64)
    with pytest.raises(InputError, match="load_adapter"):
        InstantIDPipeline(**tiny_components("sdxl"))(PROMPT, emb, kps_image)


# ----------------------------------------------------------------------------- loading real-weight folders


def test_missing_model_files_are_listed_with_where_they_go(tmp_path, monkeypatch):
    from instantid_lab.errors import ModelFilesMissingError
    from instantid_lab.loading import load_sdxl_instantid

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "sdxl" / "unet").mkdir(parents=True)
    with pytest.raises(ModelFilesMissingError) as error:
        load_sdxl_instantid(tmp_path / "sdxl", instantid_dir=tmp_path / "instantid")
    message = str(error.value)
    for expected in ["unet/config.json", "text_encoder_2/", "model_index.json", "ControlNetModel/config.json",
                     "ControlNetModel/diffusion_pytorch_model.safetensors", "ip-adapter.bin", str(tmp_path / "instantid")]:
        assert expected in message
    with pytest.raises(ModelFilesMissingError, match="not in the Hugging Face cache"):
        load_sdxl_instantid("nobody/not-a-cached-model", instantid_dir=tmp_path / "instantid")


def test_loading_saved_folders_gives_the_same_pipeline(tmp_path, pipe, kps_image, emb):
    from instantid_lab.checkpoint import save_adapter_state
    from instantid_lab.loading import load_sdxl_instantid

    components = tiny_components("sdxl", seed=0)
    for name in ["vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler"]:
        components[name].save_pretrained(tmp_path / "sdxl" / name)
    (tmp_path / "sdxl" / "model_index.json").write_text("{}")
    components["controlnet"].save_pretrained(tmp_path / "instantid" / "ControlNetModel")
    save_adapter_state(tiny_adapter_state(components["unet"], seed=4), tmp_path / "instantid" / "ip-adapter.safetensors")

    loaded = load_sdxl_instantid(tmp_path / "sdxl", instantid_dir=tmp_path / "instantid")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(loaded, kps_image, emb), run(pipe, kps_image, emb), atol=1e-6)


# ----------------------------------------------------------------------------- without the adapter or IdentityNet


@torch.no_grad()
def plain_ddim_with_guidance(c, prompt, noise, steps, guidance):
    """Text-to-image with classifier-free guidance, written out: DDIM over the plain UNet."""
    def encode(text):
        ids = c["tokenizer"]([text], padding="max_length", max_length=c["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return c["text_encoder"](ids).last_hidden_state                   # [1, Lt, C]

    text = torch.cat([encode(""), encode(prompt)])                         # [uncond, cond]
    scheduler = c["scheduler"]
    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = c["unet"](torch.cat([latents] * 2), t, encoder_hidden_states=text).sample.chunk(2)
        latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample
    image = c["vae"].decode(latents / c["vae"].config.scaling_factor).sample   # [1, 3, H, W] in ~[-1, 1]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def plain_sd_components(seed=0):
    """SD-shaped tiny components without IdentityNet, with a DDIM scheduler."""
    c = tiny_components("sd", seed=seed)
    return {**c, "controlnet": None, "scheduler": DDIMScheduler.from_config(c["scheduler"].config)}


def test_without_adapter_and_identitynet_the_pipeline_is_the_plain_model():
    c = plain_sd_components()
    plain = InstantIDPipeline(**c)
    plain.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = plain(PROMPT, num_inference_steps=3, guidance_scale=5.0, latents=noise, output_type="np").images
    written_out = plain_ddim_with_guidance(c, PROMPT, noise, steps=3, guidance=5.0)
    assert ours.shape == written_out.shape == (1, 64, 64, 3)
    assert np.abs(ours - written_out).max() < 1e-4


def test_identity_inputs_that_do_not_fit_the_loaded_parts_are_input_errors(pipe, kps_image, emb):
    with pytest.raises(InputError, match="load_adapter"):
        InstantIDPipeline(**plain_sd_components())(PROMPT, emb, num_inference_steps=1)
    with pytest.raises(InputError, match="face.embedding"):
        pipe(PROMPT, None, kps_image, num_inference_steps=1)
    adapter_only = fresh_pipeline(controlnet=None)
    with pytest.raises(InputError, match="face.embedding"):
        adapter_only(PROMPT, num_inference_steps=1)
    with pytest.raises(InputError, match="controlnet=None"):
        InstantIDPipeline(**tiny_components("sd"))(PROMPT, num_inference_steps=1)


def test_the_call_arguments_become_records_that_check_themselves(pipe, kps_image, emb):
    with pytest.raises(InputError, match="'zeros' or 'noise'"):
        run(pipe, kps_image, emb, negative_identity="blur")
    with pytest.raises(InputError, match="one per ControlNet"):
        run(pipe, kps_image, emb, control_guidance_start=[0.0, 0.5])          # 2 values, 1 ControlNet
    with pytest.raises(InputError, match="one image each"):
        run(pipe, kps_image, emb, extra_controlnets=[pipe.controlnet], extra_images=[])


# ----------------------------------------------------------------------------- training: conditioning from tensors


def training_prediction(image_proj, identitynet, unet, noisy, t, text_tokens, embeds, kps_images):
    """The training-time prediction with both InstantID paths at scale 1, written out."""
    identity_tokens = image_proj(embeds)                                    # [B, 16, C]
    down, mid = run_identitynet(identitynet, noisy, t, identity_tokens, kps_images)
    return unet(noisy, t, encoder_hidden_states=text_tokens, down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                cross_attention_kwargs={"identity_tokens": identity_tokens, "adapter_scale": 1.0}).sample


@pytest.fixture(scope="module")
def training_pipe():
    """An SD-shaped pipeline as training builds it: IdentityNet copied from the UNet (`tiny_components`
    does it with `identitynet_from_unet`, before any adapter), then the adapter installed on the UNet."""
    c = tiny_components("sd", seed=0)
    state = tiny_adapter_state(c["unet"], seed=4)
    install_adapter(c["unet"]).load_state_dict(state["ip_adapter"])
    image_proj = Resampler.from_state_dict(state["image_proj"])
    scheduler = DDIMScheduler.from_config(c["scheduler"].config)
    return InstantIDPipeline(c["vae"], c["text_encoder"], None, c["tokenizer"], None, c["unet"], c["controlnet"],
                             scheduler, image_proj=image_proj)


def training_batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(noisy=torch.randn(b, 4, 8, 8, generator=g), t=torch.tensor([10, 500, 900][:b]),
                text_tokens=torch.randn(b, 77, 32, generator=g), embeds=torch.randn(b, 16, generator=g) * 20,
                kps_images=torch.rand(b, 3, 64, 64, generator=g))


def test_tensor_conditioning_predicts_exactly_the_training_prediction(training_pipe):
    x = training_batch()
    cond = training_pipe.tensor_conditioning(x["text_tokens"], x["embeds"], x["kps_images"])
    assert not cond.guided and len(cond.controls) == 1
    with torch.no_grad():
        ours = training_pipe.predict_noise(x["noisy"], x["t"], cond)
        written_out = training_prediction(training_pipe.image_proj, training_pipe.controlnet, training_pipe.unet, **x)
    assert torch.equal(ours, written_out)


def test_tensor_conditioning_lets_gradients_reach_the_resampler_and_identitynet(training_pipe):
    x = training_batch(b=2, seed=1)
    cond = training_pipe.tensor_conditioning(x["text_tokens"], x["embeds"], x["kps_images"])
    trained = [training_pipe.image_proj, training_pipe.controlnet]
    try:
        training_pipe.predict_noise(x["noisy"], x["t"], cond).square().mean().backward()
        for part in trained:
            grads = [p.grad for p in part.parameters()]
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    finally:
        for part in [*trained, training_pipe.unet]:
            part.zero_grad(set_to_none=True)


def test_tensor_conditioning_without_identity_is_the_plain_unet():
    plain = InstantIDPipeline(**plain_sd_components())
    x = training_batch()
    with torch.no_grad():
        ours = plain.predict_noise(x["noisy"], x["t"], plain.tensor_conditioning(x["text_tokens"]))
        unet = plain.unet(x["noisy"], x["t"], encoder_hidden_states=x["text_tokens"]).sample
    assert torch.equal(ours, unet)
    with pytest.raises(InputError, match="load_adapter"):
        plain.tensor_conditioning(x["text_tokens"], x["embeds"])
