"""dlib's CNN (MMOD) face detector in PyTorch: the same weights, the same detections, faster.

The dlib backend falls back on `dlib.cnn_face_detection_model_v1` (the file
`mmod_human_face_detector.dat` of `face_recognition_models`) for turned faces its HOG detector
misses and to confirm weak HOG proposals. dlib's build here runs it without BLAS (~1 s on a
384-px photo); this port runs the network in torch and the rest (pyramid, window mapping,
non-maximum suppression) in a few lines of numpy.

The network, in dlib's template notation (input at the bottom)::

    loss_mmod<con<1,9,9,1,1,                       head: one score per position
        rcon5<rcon5<rcon5<                         body: 3 x (5x5 conv, 45 filters, affine, relu)
        downsampler<                               3 x (5x5 conv stride 2, affine, relu): 16, 32, 32 filters
        input_rgb_image_pyramid<pyramid_down<6>>>...>

How dlib turns an image into detections (dlib/dnn/input.h, loss.h, image_pyramid.h), which
`MmodDetector.detect` follows step by step:

1. **Tiled pyramid** (`tiled_pyramid_layout`, `tiled_pyramid`): the image and copies scaled by
   5/6, (5/6)^2, ... (each level ``floor(5/6 * size)`` of the previous one, bilinear with
   aligned corners, down to 5 rows) are packed into one zero-filled canvas: a first column of
   levels top to bottom, the rest stacked bottom-up along the right edge, 10 px between tiles
   and 11 px around. Pixel values are ``(p - mean[channel]) / 256`` (means in the file).
2. **Scores**: the network maps the canvas to one score map at 1/8 resolution.
3. **Windows**: every position with a score > 0 is a detection. Its place in the canvas is
   ``8 * (column, row) + 14`` (the receptive-field centre: each 5x5 stride-2 conv maps
   ``p -> 2 p + 2``, the padded convs keep p); the 80x80 detector window centred there is
   mapped to the tile that holds its centre and scaled up by 6/5 per level
   (``p -> 6/5 p + 0.3``), then rounded to whole pixels (halves away from zero).
4. **Non-maximum suppression**: by score, highest first, a detection is dropped if it
   overlaps an already kept one by IoU > 0.338 (dlib's `test_box_overlap`, on inclusive pixel
   rectangles; the threshold is in the file).
5. ``upsample`` n > 0 first enlarges the image n times (`pyramid_up`: about 2x, bilinear) and
   maps the boxes back (``p -> p / 2 - (1.25, 0.75)`` per level).

The file stores the training network: its batch-norm layers are folded into `affine` ones
(``gamma / sqrt(running_variance + eps)``), as dlib does when it loads them (`dlib_resnet`'s
reader). Boxes come back as x1, y1, x2, y2 with x2, y2 exclusive (dlib's ``right() + 1``), the
convention of the dlib backend's `rect_to_box`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, InputError
from ..types import PathLike
from .dlib_format import Affine, DlibLayer, DlibReader, read_dlib_bytes, read_layer_stack, torch_threads

#: Each level of pyramid_down<2> (used by `upsample`) in image coordinates: p_down = p / 2 - shift.
UP_SHIFT = np.array([1.25, 0.75, 1.25, 0.75])  # x, y, x, y
#: The pyramid stops before a level would have fewer rows than this (dlib's min_height).
MIN_LEVEL_ROWS = 5


# ------------------------------------------------------------------------------ the network


@dataclass(frozen=True)
class MmodConfig:
    """Shape of dlib's MMOD face-detector network.

    :param downsampler: filters of the 5x5 stride-2 convolutions (unpadded), input side first.
    :param body: filters of the 5x5 stride-1 convolutions (padding 2) after them.
    :param head_size: side of the last convolution (one filter, padding half of it).
    """

    downsampler: tuple[int, ...] = (16, 32, 32)
    body: tuple[int, ...] = (45, 45, 45)
    head_size: int = 9

    @classmethod
    def v1(cls) -> "MmodConfig":
        """`mmod_human_face_detector`, as released (the defaults)."""
        return cls()

    @classmethod
    def tiny(cls) -> "MmodConfig":
        """A few channels: for tests with random weights."""
        return cls(downsampler=(4, 4, 4), body=(4,), head_size=3)

    def conv_shapes(self) -> list[tuple[int, int, int, int, int]]:
        """(in channels, out channels, size, stride, padding) of every convolution, input side first."""
        shapes, channels = [], 3
        for width in self.downsampler:
            shapes.append((channels, width, 5, 2, 0))
            channels = width
        for width in self.body:
            shapes.append((channels, width, 5, 1, 2))
            channels = width
        return shapes + [(channels, 1, self.head_size, 1, self.head_size // 2)]


class ConvAffineRelu(nn.Module):
    """relu(affine(con(x))): one `downsampler` step or one `rcon5`."""

    def __init__(self, in_channels: int, out_channels: int, size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, size, stride, padding)
        self.affine = Affine(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """:param x: shape [B, C_in, H, W] -> [B, C_out, H', W']"""
        return F.relu(self.affine(self.conv(x)))


class MmodNetwork(nn.Module):
    """dlib's MMOD detector network: a normalised image canvas -> one score map at 1/8 resolution.

    Build, then load: ``net = MmodNetwork(config); net.load_state_dict(state)``, or
    `load_mmod_detector(path)` for the released file.
    """

    def __init__(self, config: MmodConfig = MmodConfig()):
        super().__init__()
        self.config = config
        *steps, head = config.conv_shapes()
        self.downsampler = nn.ModuleList(ConvAffineRelu(*s) for s in steps[: len(config.downsampler)])
        self.body = nn.ModuleList(ConvAffineRelu(*s) for s in steps[len(config.downsampler) :])
        self.head = nn.Conv2d(head[0], head[1], head[2], head[3], head[4])

    def forward(self, canvas: Tensor) -> Tensor:
        """:param canvas: shape [B, 3, H, W], values (pixel - mean) / 256.
        :return: shape [B, 1, h, w]: each unpadded 5x5 stride-2 conv maps a side s to (s - 5) // 2 + 1,
            the padded ones keep it."""
        x = canvas
        for step in [*self.downsampler, *self.body]:
            x = step(x)
        return self.head(x)

    def output_to_input(self, column: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where output positions sit in the input canvas (dlib's `output_tensor_to_input_tensor`).

        Each convolution, output side first, maps ``p -> p * stride - padding + size // 2``.
        """
        x, y = np.asarray(column, np.float64), np.asarray(row, np.float64)
        for _, _, size, stride, padding in reversed(self.config.conv_shapes()):
            x, y = x * stride - padding + size // 2, y * stride - padding + size // 2
        return x, y


