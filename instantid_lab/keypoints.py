"""The keypoint image IdentityNet sees, and the geometry of the 5 facial keypoints.

The 5 keypoints, in order: 0 left eye, 1 right eye, 2 nose tip, 3 left mouth corner,
4 right mouth corner ("left" = image left). An array of keypoints has shape [5, 2], (x, y)
in pixels.

Pixel convention used everywhere in this module: pixel (i, j) covers the square
[i, i + 1) x [j, j + 1), so the top-left corner of the image is (0, 0), the image spans
[0, width] x [0, height] and `draw_kps` places a keypoint in pixel (int(x), int(y)).
With this convention resizing is a plain multiplication and mirroring is `width - x`.

`draw_kps` reproduces the released rendering pixel for pixel (IdentityNet was trained on it):
limbs from every point to the nose as filled ellipse polygons, the canvas dimmed to 0.6,
then a filled circle of radius 10 on every keypoint, each in its own colour.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from .errors import InputError

#: Names of the 5 keypoints, in the order face analysis returns them.
KEYPOINT_NAMES = ("left eye", "right eye", "nose", "left mouth", "right mouth")
#: RGB colour of each keypoint in the keypoint image.
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
#: Limbs (first point, second point): every point joined to the nose; coloured by the first point.
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
#: Half-width of a limb's ellipse, in pixels.
STICK_WIDTH = 4
#: Factor the canvas is multiplied by after the limbs are drawn (before the circles).
LIMB_DIM = 0.6
#: Radius of the filled circle drawn on each keypoint.
POINT_RADIUS = 10
#: New order after a horizontal mirror: the eyes swap (0 <-> 1), so do the mouth corners (3 <-> 4).
MIRROR_ORDER = (1, 0, 2, 4, 3)

Size = tuple[int, int]
Point = tuple[float, float]


def as_kps(kps) -> np.ndarray:
    """Validate keypoints and return them as a numpy array of shape [5, 2].

    A float32 or float64 array keeps its dtype (so `draw_kps` computes exactly as the release
    does on float32 keypoints from face analysis); anything else becomes float64.

    :param kps: shape [5, 2]: a numpy array, a torch tensor, or nested lists.
    :raises InputError: the shape is not [5, 2] or a value is not finite.
    """
    if hasattr(kps, "detach"):  # torch tensor
        kps = kps.detach().cpu().numpy()
    try:
        array = np.asarray(kps)
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"keypoints must be numbers of shape [5, 2], got {kps!r}") from e
    if array.shape != (5, 2):
        raise InputError(
            f"keypoints must have shape [5, 2] (left eye, right eye, nose, left mouth, right mouth; "
            f"x, y), got shape {list(array.shape)}. For a Face use face.kps."
        )
    if not np.isfinite(array).all():
        raise InputError("keypoints contain NaN or infinite values.")
    return array


def _as_size(size) -> Size:
    if isinstance(size, Image.Image):
        size = size.size
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as e:
        raise InputError(f"size must be (width, height) or a PIL image, got {size!r}") from e
    if width <= 0 or height <= 0:
        raise InputError(f"size must be positive (width, height), got {size!r}")
    return width, height


# ----------------------------------------------------------------------------- keypoint image


def draw_kps(kps, size) -> Image.Image:
    """Render the keypoint image IdentityNet is conditioned on (the release's rendering, exactly).

    :param kps: shape [5, 2], (x, y) pixels in an image of `size`.
    :param size: (width, height) of the output, or a PIL image whose size to use.
    :return: RGB image of `size`: black background, limbs at 0.6 x colour, circles at full colour.
    """
    width, height = _as_size(size)
    kps = as_kps(kps)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    for first, second in LIMBS:
        polygon = limb_polygon(kps[first], kps[second])
        cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[first])
    canvas = (canvas * LIMB_DIM).astype(np.uint8)  # truncates: 255 -> 153
    for (x, y), color in zip(kps, KPS_COLORS):
        cv2.circle(canvas, (int(x), int(y)), POINT_RADIUS, color, -1)
    return Image.fromarray(canvas, mode="RGB")


def limb_polygon(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The polygon of one limb: an ellipse around the segment start-end, half-axes (length/2, 4).

    Computed in the points' own dtype, as the release does: centre = int(mean), half-length =
    int(length / 2), angle = int(degrees(atan2(dy, dx))) with (dx, dy) = start - end.

    :param start: shape [2], the limb's first point (its colour).
    :param end: shape [2], the nose.
    :return: int32 vertices, shape [V, 2].
    """
    points = np.stack([start, end])  # [2, 2]
    centre_x, centre_y = points.mean(axis=0)
    dx, dy = start - end
    length = (dx**2 + dy**2) ** 0.5
    angle = math.degrees(math.atan2(dy, dx))
    axes = (int(length / 2), STICK_WIDTH)
    return cv2.ellipse2Poly((int(centre_x), int(centre_y)), axes, int(angle), 0, 360, 1)


# ----------------------------------------------------------------------------- geometry


def affine_kps(kps, matrix) -> np.ndarray:
    """Apply a 2 x 3 affine matrix to keypoints: p' = A @ p + t (the layout of cv2.warpAffine).

    Every other geometry function here is this one with a particular matrix, so keypoints
    follow an image warped with `cv2.warpAffine(image, matrix, size)`.

    :param kps: shape [5, 2].
    :param matrix: shape [2, 3], [[a, b, tx], [c, d, ty]].
    :return: shape [5, 2], float32 if `kps` was float32, else float64.
    """
    points = as_kps(kps)
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise InputError(f"an affine matrix must have shape [2, 3], got {list(matrix.shape)}")
    out = points.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]  # [5, 2]
    return out.astype(points.dtype)


