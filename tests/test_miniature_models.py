"""The miniature's generative half: autoencoder, base model and InstantID stage (quick presets, tiny sizes)."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from instantid_lab.errors import InputError
from instantid_lab.miniature.autoencoder import AutoencoderConfig, build_autoencoder, load_vae, reconstruction_loss
from instantid_lab.miniature.base import BaseConfig, caption_tokenizer, load_base, tokenize
from instantid_lab.miniature.instantid import (
    ADAPTER_FILE, InstantIDConfig, InstantIDParts, keypoint_image, load_miniature,
)
from instantid_lab.miniature.base import training_scheduler
from instantid_lab.miniature.objective import (
    TrainingBatch, clean_latents, denoising_loss, drop_captions, drop_paths, identity_distance, min_snr_v_loss,
    sample_timesteps,
)
from instantid_lab.pipeline import InstantIDPipeline
from instantid_lab.miniature.recognizer import (FaceRecognizer, RecognizerConfig, embed_images, load_recognizer,
                                                save_recognizer)
from instantid_lab.miniature.training import (
    LoopSettings, checkpoint_path, train_autoencoder, train_base, train_instantid, train_loop,
)
from instantid_lab.miniature.training.autoencoder import finetune_decoder
from instantid_lab.miniature.training.data import identity_batch, render_images
from instantid_lab.miniature.training.instantid import identity_term, instantid_loss
from instantid_lab.miniature.world import TRAIN_IDS, Caption, images_to_tensor, random_samples, render_id

RECOGNIZER = "recognizer_conditioner.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """All three stages at their quick presets, into one folder (a conditioning recogniser copied in)."""
    out = tmp_path_factory.mktemp("mini")
    ae = train_autoencoder(AutoencoderConfig.quick(), out, progress=False)
    base = train_base(BaseConfig.quick(), out, progress=False)
    save_recognizer(FaceRecognizer(replace(RecognizerConfig.tiny(), embedding_dim=64)), out / RECOGNIZER)
    return out, ae, base


def test_autoencoder_maps_32px_images_to_16x16x8_latents_and_back():
    vae = build_autoencoder(AutoencoderConfig.quick())
    z = vae.encode(torch.zeros(2, 3, 32, 32)).latent_dist.mean
    assert z.shape == (2, 8, 16, 16)
    assert vae.decode(z).sample.shape == (2, 3, 32, 32)


def test_training_loop_lowers_the_reconstruction_loss(tmp_path):
    vae = build_autoencoder(AutoencoderConfig.quick())
    images = render_images(TRAIN_IDS, 8, seed=0)
    with torch.no_grad():
        before = float(reconstruction_loss(vae, images, 0.0, torch.Generator().manual_seed(1)))
    settings = LoopSettings(steps=25, lr=5e-3, checkpoint_every=100)
    train_loop("ae", vae, lambda g, shard: reconstruction_loss(vae, images, 0.0, g, shard), settings, tmp_path, progress=False)
    with torch.no_grad():
        after = float(reconstruction_loss(vae, images, 0.0, torch.Generator().manual_seed(1)))
    assert after < 0.7 * before


def test_autoencoder_stage_saves_a_vae_with_a_measured_scaling_factor(trained):
    out, report, _ = trained
    vae = load_vae(out)
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert report["scaling_factor"] != 1.0
    assert report["loss"]["last"] < report["loss"]["first"]


def test_decoder_finetuning_keeps_the_latents_and_lowers_the_reconstruction_error(tmp_path):
    config = replace(AutoencoderConfig.quick(), decoder_steps=30, decoder_lr=5e-3, decoder_train_images=16)
    vae = build_autoencoder(config)
    images = render_images(TRAIN_IDS, 16, seed=11)  # the images finetune_decoder trains on

    def measure():
        with torch.no_grad():
            z = vae.encode(images).latent_dist.mean
            return z, float(((vae.decode(z).sample - images) ** 2).mean())

    encoder_before = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder", "post_quant"))}
    z_before, error_before = measure()
    state = finetune_decoder(vae, config, tmp_path, progress=False)
    z_after, error_after = measure()
    assert state.finished and state.step == 30
    # the encoder, hence the latent space, is untouched (latents equal up to kernel round-off)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in encoder_before.items())
    assert torch.allclose(z_before, z_after, atol=1e-5)
    assert error_after < 0.7 * error_before
    assert not any(p.requires_grad for p in vae.parameters())


def test_autoencoder_report_has_both_phases(trained):
    _, report, _ = trained
    assert report["decoder_steps"] == AutoencoderConfig.quick().decoder_steps
    assert {"heldout_psnr_db_after_joint_training", "heldout_psnr_db"} <= set(report)


def test_caption_tokenizer_keeps_every_caption_word_whole():
    tokenizer = caption_tokenizer()
    text = Caption("stripes", "smiling", "hat", "outline").text()
    tokens = tokenizer.convert_ids_to_tokens(tokenize(tokenizer, [text])[0])
    words = text.replace(",", " ,").split()
    assert tokens[1:len(words) + 1] == [w + "</w>" for w in words]


def test_caption_dropout_replaces_rows_by_the_empty_caption():
    ids, empty = torch.arange(12).reshape(3, 4), torch.full((4,), -1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(drop_captions(ids, empty, 0.0, g), ids)
    assert torch.equal(drop_captions(ids, empty, 1.0, g), empty.expand(3, 4))


def test_path_dropout_switches_off_one_identity_path_per_sample_at_the_given_rates():
    batch = identity_like_batch(4000)
    g = torch.Generator().manual_seed(0)
    assert drop_paths(batch, 0.0, 0.0, g) is batch
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(0)))  # none drawn
    dropped = drop_paths(batch, 0.2, 0.1, torch.Generator().manual_seed(1))
    adapter, identitynet = dropped.adapter_scale, dropped.identitynet_scale  # [B] each, 0 or 1
    assert set(adapter.unique().tolist()) == set(identitynet.unique().tolist()) == {0.0, 1.0}
    assert float((identitynet == 0).float().mean()) == pytest.approx(0.2, abs=0.02)  # adapter only
    assert float((adapter == 0).float().mean()) == pytest.approx(0.1, abs=0.02)  # IdentityNet only
    assert not bool(((adapter == 0) & (identitynet == 0)).any())  # never both off
    assert torch.equal(dropped.rows(slice(0, 5)).adapter_scale, adapter[:5])
    for bad in [(-0.1, 0.0), (0.7, 0.4)]:
        with pytest.raises(InputError, match="adapter_only"):
            drop_paths(batch, *bad, g)


def identity_like_batch(n: int):
    return TrainingBatch(torch.zeros(n, 8, 2, 2), torch.zeros(n, 3, dtype=torch.long), torch.ones(n, 64),
                         torch.zeros(n, 3, 4, 4, dtype=torch.uint8))


def test_a_sample_trained_with_identitynet_off_gets_the_loss_of_a_pipeline_without_identitynet(trained):
    out, _, _ = trained
    base = load_base(out)
    data = identity_batch(base.vae, base.tokenizer, load_recognizer(out / RECOGNIZER), 4, seed=4)
    parts = InstantIDParts.build(base.unet, InstantIDConfig.quick())
    for conv in [*parts.identitynet.controlnet_down_blocks, parts.identitynet.controlnet_mid_block]:
        conv.reset_parameters()  # a trained-looking IdentityNet: its zero-initialised outputs would hide it
    with_identitynet = parts.attach(base)
    without = InstantIDPipeline(**{**with_identitynet.components, "controlnet": None})
    loss = lambda pipe, batch: float(denoising_loss(pipe, batch, training_scheduler(), torch.Generator().manual_seed(3)))
    with torch.no_grad():
        adapter_only = drop_paths(data, 1.0, 0.0, torch.Generator())
        assert loss(with_identitynet, adapter_only) == pytest.approx(loss(without, replace(data, kps_images=None)), rel=1e-5)
        assert loss(with_identitynet, data) != pytest.approx(loss(with_identitynet, adapter_only), rel=1e-3)


def test_other_reference_embeds_other_renders_and_keeps_the_training_images(trained):
    out, _, _ = trained
    base, conditioner = load_base(out), load_recognizer(out / RECOGNIZER)
    same = identity_batch(base.vae, base.tokenizer, conditioner, 6, seed=4)
    other = identity_batch(base.vae, base.tokenizer, conditioner, 6, seed=4, other_reference=1.0)
    samples = random_samples(TRAIN_IDS, 6, seed=4)
    assert torch.equal(same.latents, other.latents) and torch.equal(same.kps_images, other.kps_images)
    own = embed_images(conditioner, images_to_tensor([s.image for s in samples]))
    assert torch.allclose(same.embeds, own, atol=1e-6)  # the default embeds the training image itself
    assert not torch.allclose(other.embeds, own, atol=1e-3)  # another render: another pose and caption
    again = identity_batch(base.vae, base.tokenizer, conditioner, 6, seed=4, other_reference=1.0)
    assert torch.equal(other.embeds, again.embeds)  # seeded
    with pytest.raises(InputError, match="other_reference"):
        identity_batch(base.vae, base.tokenizer, conditioner, 6, seed=4, other_reference=1.5)


def test_min_snr_weight_is_min_snr_gamma_over_snr_plus_one():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)  # squared error 1 everywhere
    assert float(min_snr_v_loss(pred[:1], target[:1], torch.tensor([1.0]))) == pytest.approx(0.5)
    assert float(min_snr_v_loss(pred[:1], target[:1], torch.tensor([100.0]))) == pytest.approx(5 / 101)


def test_no_gamma_weighs_every_timestep_alike():
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    target[1] = 2  # squared errors 1 and 1
    for snr in (torch.tensor([1e-4, 1.0]), torch.tensor([100.0, 0.01])):
        assert float(min_snr_v_loss(pred, target, snr, gamma=None)) == pytest.approx(1.0)
    assert float(min_snr_v_loss(pred, target, torch.tensor([1e-4, 1e-4]))) < 1e-3  # min-SNR: the noisiest ~ 0


def test_one_timestep_draw_is_uniform_and_more_draws_favour_the_noisy_steps():
    uniform = sample_timesteps(4000, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(0)))
    noisier = sample_timesteps(4000, 1000, torch.Generator().manual_seed(0), draws=2)
    assert noisier.min() >= 0 and noisier.max() < 1000
    # t / T has density 2 s: mean 2/3 and 3/4 of the steps in the noisier half (uniform: 1/2 and 1/2)
    assert float(noisier.float().mean()) / 1000 == pytest.approx(2 / 3, abs=0.02)
    assert float((noisier >= 500).float().mean()) == pytest.approx(0.75, abs=0.02)
    assert float((uniform >= 500).float().mean()) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(InputError, match="draws"):
        sample_timesteps(4, 1000, torch.Generator(), draws=0)


def test_clean_latents_solves_the_velocity_for_x0():
    scheduler, x0, noise = training_scheduler(), torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    t = torch.tensor([10, 500, 990])
    noisy, v = scheduler.add_noise(x0, noise, t), scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(clean_latents(noisy, v, scheduler.alphas_cumprod[t]), x0, atol=1e-4, rtol=1e-4)


def test_identity_distance_is_one_minus_cosine_over_the_rows_that_have_an_identity():
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])  # row 1: identity dropped (zero)
    embeddings = torch.tensor([[3.0, 0.0], [5.0, 5.0], [1.0, 0.0]])  # same direction, ignored, orthogonal
    assert float(identity_distance(embeddings, targets)) == pytest.approx((0 + 1) / 2)
    assert float(identity_distance(embeddings, torch.zeros(3, 2))) == 0  # no identity in the batch: no term


def test_the_identity_term_adds_its_weighted_distance_and_trains_the_identity_paths(trained):
    out, _, _ = trained
    base = load_base(out)
    recognizer = load_recognizer(out / RECOGNIZER)
    data = identity_batch(base.vae, base.tokenizer, recognizer, 4, seed=4)
    parts = InstantIDParts.build(base.unet, InstantIDConfig.quick())
    pipe = parts.attach(base)
    assert identity_term(base.vae, recognizer, 0.0) is None  # weight 0: the paper's loss alone
    term = identity_term(base.vae, recognizer, 2.0)
    loss = lambda identity: denoising_loss(pipe, data, training_scheduler(), torch.Generator().manual_seed(3),
                                           identity=identity)
    terms = []
    recording = lambda clean, targets: terms.append(term(clean, targets)) or terms[-1]
    plain, with_term = loss(None), loss(recording)
    # same noise and timesteps: the total is the v-loss plus the weighted distance (1 - cos lies in [0, 2])
    assert with_term.item() == pytest.approx(plain.item() + terms[0].item(), rel=1e-5)
    assert 0 < terms[0].item() <= 2.0 * 2
    with_term.backward()
    resampler_grad = [p.grad for p in parts.image_proj.parameters() if p.grad is not None]
    assert resampler_grad and any(float(g.abs().sum()) > 0 for g in resampler_grad)
    assert all(p.grad is None for p in recognizer.parameters())  # the recogniser stays frozen
    assert all(p.grad is None for p in base.vae.parameters())


def test_base_quick_training_lowers_the_loss_and_saves_the_parts(trained):
    out, _, report = trained
    assert report["steps"] == BaseConfig.quick().steps
    assert report["loss"]["last"] < report["loss"]["first"]
    assert all((out / part).is_dir() for part in ("unet", "text_encoder", "tokenizer", "scheduler"))


def test_interrupted_base_training_resumes_at_the_right_step(trained, tmp_path):
    out, _, _ = trained
    shutil.copytree(out / "vae", tmp_path / "vae")
    config = BaseConfig.quick()
    partial = train_base(config, tmp_path, stop_after=6, progress=False)
    assert partial["step"] == 6 and not partial["finished"]
    resumed = train_base(config, tmp_path, progress=False)
    assert resumed["steps"] == config.steps
    whole = torch.load(checkpoint_path(out, "base"), weights_only=True)
    again = torch.load(checkpoint_path(tmp_path, "base"), weights_only=True)
    np.testing.assert_allclose(again["losses"], whole["losses"], rtol=1e-4)  # same batches, same result
    for name in ("unet", "text_encoder"):  # the shipped EMA weights too
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(getattr(load_base(out), name).parameters(),
                                                                   getattr(load_base(tmp_path), name).parameters()))


def test_instantid_stage_trains_only_the_adapter_and_identitynet(trained):
    out, _, _ = trained
    base = load_base(out)
    base_before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    config = InstantIDConfig.quick()
    data = identity_batch(base.vae, base.tokenizer, load_recognizer(out / RECOGNIZER), 8, seed=4)
    parts = InstantIDParts.build(base.unet, config)
    parts_before = {k: v.clone() for k, v in parts.state_dict().items()}
    loss_fn = instantid_loss(parts.attach(base), data, config)
    train_loop("instantid", parts, loss_fn, LoopSettings(3, 1e-2, checkpoint_every=10), out / "scratch", progress=False)
    unet_after = base.unet.state_dict()
    assert all(torch.equal(unet_after[k], v) for k, v in base_before.items())  # the base is frozen
    changed = [k for k, v in parts.state_dict().items() if not torch.equal(v, parts_before[k])]
    for prefix in ("image_proj.", "ip_adapter.", "identitynet."):
        assert any(k.startswith(prefix) for k in changed), prefix


def test_instantid_output_loads_into_the_pipeline_and_generates(trained):
    out, _, _ = trained
    report = train_instantid(InstantIDConfig.quick(), out, progress=False)
    assert report["steps"] == InstantIDConfig.quick().steps
    pipe = load_miniature(out)
    saved = load_file(str(out / ADAPTER_FILE))
    assert torch.equal(pipe.image_proj.state_dict()["latents"], saved["image_proj.latents"])
    assert pipe.controlnet is not None and pipe.has_identity_attention
    sample = render_id(1_000_000)
    image = pipe("a smiling face, blue background, flat style", torch.randn(64), keypoint_image(sample.kps),
                 num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_keypoint_image_puts_each_point_in_its_colour_at_its_position():
    kps = np.array([[10, 12], [22, 12], [16, 18], [11, 24], [21, 24]], dtype=float)
    image = np.asarray(keypoint_image(kps, 32)).astype(int)  # [32, 32, 3]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    for (x, y), colour in zip(kps.astype(int), colours):
        assert np.abs(image[y, x] - colour).max() < 60, (x, y, image[y, x], colour)
    assert image[0, 0].sum() == 0  # black canvas


def test_a_stage_runs_unchanged_under_accelerate_launch(tmp_path):
    import json
    import os
    import subprocess
    import sys

    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [launcher, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "instantid_lab.miniature.train", "autoencoder", "--preset", "quick",
               "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "autoencoder.json").read_text())
    assert report["steps"] == AutoencoderConfig.quick().steps
    assert (tmp_path / "vae" / "config.json").is_file()
