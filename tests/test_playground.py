"""The playground, driven without a browser: controls -> request -> pipeline call, pose edits -> keypoints,
history, one-call sweeps, the worker thread (newest request wins), and the attention explorer.

Most tests run the real miniature's references and judges with a recording stand-in pipeline (fast,
and the call is visible); the last ones run the real miniature pipeline.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from instantid_lab.errors import InputError
from instantid_lab.keypoints import mirror_kps
from instantid_lab.miniature.world import Caption, Pose, render_id
from instantid_lab.widgets import Playground
from instantid_lab.widgets.live import Cancelled, LatestOnly
from instantid_lab.widgets.playground import parse_values
from instantid_lab.widgets.sources import MiniatureReferences, miniature_pose
from instantid_lab.widgets.studio import PoseEdit, Studio, turn_kps


class RecordingPipe:
    """Stands in for `InstantIDPipeline`: records every call's arguments, steps through the callback
    (optionally slowly) and returns flat images whose red channel is the adapter scale."""

    vae_scale_factor = 2
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=4))

    def __init__(self, step_seconds: float = 0.0):
        self.calls, self.threads, self.step_seconds = [], [], step_seconds

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        self.threads.append(threading.current_thread())
        for i in range(kwargs["num_inference_steps"]):
            time.sleep(self.step_seconds)
            if kwargs.get("callback_on_step_end") is not None:
                kwargs["callback_on_step_end"](self, i, i, {})
        n, scale = kwargs["num_images_per_prompt"], kwargs["adapter_scale"]
        scales = scale.tolist() if isinstance(scale, torch.Tensor) else [scale] * n
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), (int(40 * s), 90, 60)) for s in scales])


@pytest.fixture(scope="module")
def world():
    from instantid_lab.worlds import open_world

    return open_world("miniature", ci=True)


@pytest.fixture(scope="module")
def references(world):
    return MiniatureReferences(world, identities=4)


def _playground(world, references, pipe=None, live=False, **kwargs) -> Playground:
    """A playground on the real miniature's references and judges, with a `RecordingPipe`."""
    return Playground(Studio(dataclasses.replace(world, pipe=pipe or RecordingPipe()), references), live=live,
                      **kwargs)


@pytest.fixture
def playground(world, references):
    made = _playground(world, references)
    yield made
    made.close()


# ----------------------------------------------------------------------------- controls -> request -> call


def test_sliders_make_the_request_and_the_request_makes_the_pipeline_call(playground, references):
    c = playground.controls
    c["adapter_scale"].value, c["identitynet_scale"].value = 0.6, 1.4   # what dragging the sliders does
    playground.window_slider.value = (0.1, 0.7)
    c["background"].value, c["accessory"].value, c["seed"].value, c["steps"].value = "red", "hat", 7, 5
    request = playground.request()
    assert (request.adapter_scale, request.identitynet_scale, request.control_start, request.control_end) == \
        (0.6, 1.4, 0.1, 0.7)
    assert request.caption == Caption(background="red", expression="smiling", accessory="hat")
    assert request.prompt == request.caption.text() and request.seed == 7 and request.steps == 5

    generation = playground.generate(wait=True)
    call, = playground.studio.world.pipe.calls
    assert call["prompt"] == "a smiling face with a hat, red background, flat style"
    assert (call["adapter_scale"], call["identitynet_scale"]) == (0.6, 1.4)
    assert (call["control_guidance_start"], call["control_guidance_end"]) == (0.1, 0.7)
    assert call["num_inference_steps"] == 5 and call["num_images_per_prompt"] == 1
    assert call["face_embedding"].shape == (1, 64)
    assert torch.equal(call["latents"], torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7)))
    assert generation.request == request and playground.last is generation
    assert playground.result_view.value[:4] == b"\x89PNG" and "identity similarity" in playground.readout.value


def test_several_references_go_to_the_pipeline_as_one_n_by_d_array(playground, references):
    ids = tuple(references.keys[:3])
    playground.set(references=ids)
    call = playground.studio.call_args(playground.request())
    expected = np.stack([references.world.analyzer.get_face(references.image(i)).embedding for i in ids])
    assert np.allclose(call["face_embedding"], expected)                 # [3, 64]: the pipeline averages them
    generation = playground.generate(wait=True)
    assert len(generation.readout.per_identity) == 3
    assert np.isclose(generation.readout.identity_similarity, np.mean(generation.readout.per_identity))
    assert len(playground.reference_strip.children) == 3


