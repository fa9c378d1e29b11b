"""The keypoint image and keypoint geometry.

The rendering is checked against an independent, purely geometric model of the released
drawing (no OpenCV): every pixel that lies clearly inside or clearly outside each shape must
have exactly the value the release's layering gives; only a 1-pixel band along the shape
outlines, where rasterisation rules decide, is left out.
"""

import hashlib
import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from instantid_lab.errors import InputError
from instantid_lab.keypoints import (
    KPS_COLORS,
    affine_kps,
    as_kps,
    crop_kps,
    draw_kps,
    fit_size,
    mirror_kps,
    resize_kps,
    rotate_kps,
    scale_kps,
    translate_kps,
)

FRONTAL = np.array([[180.3, 200.7], [270.9, 195.2], [228.4, 260.1], [190.6, 310.8], [262.2, 306.4]], np.float32)
TILTED = np.array([[60.2, 90.9], [120.5, 60.1], [110.7, 120.3], [95.2, 160.8], [150.4, 140.6]], np.float32)
OFF_FRAME = np.array([[-8.5, 20.0], [40.0, -6.0], [30.0, 40.0], [10.0, 70.0], [60.0, 65.0]], np.float64)
CLOSE_TOGETHER = np.array([[30.0, 30.0], [44.0, 31.0], [37.0, 42.0], [31.0, 50.0], [43.0, 50.0]], np.float64)

LIMB_PAIRS = ((0, 2), (1, 2), (3, 2), (4, 2))
UNDECIDED = -1


# ----------------------------------------------------------------------------- independent model


def _classify_disc(xs, ys, cx, cy, radius):
    """+1 clearly inside, 0 clearly outside, UNDECIDED on the outline (within 1 px)."""
    distance = np.hypot(xs - cx, ys - cy)
    return np.where(distance <= radius - 1, 1, np.where(distance >= radius + 1, 0, UNDECIDED))


def _classify_ellipse(xs, ys, cx, cy, a, b, degrees):
    theta = math.radians(degrees)
    u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    inner = (u / max(a - 1, 1e-9)) ** 2 + (v / (b - 1)) ** 2 <= 1
    outer = (u / (a + 1)) ** 2 + (v / (b + 1)) ** 2 >= 1
    return np.where(inner, 1, np.where(outer, 0, UNDECIDED))


def _layers(kps):
    """The shapes of the rendering in drawing order: (classification function, RGB value)."""
    layers = []
    for first, second in LIMB_PAIRS:
        (x0, y0), (x1, y1) = kps[first].astype(np.float64), kps[second].astype(np.float64)
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        half_length = int(math.hypot(x0 - x1, y0 - y1) / 2)
        angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
        dimmed = tuple(int(c * 0.6) for c in KPS_COLORS[first])  # 255 -> 153
        layers.append((lambda xs, ys, c=centre, a=half_length, t=angle: _classify_ellipse(xs, ys, *c, a, 4, t), dimmed))
    for (x, y), color in zip(kps, KPS_COLORS):
        layers.append((lambda xs, ys, c=(int(x), int(y)): _classify_disc(xs, ys, *c, 10), color))
    return layers


