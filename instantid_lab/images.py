"""Reading images the same way everywhere: path, PIL or numpy in, upright 8-bit RGB out.

`load_image` applies the EXIF orientation, converts every common PIL mode (L, LA, P, RGBA,
I;16, I, F, CMYK, ...) to RGB, and refuses decompression bombs before decoding them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageReadError, InputError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

#: Largest image (in pixels) the kit will decode: 8192 x 8192. Larger files are refused.
MAX_PIXELS = 8192 * 8192


def load_image(image: ImageLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return `image` as an upright RGB `PIL.Image.Image` (mode "RGB", 8 bits per channel).

    :param image: a file path, a PIL image, or a numpy array of shape [H, W], [H, W, 1],
        [H, W, 3] (RGB) or [H, W, 4] (RGBA); uint8, uint16 or float in [0, 1].
    :param max_pixels: refuse images with more pixels than this (decompression-bomb guard).
    :raises ImageReadError: the file is missing, unreadable, not an image, or too large.
    :raises InputError: `image` is of an unsupported type or array shape.
    """
    if isinstance(image, (str, os.PathLike)):
        pil = _open_path(Path(image), max_pixels)
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        pil = _from_array(image)
    else:
        raise InputError(
            f"expected an image path, a PIL.Image or a numpy array, got {type(image).__name__}"
        )
    _check_size(pil.size, max_pixels, str(getattr(pil, "filename", "") or "image"))
    return to_rgb(ImageOps.exif_transpose(pil))


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageReadError(f"no such file: {path}. Check the path (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            pil = Image.open(path)
            _check_size(pil.size, max_pixels, str(path))
            pil.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(_describe_open_failure(path, e)) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{path} could not be decoded ({e}); the file may be truncated or corrupt.") from e
    return pil


def _describe_open_failure(path: Path, error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return f"{path} is not an image file PIL can read (JPEG, PNG, WebP, TIFF, BMP, ...)."
    return f"{path} is too large to decode safely ({error}). Downscale it first."


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageReadError(
            f"{name} has {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}; downscale it first or pass a larger max_pixels."
        )
    if width == 0 or height == 0:
        raise ImageReadError(f"{name} is empty ({width}x{height}).")


def to_rgb(pil: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if pil.mode == "RGB":
        return pil
    if pil.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(pil)
    if pil.mode == "P" and "transparency" in pil.info:
        pil = pil.convert("RGBA")
    if pil.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil.convert("RGB")


def _high_bit_depth_to_rgb(pil: Image.Image) -> Image.Image:
    array = np.asarray(pil, dtype=np.float64)
    if pil.mode == "F":
        top = 1.0 if array.max(initial=0.0) <= 1.0 else array.max()
    else:
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
    gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InputError(
            f"an image array must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got {array.shape}. "
            "Channels go last (HWC), as numpy and PIL use them."
        )
    return Image.fromarray(_to_uint8(array))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError("the image array contains NaN or infinite values.")
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    raise InputError(f"unsupported image array dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")


def to_array(image: ImageLike) -> np.ndarray:
    """`load_image(image)` as a uint8 numpy array of shape [H, W, 3] (RGB)."""
    return np.asarray(load_image(image))


def image_sheet(images, columns: int = 8, scale: int = 1) -> Image.Image:
    """Images as one picture, `columns` per row (diffusers' `make_image_grid`), blank cells filling the
    last row, enlarged `scale` times with nearest-neighbour sampling (so small images stay sharp).

    :param images: PIL images or HWC arrays, all of one size; or a tensor [B, 3, H, W] in [-1, 1].
    """
    from diffusers.utils import make_image_grid

    pils = _as_pil_list(images)
    if not pils:
        raise InputError("image_sheet needs at least one image")
    columns = min(columns, len(pils))
    rows = -(-len(pils) // columns)  # ceiling division
    pils += [Image.new("RGB", pils[0].size)] * (rows * columns - len(pils))
    return enlarge(make_image_grid(pils, rows, columns), scale)


def enlarge(image: ImageLike, factor: int = 8) -> Image.Image:
    """`image` enlarged `factor` times with nearest-neighbour sampling, so every pixel stays a square.

    :param image: a path, PIL image, or HWC array (uint8, or float in [0, 1] as `output_type="np"` gives).
    """
    pil = load_image(image)
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST)


def _as_pil_list(images) -> list[Image.Image]:
    if hasattr(images, "permute"):  # a torch tensor [B, 3, H, W] in [-1, 1]
        array = ((images.detach().float().cpu().permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte().numpy()
        return [Image.fromarray(a) for a in array]
    return [load_image(x) for x in images]