def test_set_names_unknown_controls_and_an_empty_reference_is_reported(playground):
    with pytest.raises(InputError):
        playground.set(strength=0.5)
    playground.set(references=())
    with pytest.raises(InputError):
        playground.generate(wait=True)
    assert "error" in playground.status.value


# ----------------------------------------------------------------------------- pose editor


def test_pose_edits_move_the_keypoints():
    kps = np.array([[10.0, 12.0], [20.0, 12.0], [15.0, 17.0], [11.0, 22.0], [19.0, 22.0]])
    assert np.allclose(PoseEdit().apply(kps, 32), kps)
    assert np.allclose(PoseEdit(dx=2, dy=-1).apply(kps, 32), kps + [2, -1])
    assert np.allclose(PoseEdit(scale=2.0).apply(kps, 32, center=(15, 17)), (kps - [15, 17]) * 2 + [15, 17])
    turned = PoseEdit(roll=90).apply(kps, 32, center=(15, 17))
    assert np.allclose(turned[1], [10, 12])     # counter-clockwise on screen: the upper-right eye goes upper left
    mirrored = PoseEdit(mirror=True).apply(kps, 32)
    assert np.allclose(mirrored[0], [32 - 20, 12])         # index 0 stays the image-left eye
    yawed = turn_kps(kps, 1.0)
    assert np.allclose(yawed[[0, 1, 3, 4], 0] - kps[[0, 1, 3, 4], 0], 2.5) and np.isclose(yawed[2, 0] - kps[2, 0], 3.25)


def test_the_pose_editor_matches_the_worlds_own_drawing_of_that_pose():
    identity = 1_000_003
    base, center = render_id(identity, Pose()).kps, (Pose().cx * 32, Pose().cy * 32)
    for edit in [PoseEdit(roll=25, scale=1.2, dx=2, dy=-1), PoseEdit(roll=-10, mirror=True), PoseEdit(yaw=0.8)]:
        drawn = render_id(identity, miniature_pose(edit, 32)).kps
        drawn = mirror_kps(drawn, 32) if edit.mirror else drawn
        tolerance = 0.7 if edit.yaw else 1e-4             # a yaw-like turn is approximate
        assert np.abs(edit.apply(base, 32, center) - drawn).max() < tolerance


def test_pose_sliders_update_the_keypoint_preview_and_the_target(playground):
    kps_before, target_before = playground.kps_view.value, playground.target_view.value
    playground.controls["roll"].value = 30.0
    assert playground.kps_view.value != kps_before and playground.target_view.value != target_before
    request = playground.request()
    assert request.pose == PoseEdit(roll=30.0)
    playground.generate(wait=True)
    sent = playground.studio.world.pipe.calls[-1]["keypoint_image"]
    assert np.array_equal(np.asarray(sent), np.asarray(playground.studio.keypoint_image(request)))


# ----------------------------------------------------------------------------- history and sweep


def test_history_keeps_the_newest_results_and_restore_puts_their_settings_back(world, references):
    playground = _playground(world, references, history_size=3)
    try:
        for seed in range(5):
            playground.set(seed=seed, adapter_scale=0.2 * seed)
            playground.generate(wait=True)
        assert [g.request.seed for g in playground.history] == [2, 3, 4]
        assert len(playground.history_strip.children) == 3
        playground.restore(playground.history[0])
        assert playground.request() == playground.history[0].request
    finally:
        playground.close()