def expected_rendering(kps, size):
    """Expected [H, W, 3] values, and a mask of the pixels the model can decide: walking the
    layers from the top, a pixel is decided by the first shape it is clearly inside, and
    undecidable if it meets a shape's outline first."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    value = np.zeros((height, width, 3), np.int64)  # background: black
    known = np.ones((height, width), bool)
    settled = np.zeros((height, width), bool)
    for classify, color in reversed(_layers(kps)):  # top layer first
        status = classify(xs, ys)
        known &= ~(~settled & (status == UNDECIDED))
        value[~settled & (status == 1)] = color
        settled |= status != 0
    return value, known


# ----------------------------------------------------------------------------- draw_kps


@pytest.mark.parametrize(
    "kps, size",
    [(FRONTAL, (448, 512)), (TILTED, (200, 220)), (OFF_FRAME, (96, 80)), (CLOSE_TOGETHER, (72, 72))],
    ids=["frontal", "tilted", "off-frame", "close-together"],
)
def test_draw_kps_matches_the_geometric_model_of_the_release(kps, size):
    image = draw_kps(kps, size)
    assert image.size == size and image.mode == "RGB"
    got = np.asarray(image).astype(np.int64)
    want, known = expected_rendering(kps, size)
    assert known.mean() > 0.9  # the model decides almost every pixel
    mismatches = np.argwhere((got != want).any(axis=2) & known)
    assert len(mismatches) == 0, f"{len(mismatches)} pixels differ, first at (y, x) = {mismatches[:3].tolist()}"


def test_draw_kps_landmark_pixels():
    canvas = np.asarray(draw_kps(FRONTAL, (448, 512)))
    for (x, y), color in zip(FRONTAL, KPS_COLORS):
        assert tuple(canvas[int(y), int(x)]) == color  # circle centres: full colour
        assert tuple(canvas[int(y), int(x) + 9]) == color  # still inside radius 10
    # Midpoint of the left-eye limb, far from every circle: 0.6 x red, truncated.
    mid = (FRONTAL[0] + FRONTAL[2]) / 2
    assert tuple(canvas[int(mid[1]), int(mid[0])]) == (153, 0, 0)
    assert tuple(canvas[0, 0]) == (0, 0, 0) and tuple(canvas[-1, -1]) == (0, 0, 0)
    assert set(np.unique(canvas)) <= {0, 153, 255}


def test_draw_kps_golden_hash():
    # Recorded from this rendering after the geometric-model test above passed on it; guards
    # against a change in OpenCV's polygon or circle rasterisation.
    data = np.asarray(draw_kps(FRONTAL, (448, 512))).tobytes()
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN_FRONTAL


GOLDEN_FRONTAL = "28f32acda5316e8e"


def test_draw_kps_float32_and_float64_and_lists_agree_on_plain_values():
    kps = np.array([[40, 50], [80, 50], [60, 75], [45, 95], [75, 95]])
    images = [draw_kps(k, (128, 128)) for k in (kps, kps.astype(np.float32), kps.tolist())]
    assert all(np.array_equal(np.asarray(images[0]), np.asarray(im)) for im in images[1:])


def test_draw_kps_size_from_image_and_torch_keypoints():
    torch = pytest.importorskip("torch")
    photo = Image.new("RGB", (120, 90))
    image = draw_kps(torch.tensor(TILTED / 2), photo)
    assert image.size == (120, 90)
    assert np.array_equal(np.asarray(image), np.asarray(draw_kps(TILTED / 2, (120, 90))))


@pytest.mark.parametrize("bad", [np.zeros((4, 2)), np.zeros((5, 3)), np.zeros(10), [[1, 2]] * 5 + [[np.nan, 1]]])
def test_bad_keypoints_raise_input_error(bad):
    with pytest.raises(InputError):
        draw_kps(bad, (64, 64))


def test_nan_keypoints_raise():
    kps = FRONTAL.copy()
    kps[2, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        as_kps(kps)


@pytest.mark.parametrize("size", [(0, 10), (-5, 5), "big", (10,)])
def test_bad_size_raises_input_error(size):
    with pytest.raises(InputError):
        draw_kps(FRONTAL, size)


# ----------------------------------------------------------------------------- geometry


def _bright_spot(size, x, y):
    """A black image with a 3 x 3 white square centred on the continuous point (x, y)."""
    canvas = np.zeros((size[1], size[0]), np.uint8)
    canvas[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 255
    return Image.fromarray(canvas)


def _spot_centre(image):
    array = np.asarray(image, dtype=np.float64)
    ys, xs = np.nonzero(array > 0.5 * array.max())
    weights = array[ys, xs]
    return np.array([(xs * weights).sum() / weights.sum() + 0.5, (ys * weights).sum() / weights.sum() + 0.5])


def test_rotate_kps_follows_a_pil_rotated_image():
    size, point, centre = (200, 160), (150.5, 40.5), (90.0, 70.0)
    kps = np.tile(point, (5, 1))
    rotated_image = _bright_spot(size, *point).rotate(35, center=centre, resample=Image.BILINEAR)
    assert np.allclose(rotate_kps(kps, 35, center=centre)[0], _spot_centre(rotated_image), atol=0.6)


def test_rotate_kps_direction_and_inverse():
    kps = np.array([[1.0, 0.0]] * 5)
    # Counter-clockwise on screen (y down): the point to the right of the centre moves up.
    assert np.allclose(rotate_kps(kps, 90, center=(0, 0))[0], [0.0, -1.0])
    there_and_back = rotate_kps(rotate_kps(FRONTAL, 23.0), -23.0)
    assert np.allclose(there_and_back, FRONTAL, atol=1e-3)
    assert np.allclose(rotate_kps(FRONTAL, 30).mean(axis=0), FRONTAL.mean(axis=0), atol=1e-3)  # centroid fixed


def test_mirror_kps_follows_a_mirrored_image_and_swaps_sides():
    size = (120, 100)
    kps = np.array([[30.5, 40.5], [70.5, 41.5], [50.5, 60.5], [35.5, 80.5], [68.5, 79.5]])
    mirrored = mirror_kps(kps, size[0])
    for index, source in enumerate((1, 0, 2, 4, 3)):
        spot = _spot_centre(ImageOps.mirror(_bright_spot(size, *kps[source])))
        assert np.allclose(mirrored[index], spot, atol=1e-6)
    assert mirrored[0, 0] < mirrored[1, 0] and mirrored[3, 0] < mirrored[4, 0]  # left stays left
    assert np.allclose(mirror_kps(mirrored, size[0]), kps)


def test_resize_and_crop_kps_follow_the_image():
    size, point = (160, 120), (100.5, 30.5)
    kps = np.tile(point, (5, 1))
    resized = _bright_spot(size, *point).resize((320, 60), Image.BILINEAR)
    assert np.allclose(resize_kps(kps, size, (320, 60))[0], _spot_centre(resized), atol=0.6)
    box = (40, 10, 140, 90)
    cropped = _bright_spot(size, *point).crop(box)
    assert np.allclose(crop_kps(kps, box)[0], _spot_centre(cropped), atol=1e-6)


def test_scale_and_translate_kps():
    scaled = scale_kps(FRONTAL, 2.0)
    centroid = FRONTAL.astype(np.float64).mean(axis=0)
    assert np.allclose(scaled.mean(axis=0), centroid, atol=1e-3)
    assert np.allclose(scaled - centroid, 2 * (FRONTAL - centroid), atol=1e-3)
    assert np.allclose(scale_kps(FRONTAL, 0.5, center=(0, 0)), FRONTAL / 2)
    assert np.allclose(translate_kps(FRONTAL, 5, -3), FRONTAL + [5, -3])
    with pytest.raises(InputError):
        scale_kps(FRONTAL, 0.0)


def test_geometry_keeps_float32_and_validates():
    assert affine_kps(FRONTAL, [[1, 0, 0], [0, 1, 0]]).dtype == np.float32
    assert translate_kps(FRONTAL.tolist(), 1, 1).dtype == np.float64
    with pytest.raises(InputError):
        affine_kps(FRONTAL, np.eye(3))
    with pytest.raises(InputError):
        crop_kps(FRONTAL, (10, 10, 5, 20))
    with pytest.raises(InputError):
        rotate_kps(np.zeros((6, 2)), 10)


# ----------------------------------------------------------------------------- fit_size


@pytest.mark.parametrize(
    "size, target, want",
    [((2000, 2000), 1024, (1024, 1024)), ((1200, 800), 1024, (1536, 1024)), ((600, 900), 1024, (1024, 1536)),
     ((1000, 700), 768, (1088, 768)), ((100, 300), 64, (64, 192))],
)
def test_fit_size(size, target, want):
    assert fit_size(size, target_short=target) == want
    assert all(side % 64 == 0 for side in fit_size(size, target_short=target))


def test_fit_size_keeps_aspect_and_rejects_bad_input():
    width, height = fit_size((1920, 1080))
    assert height == 1024 and abs(width / height - 1920 / 1080) < 64 / 1024
    assert fit_size(Image.new("RGB", (300, 300)), target_short=512) == (512, 512)
    with pytest.raises(InputError):
        fit_size((0, 100))
    with pytest.raises(InputError):
        fit_size((100, 100), multiple=0)
