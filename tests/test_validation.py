"""Every argument a user can get wrong gets a clear `LabError` naming it, before any work is done.

One test per rule of the pipeline's input stage (`pipeline.checks`, `pipeline.inputs`, `types`), then a
property test that throws random arguments at the public entry points and accepts only a result or a
`LabError` (never another exception, never a hang).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from instantid_lab.errors import InputError, LabError
from instantid_lab.face_analysis.base import Face
from instantid_lab.keypoints import draw_kps
from instantid_lab.tiny import TINY_KPS, TINY_PROMPT, tiny_embedding, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("sd", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def kps_image(pipe):
    size = pipe.default_size(None, None, None)
    return draw_kps(np.array(TINY_KPS) * size[0] / 64, size)


def call(pipe, kps_image, **overrides):
    args = dict(prompt=TINY_PROMPT, face_embedding=tiny_embedding(16), keypoint_image=kps_image,
                num_inference_steps=1, output_type="latent")
    return pipe(**{**args, **overrides})


RULES = [  # (argument overrides, a phrase the message must hold)
    ({"num_inference_steps": 0}, "num_inference_steps must be a whole number between 1 and 1000"),
    ({"num_inference_steps": -3}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"num_inference_steps": True}, "num_inference_steps"),
    ({"num_inference_steps": 10**6}, "between 1 and 1000"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a whole number >= 1"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"height": -64, "width": 64}, "height must be a whole number >= 1"),
    ({"height": 64, "width": 0}, "width must be a whole number >= 1"),
    ({"height": 60, "width": 64}, "multiples of"),
    ({"adapter_scale": float("inf")}, "adapter_scale holds NaN or infinite values"),
    ({"identitynet_scale": [0.5, float("nan")], "num_images_per_prompt": 2}, "identitynet_scale holds NaN"),
    ({"extra_scales": float("nan")}, "extra_scales holds NaN"),
    ({"adapter_scale": "strong"}, "adapter_scale must be a number"),
    ({"adapter_scale": [1.0, 2.0, 3.0]}, "adapter_scale must be a number, or a tensor of shape [1]"),
    ({"negative_identity_strength": float("nan")}, "negative_identity_strength must be a finite number"),
    ({"strength": float("nan")}, "strength must be a finite number"),
    ({"control_guidance_start": 0.8, "control_guidance_end": 0.2}, "must not be after control_guidance_end"),
    ({"control_guidance_end": 1.5}, "control_guidance_end must be a fraction of the steps in [0, 1]"),
    ({"output_type": "jpeg"}, "output_type must be one of"),
    ({"negative_identity": "random"}, "negative_identity"),
    ({"reference_mode": "median", "face_embedding": np.ones((2, 16), np.float32)}, "reference_mode"),
    ({"generator": 42}, "generator must be None, a torch.Generator"),
    ({"callback_on_step_end": "print"}, "callback_on_step_end must be a function"),
    ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "latents holds NaN"),
    ({"face_embedding": np.full(16, np.nan, np.float32)}, "finite"),
    ({"face_embedding": np.ones(128, np.float32)}, "128-d but the adapter's Resampler takes 16-d"),
    ({"face_embedding": "me"}, "face_embedding must be numbers"),
    ({"prompt": ["a", "b"], "face_embedding": [tiny_embedding(16)] * 3}, "3 identity embeddings for 2 prompts"),
    ({"prompt": ["a", "b"], "keypoint_image": [Image.new("RGB", (64, 64))] * 3}, "3 images for a batch of 2"),
    ({"prompt": 7}, "prompt must be a string"),
]


@pytest.mark.parametrize("overrides, phrase", RULES, ids=[", ".join(o) for o, _ in RULES])
def test_each_rule_raises_an_input_error_naming_the_argument(pipe, kps_image, overrides, phrase):
    with pytest.raises(InputError) as caught:
        call(pipe, kps_image, **overrides)
    assert phrase in str(caught.value)


def test_an_absurd_size_fails_before_any_allocation_and_says_how_to_lift_the_limit(pipe, kps_image):
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"pipe\.max_pixels_per_call") as caught:
        call(pipe, kps_image, height=2**20, width=2**20)
    assert time.perf_counter() - start < 1.0  # nothing of that size was made
    assert "limit of 67,108,864" in str(caught.value)
    with pytest.raises(InputError, match="max_pixels_per_call"):
        call(pipe, kps_image, height=1024, width=1024, num_images_per_prompt=65)


def test_a_whole_face_instead_of_its_embedding_names_the_fix(pipe, kps_image):
    face = Face(bbox=[0, 0, 10, 10], kps=np.zeros((5, 2)), embedding=tiny_embedding(16).numpy(), det_score=1.0,
                backend="dlib")
    with pytest.raises(InputError, match=r"pass its vector: face\.embedding"):
        call(pipe, kps_image, face_embedding=face)


def test_a_photo_embedding_into_the_miniature_names_the_miniature_analyzer(kps_image):
    miniature_sized = tiny_pipeline("sd", seed=0, embedding_dim=64)  # the miniature's adapter takes 64-d
    with pytest.raises(InputError, match=r'get_face_analyzer\("miniature"\)'):
        call(miniature_sized, kps_image, face_embedding=np.ones(128, np.float32))


def test_valid_calls_still_generate(pipe, kps_image):
    latents = call(pipe, kps_image, adapter_scale=[0.0, 1.0], num_images_per_prompt=2,
                   control_guidance_start=0.0, control_guidance_end=0.5).images
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()


# ----------------------------------------------------------------------------- random arguments

numbers_of_all_kinds = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans(), st.none(),
    st.text(max_size=3), st.lists(st.floats(-2, 2, width=32), max_size=3))
ARGUMENTS = {
    "prompt": st.one_of(st.just(TINY_PROMPT), st.lists(st.sampled_from(["a", "b"]), max_size=3), st.integers(), st.none()),
    "face_embedding": st.one_of(
        st.just("tiny"), st.none(), st.text(max_size=3),
        st.lists(st.floats(allow_nan=True, width=32), min_size=0, max_size=20).map(lambda v: np.array(v, np.float32)),
        st.integers(1, 3).map(lambda n: np.random.default_rng(n).normal(size=(n, 16)).astype(np.float32))),
    "keypoint_image": st.one_of(st.just("kps"), st.none(), st.text(max_size=3),
                                st.tuples(st.integers(0, 70), st.integers(0, 70)).map(
                                    lambda s: np.zeros((*s, 3), np.uint8))),
    "adapter_scale": numbers_of_all_kinds,
    "identitynet_scale": numbers_of_all_kinds,
    "num_inference_steps": st.one_of(st.integers(-2, 2), st.floats(width=32), st.none()),
    "guidance_scale": st.one_of(st.floats(-3, 8, width=32), st.just(float("nan")), st.text(max_size=2)),
    "height": st.one_of(st.none(), st.integers(-64, 96), st.just(10**7)),
    "width": st.one_of(st.none(), st.integers(-64, 96)),
    "num_images_per_prompt": st.one_of(st.integers(-1, 2), st.just(10**6)),
    "control_guidance_start": numbers_of_all_kinds,
    "control_guidance_end": numbers_of_all_kinds,
    "negative_identity": st.one_of(st.sampled_from(["zeros", "noise", "x"]), st.integers()),
    "reference_mode": st.sampled_from(["mean", "norm_mean", "weighted", "concat", "median"]),
    "output_type": st.sampled_from(["latent", "np", "pil", "jpeg"]),
    "strength": numbers_of_all_kinds,
    "negative_prompt": st.one_of(st.none(), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=3)),
}


#: valid values, so that a call with one or two random arguments reaches deep into the pipeline
VALID = {
    "face_embedding": st.just("tiny"), "keypoint_image": st.just("kps"),
    "adapter_scale": st.floats(0, 1.5, width=32), "identitynet_scale": st.floats(0, 1.5, width=32),
    "num_inference_steps": st.integers(1, 2), "guidance_scale": st.sampled_from([1.0, 3.0]),
    "num_images_per_prompt": st.integers(1, 2), "output_type": st.sampled_from(["latent", "np", "pil"]),
    "control_guidance_start": st.sampled_from([0.0, 0.3]), "control_guidance_end": st.sampled_from([0.6, 1.0]),
}
corruptions = st.lists(st.sampled_from(sorted(ARGUMENTS)).flatmap(lambda name: st.tuples(st.just(name), ARGUMENTS[name])),
                       max_size=2)


@settings(max_examples=200, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow], derandomize=True)
@given(st.fixed_dictionaries(VALID), corruptions)
def test_random_arguments_give_a_result_or_a_lab_error_never_anything_else(pipe, kps_image, valid, corrupted):
    arguments = {**valid, **dict(corrupted)}
    placeholders = {"face_embedding": ("tiny", tiny_embedding(16)), "keypoint_image": ("kps", kps_image)}
    for name, (word, value) in placeholders.items():
        if isinstance(arguments.get(name), str) and arguments[name] == word:
            arguments[name] = value
    try:
        pipe(**{"prompt": TINY_PROMPT, **arguments})
    except LabError:
        pass


@settings(max_examples=150, deadline=10_000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.binary(max_size=300), st.sampled_from([".png", ".jpg", ".bin", ".safetensors", ".pt", ""]))
def test_random_files_give_a_lab_error_from_the_image_and_checkpoint_readers(tmp_path_factory, data, suffix):
    from instantid_lab.checkpoint import load_adapter_state
    from instantid_lab.images import load_image

    path = tmp_path_factory.mktemp("garbage") / f"file{suffix}"
    path.write_bytes(data)
    for read in (load_image, load_adapter_state):
        try:
            read(path)
        except LabError:
            pass


@settings(max_examples=150, deadline=10_000, derandomize=True)
@given(st.one_of(st.text(max_size=12), st.integers(), st.none()),
       st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.text(max_size=3)), max_size=2))
def test_random_backends_and_modes_give_a_lab_error(name, options):
    from instantid_lab.face_analysis import get_face_analyzer
    from instantid_lab.worlds import load_pipeline

    for make in (lambda: get_face_analyzer(name, **options), lambda: load_pipeline(name)):
        try:
            make()
        except LabError:
            pass