def translate_kps(kps, dx: float, dy: float) -> np.ndarray:
    """Shift keypoints by (dx, dy) pixels (positive dy moves down)."""
    return affine_kps(kps, [[1.0, 0.0, dx], [0.0, 1.0, dy]])


def scale_kps(kps, factor: float, center: Optional[Point] = None) -> np.ndarray:
    """Scale keypoints by `factor` about `center` (default: their centroid), e.g. to enlarge the face.

    :param factor: > 0; 2.0 doubles every distance from `center`.
    """
    if not factor > 0:
        raise InputError(f"scale factor must be > 0, got {factor}")
    cx, cy = _center(kps, center)
    return affine_kps(kps, [[factor, 0.0, (1 - factor) * cx], [0.0, factor, (1 - factor) * cy]])


def rotate_kps(kps, degrees: float, center: Optional[Point] = None) -> np.ndarray:
    """Rotate keypoints by `degrees` counter-clockwise as seen on screen (y points down),
    about `center` (default: their centroid).

    The same convention as `PIL.Image.rotate(degrees, center=...)` and
    `cv2.getRotationMatrix2D(center, degrees, 1)`, so keypoints follow a rotated photo.
    """
    cx, cy = _center(kps, center)
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix = [[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]]
    return affine_kps(kps, matrix)


def resize_kps(kps, from_size: Size, to_size: Size) -> np.ndarray:
    """Keypoints of an image of `from_size` moved to the same image resized to `to_size`.

    :param from_size: (width, height) the keypoints refer to.
    :param to_size: (width, height) of the resized image (the aspect ratio may change).
    """
    (w0, h0), (w1, h1) = _as_size(from_size), _as_size(to_size)
    return affine_kps(kps, [[w1 / w0, 0.0, 0.0], [0.0, h1 / h0, 0.0]])


def crop_kps(kps, box: Sequence[float]) -> np.ndarray:
    """Keypoints in the coordinates of `image.crop(box)`.

    :param box: (left, top, right, bottom), as `PIL.Image.crop` takes it.
    """
    if len(box) != 4:
        raise InputError(f"box must be (left, top, right, bottom), got {box!r}")
    left, top, right, bottom = box
    if right <= left or bottom <= top:
        raise InputError(f"box must have right > left and bottom > top, got {box!r}")
    return translate_kps(kps, -left, -top)


def mirror_kps(kps, width: int) -> np.ndarray:
    """Keypoints of the horizontally mirrored image (`PIL.ImageOps.mirror`): x -> width - x,
    and left/right swapped (eyes 0 <-> 1, mouth corners 3 <-> 4) so index 0 stays the image-left eye.

    :param width: width of the image the keypoints belong to.
    """
    mirrored = affine_kps(kps, [[-1.0, 0.0, float(width)], [0.0, 1.0, 0.0]])
    return mirrored[list(MIRROR_ORDER)]


def _center(kps, center: Optional[Point]) -> Point:
    if center is None:
        cx, cy = as_kps(kps).astype(np.float64).mean(axis=0)
        return float(cx), float(cy)
    if len(center) != 2:
        raise InputError(f"center must be (x, y), got {center!r}")
    return float(center[0]), float(center[1])


# ----------------------------------------------------------------------------- output size


def fit_size(size, target_short: int = 1024, multiple: int = 64) -> Size:
    """An output size with the aspect ratio of `size`, the short side scaled to `target_short`,
    each side rounded to the nearest multiple of `multiple` (at least one multiple).

    The pipeline uses it so the output size follows the requested size, not the keypoint
    image's (a 2000 x 2000 reference photo must not mean a 2000 x 2000 generation).

    :param size: (width, height), or a PIL image.
    :return: (width, height), both multiples of `multiple`.
    """
    width, height = _as_size(size)
    if target_short <= 0 or multiple <= 0:
        raise InputError(f"target_short and multiple must be > 0, got {target_short}, {multiple}")
    scale = target_short / min(width, height)
    return _round_to(width * scale, multiple), _round_to(height * scale, multiple)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, math.floor(value / multiple + 0.5) * multiple)  # half rounds up
