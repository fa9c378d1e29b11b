"""The applications (identity interpolation, novel views, several identities in one image): the
equations and the regional wiring, on tiny sizes."""

import numpy as np
import pytest
import torch
from PIL import Image

from attention_inputs import identity_layer, qkv
from instantid_lab.attention import (
    RegionalIdentity,
    decoupled_cross_attention,
    regional_identity_attention,
)
from instantid_lab.experiments.applications import (
    Layout,
    PlacedIdentity,
    Sampling,
    generate_regional,
    lerp,
    novel_views,
    slerp,
)
from instantid_lab.tiny import tiny_embedding, tiny_pipeline


# ------------------------------------------------------------------------ the regional equation


def test_one_region_covering_everything_is_decoupled_cross_attention():
    q, k, v, k_id, v_id = qkv()
    everywhere = torch.ones(2, 6)
    for scale in (0.7, torch.tensor([0.2, 1.3])):
        want = decoupled_cross_attention(q, k, v, k_id, v_id, scale)
        assert torch.equal(regional_identity_attention(q, k, v, [k_id], [v_id], scale, [everywhere]), want)
        assert torch.equal(regional_identity_attention(q, k, v, [k_id], [v_id], scale, [None]), want)


def test_regions_add_each_identity_only_where_its_mask_is():
    q, k, v, k_a, v_a = qkv(seed=0)
    _, _, _, k_b, v_b = qkv(seed=1)
    left = torch.tensor([1.0, 1, 1, 0, 0, 0]).expand(2, 6)
    out = regional_identity_attention(q, k, v, [k_a, k_b], [v_a, v_b], 0.8, [left, 1 - left])
    assert torch.equal(out[:, :, :3], decoupled_cross_attention(q, k, v, k_a, v_a, 0.8)[:, :, :3])
    assert torch.equal(out[:, :, 3:], decoupled_cross_attention(q, k, v, k_b, v_b, 0.8)[:, :, 3:])


def test_one_identity_split_over_two_complementary_regions_is_that_identity_everywhere():
    q, k, v, k_id, v_id = qkv()
    m = torch.rand(2, 6)
    out = regional_identity_attention(q, k, v, [k_id, k_id], [v_id, v_id], 0.5, [m, 1 - m])
    torch.testing.assert_close(out, decoupled_cross_attention(q, k, v, k_id, v_id, 0.5), atol=1e-6, rtol=1e-6)


def test_regions_must_match_the_identities():
    q, k, v, k_id, v_id = qkv()
    with pytest.raises(ValueError):
        regional_identity_attention(q, k, v, [k_id, k_id], [v_id, v_id], 1.0, [None])


# ------------------------------------------------------------------------ one attention layer


def one_layer(seed=0):
    """A cross-attention layer whose 32 queries are a 4 x 8 grid (a 2:1 wide image), and two identities."""
    attn, proc, x, text = identity_layer(32, seed)
    left = torch.zeros(1, 1, 8, 16)
    left[..., :8] = 1.0                                          # left half, in a 2x finer "image" space
    return attn, proc, x, text, left, 1 - left


@torch.no_grad()
@pytest.mark.parametrize("changed", [0, 1])
def test_an_identitys_tokens_never_reach_the_other_region(changed):
    attn, proc, x, text, left, right = one_layer()
    tokens = [torch.randn(1, 4, 8), torch.randn(1, 4, 8)]
    run = lambda ts: proc(attn, x, text, regional_identities=[RegionalIdentity(ts[0], left),  # noqa: E731
                                                              RegionalIdentity(ts[1], right)]).view(1, 4, 8, 16)
    before = run(tokens)
    tokens[changed] = torch.randn(1, 4, 8) * 3
    after = run(tokens)
    own, other = (slice(0, 4), slice(4, 8)) if changed == 0 else (slice(4, 8), slice(0, 4))
    assert torch.equal(after[:, :, other], before[:, :, other])          # every position of the other region
    assert not torch.allclose(after[:, :, own], before[:, :, own])


@torch.no_grad()
def test_one_regional_identity_is_the_single_identity_path():
    attn, proc, x, text, left, _ = one_layer()
    ids = torch.randn(1, 4, 8)
    single = proc(attn, x, text, identity_tokens=ids, region_mask=left, adapter_scale=0.6)
    regional = proc(attn, x, text, regional_identities=[RegionalIdentity(ids, left)], adapter_scale=0.6)
    assert torch.equal(regional, single)