def test_a_sweep_is_one_batched_call_from_the_same_noise(playground):
    playground.set(seed=3, identitynet_scale=0.8)
    sweep = playground.sweep("adapter_scale", [0.0, 0.5, 1.0, 1.5], wait=True)
    call, = playground.studio.world.pipe.calls
    assert call["num_images_per_prompt"] == 4
    assert torch.equal(call["adapter_scale"], torch.tensor([0.0, 0.5, 1.0, 1.5]))
    assert call["identitynet_scale"] == 0.8
    assert call["latents"].shape == (4, 4, 16, 16) and all(torch.equal(x, call["latents"][0]) for x in call["latents"])
    assert sweep.values == (0.0, 0.5, 1.0, 1.5) and len(sweep.readouts) == 4
    assert [im.getpixel((0, 0))[0] for im in sweep.images] == [0, 20, 40, 60]    # in the order of the values
    assert len(playground.sweep_grid.children) == 4
    playground.generate(wait=True)
    titles = [ax.get_title() for ax in playground.snapshot().axes]   # the static picture: a row, then the sweep
    assert titles[:3] == [f"reference {playground.request().references[0]}", "target (world's drawing)",
                          "keypoint image"] and titles[3].startswith("result: similarity")
    assert titles[4:] == [f"adapter scale {v:g}: {r.identity_similarity:.2f}" for v, r in zip(sweep.values,
                                                                                             sweep.readouts)]
    with pytest.raises(InputError):
        playground.sweep("control_end", [0.5, 1.0])      # a window is per call, not per image


def test_the_sweep_controls_choose_the_field_and_values(playground):
    playground.sweep_field.value, playground.sweep_values.value = "identitynet_scale", "0, 1"
    playground.sweep(wait=True)
    assert torch.equal(playground.studio.world.pipe.calls[-1]["identitynet_scale"], torch.tensor([0.0, 1.0]))
    assert parse_values("0; 0.5, 2") == (0.0, 0.5, 2.0)
    with pytest.raises(InputError):
        parse_values("half")


# ----------------------------------------------------------------------------- live: the worker thread


def _steps(job, n: int, pause: float = 0.01, started: threading.Event = None):
    for i in range(n):
        if started is not None:
            started.set()
        time.sleep(pause)
        job.step(i + 1, n)
    return n


def test_a_new_request_cancels_the_running_one_at_its_next_step():
    runner, started = LatestOnly(), threading.Event()
    first = runner.submit(lambda job: _steps(job, 500, started=started))
    assert started.wait(5)
    second = runner.submit(lambda job: _steps(job, 3))
    assert second.result(timeout=5) == 3
    with pytest.raises(Cancelled):
        first.result(timeout=5)
    assert (runner.finished, runner.cancelled) == (1, 1) and not runner.busy
    runner.close()


def test_waiting_requests_are_replaced_not_queued():
    runner, started, release, ran = LatestOnly(), threading.Event(), threading.Event(), []
    blocker = runner.submit(lambda job: started.set() or (release.wait(5) and job.step(1, 1)))
    assert started.wait(5)  # the blocker runs: what follows waits behind it (else a slow thread start races)
    waiting = [runner.submit(lambda job, k=k: ran.append(k) or k) for k in range(3)]
    release.set()
    assert waiting[-1].result(timeout=5) == 2 and ran == [2]
    for future in [blocker, *waiting[:2]]:
        with pytest.raises(Cancelled):
            future.result(timeout=5)
    runner.close()


def test_live_changes_return_at_once_and_the_last_one_wins(world, references):
    pipe = RecordingPipe(step_seconds=0.05)                       # 10 steps: 0.5 s per image
    playground = _playground(world, references, pipe=pipe, live=True)
    try:
        start = time.perf_counter()
        for value in (0.25, 0.5, 0.75):
            playground.controls["adapter_scale"].value = value    # each change starts an image
        assert time.perf_counter() - start < 0.5                  # the kernel's thread never waited for one
        deadline = time.time() + 10
        while (playground.runner.busy or playground.last is None) and time.time() < deadline:
            time.sleep(0.01)
        assert playground.last.request.adapter_scale == 0.75
        assert playground.runner.finished == 1 and playground.runner.cancelled == 2
        assert all(t is not threading.main_thread() for t in pipe.threads)
        assert playground.progress.value == 1.0
    finally:
        playground.close()


# ----------------------------------------------------------------------------- the real miniature


@pytest.fixture(scope="module")
def live(world, references):
    playground = Playground(Studio(world, references), live=False)
    yield playground
    playground.close()


