"""`images.load_image`: every input becomes an upright 8-bit RGB image, bad input a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from instantid_lab.data import photo
from instantid_lab.errors import ImageReadError, InputError, LabError
from instantid_lab.images import load_image, to_array


@pytest.fixture
def gradient() -> Image.Image:
    """A small RGB image whose pixels all differ: red grows to the right, green downwards."""
    x, y = np.meshgrid(np.arange(48), np.arange(32))  # [32, 48] each
    array = np.stack([x * 5, y * 7, np.full_like(x, 90)], axis=-1).astype(np.uint8)  # [32, 48, 3]
    return Image.fromarray(array)


def test_rgb_file_loads_unchanged():
    path = photo("helms_3.jpg").path
    image = load_image(path)
    assert image.mode == "RGB" and image.size == Image.open(path).size
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))
    assert load_image(str(path)).size == image.size


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I", "F"])
def test_every_common_mode_becomes_rgb(gradient, mode):
    image = load_image(gradient.convert(mode))
    assert image.mode == "RGB" and image.size == gradient.size


def test_grayscale_keeps_its_values(gradient):
    gray = gradient.convert("L")
    assert np.array_equal(to_array(gray), np.repeat(np.asarray(gray)[:, :, None], 3, axis=2))


def test_sixteen_bit_is_scaled_to_eight_bits(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0 .. 65535
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    array = to_array(path)
    assert array.dtype == np.uint8 and array.shape == (16, 16, 3)
    assert np.array_equal(array[:, :, 0], np.arange(256).reshape(16, 16))


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent except the first row
    rgba[0, :, 3] = 255
    array = to_array(Image.fromarray(rgba))
    assert (array[0] == (200, 0, 0)).all() and (array[1:] == 255).all()


def test_cmyk_file_loads_as_rgb(gradient, tmp_path):
    path = tmp_path / "print.jpg"
    gradient.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    assert np.abs(to_array(path).astype(int) - np.asarray(gradient).astype(int)).mean() < 8


@pytest.mark.parametrize(
    "orientation, stored",
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_orientation_is_applied(gradient, tmp_path, orientation, stored):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    gradient.transpose(stored).save(path, exif=exif)
    assert np.array_equal(to_array(path), np.asarray(gradient))


@pytest.mark.parametrize(
    "array",
    [
        np.full((5, 6, 3), 255, np.uint8),
        np.full((5, 6), 65535, np.uint16),
        np.ones((5, 6, 1), np.float32),
        np.ones((5, 6, 3), np.float64),
        np.ones((5, 6), bool),
    ],
    ids=["uint8", "uint16", "float-hw1", "float", "bool"],
)
def test_arrays_of_every_dtype_become_white_rgb(array):
    result = to_array(array)
    assert result.shape == (5, 6, 3) and result.dtype == np.uint8 and (result == 255).all()


def test_rgba_array_is_composited():
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black
    assert (to_array(rgba) == 255).all()


@pytest.mark.parametrize("shape", [(5,), (5, 6, 2), (3, 5, 6), (1, 5, 6, 3)])
def test_wrong_array_shape_is_an_input_error(shape):
    with pytest.raises(InputError, match=r"\[H, W"):
        load_image(np.zeros(shape, np.uint8))


def test_nan_array_and_unsupported_types_are_input_errors():
    with pytest.raises(InputError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((4, 4, 3), np.complex64))
    with pytest.raises(InputError, match="path"):
        load_image(b"bytes")
    with pytest.raises(TypeError):  # InputError is also a TypeError
        load_image(42)


def test_missing_file_and_folder_are_read_errors(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageReadError, match="folder"):
        load_image(tmp_path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("hello")
    with pytest.raises(ImageReadError, match="not an image"):
        load_image(path)


def test_truncated_jpeg_is_a_read_error(tmp_path):
    data = photo("helms_3.jpg").path.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt") as caught:
        load_image(path)
    assert isinstance(caught.value, LabError)


def test_too_many_pixels_is_refused_before_decoding(gradient, tmp_path):
    path = tmp_path / "big.png"
    gradient.save(path)
    with pytest.raises(ImageReadError, match="downscale"):
        load_image(path, max_pixels=100)
    with pytest.raises(ImageReadError, match="downscale"):
        load_image(gradient, max_pixels=100)
    assert load_image(path, max_pixels=48 * 32).size == (48, 32)