# ------------------------------------------------------------------------------ the image pyramid


class Tile(NamedTuple):
    """One pyramid level's place in the canvas: left, top and size in pixels."""

    left: int
    top: int
    width: int
    height: int


def tiled_pyramid_layout(
    rows: int, cols: int, down: int = 6, padding: int = 10, outer_padding: int = 11
) -> tuple[list[Tile], tuple[int, int]]:
    """Where dlib's `input_rgb_image_pyramid<pyramid_down<down>>` puts each level.

    Level sizes: ``floor((down - 1) / down * size)`` of the previous level, until a level would
    have no pixels or fewer than `MIN_LEVEL_ROWS` rows. The first column holds levels top to
    bottom until the rest fit beside them; those are stacked bottom-up against the right edge,
    and any that would overlap level 0 are dropped.

    :return: (tiles, level 0 first; (canvas rows, canvas cols)).
    """
    sizes = _level_sizes(rows, cols, down)
    height = _first_column_height(sizes, padding)
    tiles, y = [], outer_padding
    for w, h in sizes:  # first column, top down
        if y >= height + outer_padding:
            break
        tiles.append(Tile(outer_padding, y, w, h))
        y += h + padding
    y -= padding
    right = outer_padding + cols  # one past the canvas's image area, like level 0's right edge
    for w, h in sizes[len(tiles) :]:  # along the right edge, bottom up
        if y - h < outer_padding + rows:  # would overlap level 0
            break
        tiles.append(Tile(right - w, y - h, w, h))
        y -= h + padding
    return tiles, (height + 2 * outer_padding, cols + 2 * outer_padding)