def test_adapter_and_identitynet_carry_the_identity_for_the_same_seeds(live, references):
    pairs = []                                       # (both off, both on) from the same noise, per seed
    for seed in range(3):
        live.set(references=(references.keys[1],), adapter_scale=0.0, identitynet_scale=0.0, seed=seed)
        both_off = live.generate(wait=True)
        live.set(adapter_scale=1.0, identitynet_scale=1.0)
        pairs.append((both_off, live.generate(wait=True)))
    off = np.mean([o.readout.identity_similarity for o, _ in pairs])
    on = np.mean([o.readout.identity_similarity for _, o in pairs])
    assert on > off + 0.3                            # one seed's base image can land near the person by chance
    assert all(o.readout.keypoint_error < f.readout.keypoint_error for f, o in pairs)
    assert all(o.target is not None and o.readout.target_similarity > 0.5 for _, o in pairs)


def test_a_sweep_gives_the_images_of_separate_calls(live):
    live.set(adapter_scale=1.0, identitynet_scale=1.0, seed=2)
    sweep = live.sweep("identitynet_scale", [0.0, 1.0], wait=True)
    for value, image in zip(sweep.values, sweep.images):
        live.set(identitynet_scale=value)
        alone = live.generate(wait=True).image
        assert np.abs(np.asarray(alone, np.int16) - np.asarray(image, np.int16)).max() <= 2


def test_a_running_generation_is_cancelled_cleanly(live):
    first = live.generate()
    second = live.generate()
    assert second.result(timeout=60).image.size == (32, 32)
    with pytest.raises(Cancelled):
        first.result(timeout=60)
    assert live.generate(wait=True).image.size == (32, 32)      # the pipeline still works


def test_attention_explorer_records_scoped_and_leaves_the_unet_as_it_was(live):
    from instantid_lab.attention import identity_processors

    unet = live.studio.world.pipe.unet
    before = dict(unet.attn_processors)
    record = live.attention.refresh().result(timeout=60)
    assert all(unet.attn_processors[name] is proc for name, proc in before.items())
    assert all(p.recorder is None for p in identity_processors(unet).values())
    assert record.steps == live.request().steps and len(record.maps.layers) == len(identity_processors(unet))
    assert "smiling" in [word for word, _ in record.words]
    text, identity = live.attention.maps(record.maps.layers[0], record.steps - 1, record.words[1][1], token=3)
    assert text.shape == identity.shape == (32, 32) and text.min() == 0.0 and np.isclose(text.max(), 1.0)
    live.attention.step_slider.value = 0                          # choosing a step redraws
    assert all(view.value[:4] == b"\x89PNG" for view in live.attention.views)
    assert "step 1 of" in live.attention.status.value


def test_one_image_is_live_on_this_cpu(live):
    live.set(steps=20)
    seconds = min(live.generate(wait=True).seconds for _ in range(2))
    print(f"one 20-step miniature image: {seconds:.2f} s")
    assert seconds < 3.0  # about 0.6 s on a free 2-core CPU; generous for a busy machine


def test_photo_references_run_the_same_panel_in_the_tiny_world():
    """The sdxl mode's code path (photos, uploads, no caption, no target) on tiny random weights."""
    from instantid_lab.data import photo
    from instantid_lab.worlds import open_world

    playground = Playground.open(world=open_world("tiny"), live=False)
    try:
        assert not playground.source.captioned and "prompt" in playground.controls
        playground.set(references=tuple(playground.source.keys[:2]), steps=2, prompt="a photo of a chef", roll=10.0)
        call = playground.studio.call_args(playground.request())
        assert call["face_embedding"].shape == (2, 128) and call["prompt"] == "a photo of a chef"
        generation = playground.generate(wait=True)
        assert generation.target is None
        assert generation.image.size == playground.source.size(generation.request.references)
        data = photo(playground.source.keys[0]).path.read_bytes()
        playground.upload.value = ({"name": "mine.jpg", "type": "image/jpeg", "size": len(data),
                                    "content": memoryview(data),
                                    "last_modified": datetime.datetime.now(datetime.timezone.utc)},)   # an upload
        assert playground.request().references == ("upload: mine.jpg",)
        assert playground.generate(wait=True).image.size[0] > 0
    finally:
        playground.close()
