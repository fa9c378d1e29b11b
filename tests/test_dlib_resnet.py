"""The torch port of dlib's face-recognition ResNet: it reads the released `.dat` file, gives
dlib's own descriptors on the bundled photos, and refuses files it cannot read with a clear error."""

from __future__ import annotations

import dlib
import numpy as np
import pytest
import torch

from instantid_lab.data import photo
from instantid_lab.errors import CheckpointError, InputError, LabError, ModelFilesMissingError
from instantid_lab.face_analysis import DlibConfig, DlibFaceAnalyzer, get_face_analyzer
from instantid_lab.face_analysis.dlib_backend import DLIB_MODEL_FILES, dlib_models_dir
from instantid_lab.face_analysis.dlib_format import DlibReader
from instantid_lab.face_analysis.dlib_resnet import (
    DlibResNet,
    DlibResNetConfig,
    add_prev,
    expected_layers,
    face_descriptors,
    load_dlib_resnet,
    read_dlib_network,
)
from instantid_lab.images import to_array

RECOGNIZER = dlib_models_dir() / DLIB_MODEL_FILES["recognizer"]
# A small single face, a larger one, and a group of 3: 5 faces in all.
PHOTOS = ["helms_3.jpg", "voss_2.jpg", "group_2.jpg"]


@pytest.fixture(scope="module")
def model() -> DlibResNet:
    return load_dlib_resnet(RECOGNIZER)


@pytest.fixture(scope="module")
def reference():
    """The analyzer that runs dlib's own descriptor (the reference the port must equal)."""
    return DlibFaceAnalyzer(DlibConfig(descriptor="dlib"))


@pytest.fixture(scope="module")
def aligned(reference):
    """(image, 68-point landmarks) of every face in PHOTOS, as the dlib backend finds them."""
    faces = []
    for file in PHOTOS:
        rgb = reference._prepare(to_array(photo(file).path))  # [H, W, 3]
        faces += [(rgb, reference._landmarks(rgb, d)) for d in reference._locate(rgb)]
    return faces


# ------------------------------------------------------------------------------ same output as dlib


def test_torch_descriptors_equal_dlibs_on_bundled_faces(model, reference, aligned):
    assert len(aligned) == 5
    chips = [dlib.get_face_chip(rgb, shape, size=150, padding=0.25) for rgb, shape in aligned]  # [150, 150, 3] each
    ours = face_descriptors(model, chips)  # one batch of 5: [5, 128]
    theirs = np.array([reference.models.recognizer.compute_face_descriptor(rgb, shape) for rgb, shape in aligned])
    assert ours.shape == (5, 128) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5  # measured: 3e-7
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)  # raw fc output, as dlib returns it


def test_the_backend_uses_the_port_by_default_and_agrees_with_dlibs_path(reference):
    analyzer = get_face_analyzer("dlib")
    assert analyzer.config.descriptor == "torch" and isinstance(analyzer.resnet, DlibResNet)
    ours, theirs = analyzer.get_face(photo("helms_3.jpg").path), reference.get_face(photo("helms_3.jpg").path)
    assert np.array_equal(ours.bbox, theirs.bbox) and np.array_equal(ours.kps, theirs.kps)
    assert ours.embedding.dtype == np.float32 and np.abs(ours.embedding - theirs.embedding).max() < 1e-5


def test_jittered_descriptor_is_a_mean_over_jittered_chips_of_the_same_face():
    plain = get_face_analyzer("dlib").embed(photo("helms_3.jpg").path)
    jittered = get_face_analyzer("dlib", num_jitters=3).embed(photo("helms_3.jpg").path)
    assert jittered.shape == (128,) and jittered.dtype == np.float32
    assert 0 < np.linalg.norm(jittered - plain) < 0.3  # moved, but far below the 0.6 same-person threshold


def test_descriptor_option_is_checked():
    with pytest.raises(InputError, match="descriptor"):
        DlibConfig(descriptor="onnx")
    with pytest.raises(InputError, match="torch_threads"):
        DlibConfig(torch_threads=-1)


# ------------------------------------------------------------------------------ the network


def test_add_prev_zero_pads_the_smaller_tensor_at_the_end():
    a = torch.ones(1, 2, 3, 3)  # the stride-2 path: more channels, fewer positions
    b = torch.full((1, 1, 4, 4), 2.0)  # the pooled shortcut
    out = add_prev(a, b)
    assert out.shape == (1, 2, 4, 4)
    assert torch.all(out[0, 0, :3, :3] == 3) and torch.all(out[0, 1, :3, :3] == 1)
    assert torch.all(out[0, 0, 3, :] == 2) and torch.all(out[0, 0, :, 3] == 2)  # only b reaches row/column 3
    assert torch.all(out[0, 1, 3, :] == 0)  # neither reaches channel 1 there
    assert torch.equal(add_prev(a, a), 2 * a)