def _level_sizes(rows: int, cols: int, down: int) -> list[tuple[int, int]]:
    """(width, height) of every pyramid level, level 0 first (dlib's `find_pyramid_down_output_image_size`)."""
    sizes = [(cols, rows)]
    while True:
        rows, cols = math.floor((down - 1) / down * rows), math.floor((down - 1) / down * cols)
        if rows * cols == 0 or rows < MIN_LEVEL_ROWS:
            return sizes
        sizes.append((cols, rows))


def _first_column_height(sizes: list[tuple[int, int]], padding: int) -> int:
    """Rows the first column of tiles takes (dlib: go down until the next level fits beside
    the previous one and the column holds at least half of the total height)."""
    total = sum(h + padding for _, h in sizes) - 2 * padding
    height, previous_width = 0, 0
    for w, h in sizes:
        if w <= sizes[0][0] - previous_width - padding and (height - sizes[0][1]) * 2 >= total - sizes[0][1]:
            break
        height += h + padding
        previous_width = w
    return height - padding


def tiled_pyramid(rgb: np.ndarray, tiles: Sequence[Tile], shape: tuple[int, int], mean: Tensor) -> Tensor:
    """The network's input: every pyramid level of `rgb` in its tile of a zero canvas.

    Level 0 is ``(rgb - mean) / 256``; level i is level i-1 resized bilinearly (aligned
    corners, dlib's `resize_image`) to its tile. The canvas is laid out channels-last in
    memory: torch's CPU convolutions run this network ~1.6x faster so (measured, one thread).

    :param rgb: shape [H, W, 3], uint8.
    :param mean: shape [3], R, G, B.
    :return: shape [1, 3, rows, cols] of `shape`, float32, channels-last memory.
    """
    canvas = torch.zeros(1, *shape, 3).permute(0, 3, 1, 2)  # [1, rows, cols, 3] -> [1, 3, rows, cols]
    pixels = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).float()  # [H, W, 3]
    level = ((pixels - mean) / 256.0).permute(2, 0, 1)[None]  # [1, 3, H, W], channels-last memory
    for i, (left, top, width, height) in enumerate(tiles):
        if i > 0:
            level = F.interpolate(level, size=(height, width), mode="bilinear", align_corners=True)
        canvas[:, :, top : top + height, left : left + width] = level
    return canvas


def pyramid_up(rgb: np.ndarray) -> np.ndarray:
    """dlib's `pyramid_up` with `pyramid_down<2>`: the image enlarged to (2H + 1) x (2W + 2)
    (the upscaled rectangle of the image), bilinear with aligned corners, truncated to uint8.

    :param rgb: shape [H, W, 3], uint8.
    :return: shape [2H + 1, 2W + 2, 3], uint8.
    """
    height, width = rgb.shape[:2]
    x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    up = F.interpolate(x, size=(2 * height + 1, 2 * width + 2), mode="bilinear", align_corners=True)
    return up[0].permute(1, 2, 0).floor().clamp(0, 255).to(torch.uint8).numpy()  # [2H + 1, 2W + 2, 3]


# ------------------------------------------------------------------------------ windows and suppression


