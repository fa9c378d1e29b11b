import math

import numpy as np
import pytest

from instantid_lab.miniature.world import (
    HELDOUT_IDS, TRAIN_IDS, Caption, Identity, Pose, random_samples, render, render_id,
)


def test_same_id_pose_and_caption_render_the_same_pixels():
    a = render_id(3, Pose(roll=10), Caption("green", "smiling"))
    b = render_id(3, Pose(roll=10), Caption("green", "smiling"))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.kps, b.kps)


def test_different_identities_have_different_parameters_and_pixels():
    assert Identity.from_id(1) != Identity.from_id(2)
    assert not np.array_equal(np.asarray(render_id(1).image), np.asarray(render_id(2).image))


def test_training_and_heldout_identity_ranges_are_disjoint():
    assert set(TRAIN_IDS).isdisjoint(HELDOUT_IDS)


def test_keypoints_are_in_instantid_order_for_an_upright_face():
    kps = render_id(5, size=64).kps
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = kps
    assert lex < nx < rex and lmx < rmx
    assert max(ley, rey) < ny < min(lmy, rmy)
    assert kps.shape == (5, 2) and kps.dtype == np.float32


def test_keypoints_sit_on_the_drawn_eyes():
    sample = render_id(11, Pose(), Caption("red"), size=128)
    pixels = np.asarray(sample.image).astype(int)
    for x, y in sample.kps[:2]:
        # the pupil colour differs clearly from the red background at the eye keypoint
        assert np.abs(pixels[int(y), int(x)] - (190, 70, 70)).sum() > 60


def test_roll_rotates_the_keypoints_about_the_face_centre():
    upright, rolled = render_id(7, Pose(roll=0.0), size=64).kps, render_id(7, Pose(roll=15.0), size=64).kps
    eye_angle = lambda k: math.degrees(math.atan2(k[1, 1] - k[0, 1], k[1, 0] - k[0, 0]))
    assert eye_angle(upright) == pytest.approx(0.0, abs=1e-6)
    assert eye_angle(rolled) == pytest.approx(15.0, abs=1e-4)  # image y points down: positive roll tilts clockwise


def test_caption_text_names_each_attribute():
    text = Caption("stripes", "smiling", "glasses", "outline").text()
    assert text == "a smiling face with glasses, stripes background, outline style"
    assert "hat" in Caption(accessory="hat").text()


def test_random_samples_are_deterministic_and_use_only_the_given_identities():
    a, b = random_samples(range(10), 6, seed=1), random_samples(range(10), 6, seed=1)
    assert [s.identity_id for s in a] == [s.identity_id for s in b]
    assert all(0 <= s.identity_id < 10 for s in a)
    assert all(s.image.size == (32, 32) for s in a)