def test_tiny_network_describes_each_chip_independently_of_its_batch():
    config = DlibResNetConfig.tiny()
    torch.manual_seed(0)
    tiny = DlibResNet(config).eval()
    chips = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    batch = face_descriptors(tiny, chips)
    assert batch.shape == (3, config.embedding_dim)
    assert np.allclose(face_descriptors(tiny, chips[1]), batch[1], atol=1e-6)
    assert not np.allclose(batch[0], batch[1])
    threads = torch.get_num_threads()
    assert np.allclose(face_descriptors(tiny, chips, threads=1), batch, atol=1e-6)
    assert torch.get_num_threads() == threads  # the thread setting is restored
    with pytest.raises(InputError, match="40x40"):
        face_descriptors(tiny, chips[:, :30])


# ------------------------------------------------------------------------------ dlib's file format


def test_reads_the_released_network():
    network = read_dlib_network(RECOGNIZER)
    assert network.loss == "loss_metric_2" and network.input_size == (150, 150)
    assert np.allclose(network.input_mean, [122.782, 117.001, 104.298], atol=1e-3)  # R, G, B
    assert [(layer.kind, layer.options) for layer in network.layers] == expected_layers(DlibResNetConfig.v1())
    convs = [layer for layer in network.layers if layer.kind == "con"]
    assert len(convs) == 29 and convs[0].params["weight"].shape == (32, 3, 7, 7)
    assert convs[0].options == {"stride": (2, 2), "padding": (0, 0)}  # dlib: no padding when strided
    assert convs[1].options == {"stride": (1, 1), "padding": (1, 1)}
    assert network.layers[-1].params["weight"].shape == (256, 128)  # fc_no_bias: [in, out]


@pytest.mark.parametrize(
    "data, value",
    [
        (b"\x00", 0),
        (b"\x01\x05", 5),
        (b"\x81\x05", -5),
        (b"\x02\x34\x12", 0x1234),
    ],
)
def test_integers_are_a_control_byte_then_little_endian_bytes(data, value):
    assert DlibReader(data).integer() == value


def test_floats_are_mantissa_times_two_to_the_exponent():
    margin = DlibReader(b"\x03\x0a\xd7\xa3\x81\x1c")  # 0xa3d70a * 2**-28: loss_metric's margin
    assert np.float32(margin.floating()) == np.float32(0.04)
    assert DlibReader(b"\x81\x03\x01\x02").floating() == -12.0  # -3 * 2**2
    assert DlibReader(b"\x00\x02\x00\x7d").floating() == float("inf")  # exponent 32000
    assert np.isnan(DlibReader(b"\x00\x02\x02\x7d").floating())  # exponent 32002


def test_tensors_are_a_version_four_dimensions_and_the_values():
    shape = b"\x01\x01\x01\x02\x01\x01\x01\x01"  # num_samples 1, k 2, nr 1, nc 1
    packed = DlibReader(b"\x01\x02" + shape + np.array([0.5, -3.0], "<f4").tobytes())  # version 2: float32
    assert np.array_equal(packed.tensor(), np.array([0.5, -3.0], np.float32).reshape(1, 2, 1, 1))
    portable = DlibReader(b"\x01\x01" + shape + b"\x01\x01\x81\x01" + b"\x81\x03\x00")  # version 1: floats
    assert np.array_equal(portable.tensor(), np.array([0.5, -3.0], np.float32).reshape(1, 2, 1, 1))


@pytest.mark.parametrize("keep", [0, 5, 400, 1_000_000])
def test_a_truncated_file_is_a_checkpoint_error(tmp_path, keep):
    broken = tmp_path / "recognizer.dat"
    broken.write_bytes(RECOGNIZER.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*face-recognition-models"):
        load_dlib_resnet(broken)


def test_other_files_are_checkpoint_errors(tmp_path):
    text = tmp_path / "notes.dat"
    text.write_text("not a network")
    with pytest.raises(CheckpointError):
        read_dlib_network(text)
    with pytest.raises(CheckpointError, match="loss"):  # dlib's CNN face detector: another loss
        read_dlib_network(dlib_models_dir() / DLIB_MODEL_FILES["cnn_detector"])
    with pytest.raises(CheckpointError, match="not the face-recognition ResNet"):
        load_dlib_resnet(RECOGNIZER, DlibResNetConfig.tiny())


def test_a_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelFilesMissingError, match="pip install") as error:
        load_dlib_resnet(tmp_path / "nowhere.dat")
    assert isinstance(error.value, LabError)