def window_boxes(
    x: np.ndarray, y: np.ndarray, window: tuple[int, int], tiles: Sequence[Tile], down: int = 6
) -> np.ndarray:
    """Image rectangles of detector windows centred at canvas points (dlib's `tensor_space_to_image_space`).

    The window (width w, height h) spans ``p ± (w - 1) / 2``; it is mapped from the tile that
    holds (or is nearest to) its centre, level k, by ``p -> down / (down - 1) * p + 0.3``
    k times, and rounded to whole pixels (`round_half_away`).

    :param x: shape [N], canvas columns; y: shape [N], rows.
    :return: shape [N, 4], int64: left, top, right, bottom (inclusive, dlib's rectangle).
    """
    half_w, half_h = (window[0] - 1) / 2, (window[1] - 1) / 2
    ratio = down / (down - 1.0)  # dlib's point_up, in its order of operations
    boxes = np.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=1)  # [N, 4]
    for i, (cx, cy) in enumerate(zip(round_half_away(x), round_half_away(y))):
        level = nearest_tile(tiles, cx, cy)
        box = boxes[i] - np.array([tiles[level].left, tiles[level].top] * 2)
        for _ in range(level):
            box = box * ratio + 0.3
        boxes[i] = box
    return round_half_away(boxes).astype(np.int64)