# ------------------------------------------------------------------------ interpolation


def test_interpolation_endpoints_are_the_end_embeddings():
    a, b = tiny_embedding(16, seed=0), tiny_embedding(16, seed=1)
    for path in (lerp, slerp):
        ends = path(a, b, [0.0, 1.0])                                    # [2, D]
        assert torch.equal(ends[0], a.double()) and torch.equal(ends[1], b.double())
        assert path(a, b, 0.5).shape == (16,)


def test_slerp_keeps_unit_inputs_on_the_unit_sphere_and_lerp_does_not():
    a, b = tiny_embedding(64, seed=2, norm=1.0), tiny_embedding(64, seed=3, norm=1.0)
    t = np.linspace(0, 1, 11)
    torch.testing.assert_close(slerp(a, b, t).norm(dim=1), torch.ones(11, dtype=torch.float64))
    assert lerp(a, b, 0.5).norm() < 0.9                                  # nearly orthogonal: the chord dips


def test_slerp_of_orthogonal_unit_vectors_follows_the_quarter_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(a, b, 1 / 3), torch.tensor([3 ** 0.5 / 2, 0.5], dtype=torch.float64))


# ------------------------------------------------------------------------ novel views and layouts


def test_novel_views_start_with_the_reference_and_keep_the_face_shape_when_rotating():
    kps = np.array([[10.0, 12], [22, 12], [16, 18], [12, 24], [20, 24]])
    views = novel_views(kps, 32)
    assert np.array_equal(next(iter(views.values())), kps)
    pairwise = lambda k: np.linalg.norm(k[:, None] - k[None], axis=-1)  # noqa: E731
    assert np.allclose(pairwise(views["rotated +20°"]), pairwise(kps))
    assert views["mirrored"][0, 0] == 32 - kps[1, 0]


def test_side_by_side_regions_partition_the_image_and_place_then_crop_is_identity():
    layout = Layout.side_by_side(face_size=32, faces=2)
    assert (layout.width, layout.height) == (64, 32)
    regions = torch.stack([layout.region(r) for r in range(2)])          # [2, 1, 32, 64]
    assert torch.equal(regions.sum(0), torch.ones(1, 32, 64))
    face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    placed = layout.place(1, face)
    assert np.array_equal(np.asarray(layout.crop(1, placed)), np.asarray(face))
    assert np.asarray(layout.crop(0, placed)).max() == 0


# ------------------------------------------------------------------------ the pipeline's stages, regionally


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_one_identity_over_the_whole_image_is_the_pipeline_with_that_face_mask(kind):
    pipe = tiny_pipeline(kind, embedding_dim=16)
    size, e = 64, tiny_embedding(16)
    kps_image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8))
    everywhere = torch.ones(1, size, size)
    sampling = Sampling("a photo of an astronaut", steps=2, guidance_scale=5.0, seed=3, copies=2)
    regional = generate_regional(pipe, [PlacedIdentity(e, kps_image, everywhere)], size, size, sampling,
                                 adapter_scale=0.8, identitynet_scale=0.6, output_type="pt")
    plain = pipe(sampling.prompt, e, kps_image, adapter_scale=0.8, identitynet_scale=0.6, face_mask=everywhere,
                 num_inference_steps=2, guidance_scale=5.0, height=size, width=size, num_images_per_prompt=2,
                 generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(regional, plain)


def test_two_identities_in_a_wide_image_run_through_the_unet():
    pipe = tiny_pipeline("sd", embedding_dim=16)
    layout = Layout.side_by_side(face_size=64, faces=2)
    kps_image = Image.new("RGB", (64, 64), (255, 0, 0))
    people = [PlacedIdentity(tiny_embedding(16, seed=s), layout.place(r, kps_image), layout.region(r))
              for r, s in enumerate((0, 1))]
    sampling = Sampling("a photo of an astronaut", steps=2, guidance_scale=5.0, copies=1)
    image = generate_regional(pipe, people, layout.height, layout.width, sampling, output_type="pt")
    assert image.shape == (1, 3, 64, 128)
