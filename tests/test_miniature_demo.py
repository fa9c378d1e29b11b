"""The notebooks' miniature helpers: enlarged pictures, same-noise sweeps, keypoint errors, an untrained ControlNet."""

import numpy as np
import pytest
import torch
from PIL import Image

from instantid_lab.images import enlarge
from instantid_lab.keypoints import KPS_COLORS, draw_kps
from instantid_lab.viz import draw_faces
from instantid_lab.miniature import demo
from instantid_lab.miniature.base import GUIDANCE_SCALE
from instantid_lab.miniature.inspector import FaceInspector, InspectorConfig, inspect
from instantid_lab.miniature.evaluate import keypoint_errors
from instantid_lab.miniature.world import HELDOUT_IDS, images_to_tensor, render_id
from instantid_lab.tiny import tiny_embedding, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("sd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_upscale_keeps_every_pixel_a_square():
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    big = np.asarray(enlarge(Image.fromarray(pixels), factor=8))
    assert big.shape == (32, 32, 3)
    assert (big == pixels.repeat(8, axis=0).repeat(8, axis=1)).all()
    as_float = np.asarray(enlarge(pixels / 255.0, factor=2))  # output_type="np" images
    assert (as_float == pixels.repeat(2, axis=0).repeat(2, axis=1)).all()


def test_draw_face_scales_the_keypoints_with_the_image(make_face):
    face = make_face(8, 8, 16, np.ones(4))
    drawn = np.asarray(draw_faces(Image.new("RGB", (32, 32)), face, enlarge=8))
    assert drawn.shape == (256, 256, 3)
    for (x, y), colour in zip(face.kps * 8, KPS_COLORS):
        assert tuple(drawn[int(y), int(x)]) == colour


def test_sweep_gives_each_image_the_same_noise_in_every_setting(pipe):
    size = pipe.default_size(None, None, None)
    prompts = ["a photo", "a drawing"]
    embeddings = [tiny_embedding(16, seed=1), tiny_embedding(16, seed=2)]
    kps = [draw_kps([[20, 24], [44, 24], [32, 36], [24, 46], [40, 46]], size)] * 2
    rows = demo.sweep(pipe, prompts, embeddings, kps, [(1.0, 1.0), (0.0, 0.0), (1.0, 1.0)], steps=2, seed=3)
    as_array = lambda row: np.stack([np.asarray(image, np.float32) for image in row])
    assert len(rows) == 3 and all(len(row) == 2 for row in rows)
    assert np.abs(as_array(rows[0]) - as_array(rows[2])).max() <= 1  # same setting, same noise: same images
    assert np.abs(as_array(rows[0]) - as_array(rows[1])).mean() > 1  # the scales change the picture
    # image k of a row is what a separate call with noise k gives
    noise = torch.randn(2, 4, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor,
                        generator=torch.Generator().manual_seed(3))
    alone = pipe(prompts[1], embeddings[1], kps[1], adapter_scale=0.0, identitynet_scale=0.0, num_inference_steps=2,
                 guidance_scale=GUIDANCE_SCALE, latents=noise[1:]).images[0]
    assert np.abs(np.asarray(alone, np.float32) - as_array(rows[1])[1]).max() <= 1


def test_keypoint_errors_are_pixel_distances_to_what_the_inspector_reads():
    torch.manual_seed(0)
    inspector = FaceInspector(InspectorConfig.quick()).eval()
    images = [render_id(i).image for i in HELDOUT_IDS[:3]]
    read = inspect(inspector, images_to_tensor(images))["kps"].numpy()  # [3, 5, 2]
    assert np.allclose(keypoint_errors(inspector, images, list(read)), 0.0, atol=1e-4)
    moved = [k + np.array([3.0, 4.0], np.float32) for k in read]
    assert np.allclose(keypoint_errors(inspector, images, moved), 5.0, atol=1e-4)


def test_random_controlnet_fits_a_unet_with_the_adapter_installed_and_acts(pipe):
    state = torch.random.get_rng_state()
    extra = demo.random_controlnet(pipe.unet, pipe.controlnet.config.conditioning_embedding_out_channels, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone
    again = demo.random_controlnet(pipe.unet, pipe.controlnet.config.conditioning_embedding_out_channels, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(extra.state_dict().values(), again.state_dict().values()))
    assert all(conv.weight.abs().max() > 0 for conv in extra.controlnet_down_blocks)  # not a fresh (zero) ControlNet
    size = pipe.default_size(None, None, None)
    kps = draw_kps([[20, 24], [44, 24], [32, 36], [24, 46], [40, 46]], size)
    edges = np.zeros((*size, 3), np.uint8)
    edges[10:20] = 255
    call = lambda s: np.asarray(pipe("a photo", tiny_embedding(16), kps, extra_controlnets=[extra], extra_images=[edges],
                                     extra_scales=s, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                                     output_type="np").images[0])
    plain = np.asarray(pipe("a photo", tiny_embedding(16), kps, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(0), output_type="np").images[0])
    assert np.abs(call(0.0) - plain).max() <= 1e-5
    assert np.abs(call(1.0) - plain).mean() > 1e-3