def round_half_away(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (``std::round``: -4.5 -> -5, 4.5 -> 5),
    as dlib's conversion of a real rectangle to pixels rounds (measured on its detections)."""
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def nearest_tile(tiles: Sequence[Tile], x: float, y: float) -> int:
    """Index of the first tile that contains (x, y), else of the nearest one (dlib's `nearest_rect`)."""
    best, best_distance = 0, math.inf
    for i, (left, top, width, height) in enumerate(tiles):
        dx = min(max(x, left), left + width - 1) - x
        dy = min(max(y, top), top + height - 1) - y
        if dx == 0 and dy == 0:
            return i
        if math.hypot(dx, dy) < best_distance:
            best, best_distance = i, math.hypot(dx, dy)
    return best


def overlaps(a: np.ndarray, b: np.ndarray, iou: float, covered: float) -> bool:
    """dlib's `test_box_overlap` on inclusive rectangles (left, top, right, bottom): IoU > `iou`,
    or the intersection covers more than `covered` of either box."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return False
    inner = float(w * h)
    area_a = float((a[2] - a[0] + 1) * (a[3] - a[1] + 1))
    area_b = float((b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return inner / (area_a + area_b - inner) > iou or inner / area_a > covered or inner / area_b > covered


def suppress(boxes: np.ndarray, scores: np.ndarray, iou: float, covered: float) -> list[int]:
    """Greedy non-maximum suppression, highest score first: indices of the kept boxes, in that order.

    :param boxes: shape [N, 4], inclusive rectangles; scores: shape [N].
    """
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if not any(overlaps(boxes[k], boxes[i], iou, covered) for k in kept):
            kept.append(int(i))
    return kept


# ------------------------------------------------------------------------------ the detector


@dataclass(frozen=True)
class MmodOptions:
    """The detector's settings stored in the file (loss_mmod's options, the input layer's).

    :param window: detector window (width, height) in pixels of a pyramid level.
    :param nms_iou: detections overlapping a better one by IoU above this are dropped.
    :param nms_covered: ... or covering more than this fraction of either box.
    :param mean: R, G, B means subtracted before dividing by 256.
    :param down: the pyramid's N of pyramid_down<N>: each level is (N - 1) / N of the previous.
    :param padding: pixels between tiles of the canvas; outer_padding: around them.
    """

    window: tuple[int, int] = (80, 80)
    nms_iou: float = 0.3382761351109955
    nms_covered: float = 1.0
    mean: tuple[float, float, float] = (122.782, 117.001, 104.298)
    down: int = 6
    padding: int = 10
    outer_padding: int = 11


class MmodDetection(NamedTuple):
    """One face: box x1, y1, x2, y2 (float32, x2/y2 exclusive) and dlib's confidence (the raw score)."""

    box: np.ndarray
    confidence: float


class MmodDetector:
    """dlib's CNN face detector: `detect(rgb, upsample)` equals ``cnn_face_detection_model_v1(rgb, upsample)``.

    :param network: the loaded `MmodNetwork` (read-only).
    :param options: the file's detection settings.
    :param threads: intra-op torch threads for a call (None: torch's setting). One photo is
        small work: on a shared 2-core CPU one thread is fastest (see `load_mmod_detector`).
    """

    def __init__(self, network: MmodNetwork, options: MmodOptions = MmodOptions(), threads: Optional[int] = 1):
        self.network, self.options, self.threads = network.eval(), options, threads
        self.mean = torch.tensor(options.mean, dtype=torch.float32)

    @torch.inference_mode()
    def scores(self, rgb: np.ndarray) -> tuple[np.ndarray, list[Tile]]:
        """The network's score map over the tiled pyramid of `rgb`, and the pyramid's tiles.

        :param rgb: shape [H, W, 3], uint8.
        :return: (shape [h, w] float32, tiles).
        """
        o = self.options
        tiles, shape = tiled_pyramid_layout(*rgb.shape[:2], o.down, o.padding, o.outer_padding)
        with torch_threads(self.threads):
            canvas = tiled_pyramid(rgb, tiles, shape, self.mean)  # [1, 3, rows, cols]
            return self.network(canvas)[0, 0].numpy(), tiles  # [1, 1, h, w] -> [h, w]

    def detect(self, rgb: np.ndarray, upsample: int = 0, threshold: float = 0.0) -> list[MmodDetection]:
        """Faces in an image, best first.

        :param rgb: shape [H, W, 3] RGB or [H, W] grey, uint8.
        :param upsample: times the image is first enlarged ~2x (finds faces from ~40 px, 4x the work each).
        :param threshold: keep windows scoring above this (dlib's `adjust_threshold`, 0).
        """
        image = _as_rgb(rgb)
        if int(upsample) < 0:
            raise InputError(f"upsample must be >= 0 (times the image is enlarged); got {upsample}.")
        for _ in range(int(upsample)):
            image = pyramid_up(image)
        scores, tiles = self.scores(image)
        rows, cols = np.nonzero(scores > threshold)
        x, y = self.network.output_to_input(cols, rows)
        boxes = window_boxes(x, y, self.options.window, tiles, self.options.down)  # [N, 4] inclusive
        values = scores[rows, cols].astype(np.float64)
        kept = suppress(boxes, values, self.options.nms_iou, self.options.nms_covered)
        return [MmodDetection(_to_image(boxes[i], int(upsample)), float(values[i])) for i in kept]

    __call__ = detect


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InputError(
            f"the CNN face detector takes an [H, W, 3] or [H, W] uint8 image; got {array.dtype} {array.shape}."
        )
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array


def _to_image(box: np.ndarray, upsample: int) -> np.ndarray:
    """An inclusive rectangle of the (upsampled) image as an x1, y1, x2, y2 box of the input image."""
    box = box.astype(np.float64)
    if upsample:
        for _ in range(upsample):
            box = box / 2 - UP_SHIFT
        box = round_half_away(box)
    return (box + np.array([0, 0, 1, 1])).astype(np.float32)


# ------------------------------------------------------------------------------ reading the file


class MmodFile(NamedTuple):
    """A parsed `mmod_human_face_detector.dat`: detection settings and layers (input side first)."""

    options: MmodOptions
    layers: list[DlibLayer]


def parse_mmod_file(data: bytes, name: str = "the file") -> MmodFile:
    """Parse a dlib network whose loss is `loss_mmod` and input `input_rgb_image_pyramid<pyramid_down<6>>`.

    The loss stores mmod_options; the released file has version 1: one detector window (width,
    height), the two loss weights, the truth-match IoU, then the NMS test and the ignore test as
    (IoU, covered) pairs. Later versions (labelled windows, box regression) are refused.
    """
    r = DlibReader(data, name)
    r.version([1], "add_loss_layer")
    if (loss := r.string()) != "loss_mmod_":
        raise r.fail(f"loss {loss!r}; expected dlib's MMOD loss ('loss_mmod_')")
    r.version([1], "mmod_options")
    window = (r.integer(), r.integer())  # width, height
    r.floating(), r.floating(), r.floating()  # loss per false alarm, per missed target; truth-match IoU
    nms_iou, nms_covered = r.floating(), r.floating()
    r.floating(), r.floating()  # the ignore test
    (mean, padding), layers = read_layer_stack(r, _read_pyramid_input)
    options = MmodOptions(window, nms_iou, nms_covered, tuple(float(m) for m in mean), 6, *padding)
    return MmodFile(options, layers)


def _read_pyramid_input(r: DlibReader) -> tuple[np.ndarray, tuple[int, int]]:
    """input_rgb_image_pyramid: R, G, B means, then (version 2) padding and outer padding."""
    version = r.string()
    if version not in ("input_rgb_image_pyramid", "input_rgb_image_pyramid2"):
        raise r.fail(f"the input layer is {version!r}, not input_rgb_image_pyramid")
    mean = np.array([r.floating() for _ in range(3)], np.float32)
    padding = (r.integer(), r.integer()) if version.endswith("2") else (10, 11)  # dlib's defaults
    return mean, padding


def expected_layers(config: MmodConfig) -> list[tuple[str, dict]]:
    """(kind, options) of the layers, input side first, that a file of this architecture holds."""
    layers = []
    for _, _, _, stride, padding in config.conv_shapes():
        layers += [("con", {"stride": (stride, stride), "padding": (padding, padding)}), ("affine", {}), ("relu", {})]
    return layers[:-2]  # the head has no affine or relu


def mmod_state_dict(layers: list[DlibLayer], config: MmodConfig) -> dict[str, Tensor]:
    """The `MmodNetwork` state dict held by a parsed file's layers.

    :raises CheckpointError: the layers are not those of `config`'s architecture.
    """
    found, expected = [(layer.kind, layer.options) for layer in layers], expected_layers(config)
    if found != expected:
        raise CheckpointError(
            f"the dlib network ({len(found)} layers) is not the MMOD face detector of {config} "
            f"({len(expected)} layers): its layers are {[kind for kind, _ in found]}."
        )
    steps = [f"downsampler.{i}" for i in range(len(config.downsampler))]
    steps += [f"body.{i}" for i in range(len(config.body))]
    state = {}
    for i, prefix in enumerate(steps):
        conv, affine = layers[3 * i], layers[3 * i + 1]
        state |= {f"{prefix}.conv.weight": conv.params["weight"], f"{prefix}.conv.bias": conv.params["bias"]}
        state |= {f"{prefix}.affine.weight": affine.params["gamma"], f"{prefix}.affine.bias": affine.params["beta"]}
    state |= {"head.weight": layers[-1].params["weight"], "head.bias": layers[-1].params["bias"]}
    return {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in state.items()}


def load_mmod_detector(path: PathLike, config: MmodConfig = MmodConfig(), threads: Optional[int] = 1) -> MmodDetector:
    """The torch port with the weights and settings of a dlib MMOD detector file (eval mode, float32).

    The network is cached per process (by path, size and modification time); treat it as read-only.

    :param threads: torch threads per call; 1 measured fastest for one photo on a shared 2-core CPU.
    :raises ModelFilesMissingError: no file at `path`.
    :raises CheckpointError: the file is corrupt or holds another network.
    """
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    network, options = _load_cached(str(path.resolve()), stat and (stat.st_size, stat.st_mtime_ns), config)
    return MmodDetector(network, options, threads)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, _stamp, config: MmodConfig) -> tuple[MmodNetwork, MmodOptions]:
    parsed = parse_mmod_file(read_dlib_bytes(path), path)
    network = MmodNetwork(config)
    try:
        network.load_state_dict(mmod_state_dict(parsed.layers, config))
    except RuntimeError as error:  # shapes differ from the config's
        raise CheckpointError(f"{path} does not fit {config}: {error}") from error
    return network.eval().requires_grad_(False), parsed.options
