"""The torch port of dlib's CNN (MMOD) face detector: dlib's own detections on the images the dlib
backend hands it, the pyramid / window / suppression rules it follows, and clear errors for
files and images it cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantid_lab.data import photo
from instantid_lab.errors import CheckpointError, InputError, LabError, ModelFilesMissingError
from instantid_lab.face_analysis import DlibConfig, DlibFaceAnalyzer, get_face_analyzer
from instantid_lab.face_analysis.dlib_backend import DLIB_MODEL_FILES, dlib_models_dir, downscale, rect_to_box
from instantid_lab.face_analysis.dlib_mmod import (
    MmodConfig,
    MmodDetector,
    MmodNetwork,
    Tile,
    load_mmod_detector,
    mmod_state_dict,
    overlaps,
    parse_mmod_file,
    round_half_away,
    suppress,
    tiled_pyramid_layout,
    window_boxes,
)
from instantid_lab.images import to_array

DETECTOR_FILE = dlib_models_dir() / DLIB_MODEL_FILES["cnn_detector"]


@pytest.fixture(scope="module")
def port() -> MmodDetector:
    return load_mmod_detector(DETECTOR_FILE)


@pytest.fixture(scope="module")
def reference() -> DlibFaceAnalyzer:
    """The backend with dlib's own CNN detector (the reference the port must equal)."""
    return DlibFaceAnalyzer(DlibConfig(detector="dlib"))


@pytest.fixture(scope="module")
def backend_inputs(reference):
    """{case: (image, upsample, dlib's detections)}: what the backend hands the CNN detector,
    recorded on its own runs, plus a group photo and an upsampled small photo."""
    calls = []

    def record(rgb, upsample=0):
        calls.append((rgb.copy(), upsample, reference.models.cnn(rgb, upsample)))
        return [(rect_to_box(d.rect), float(d.confidence)) for d in calls[-1][2]]

    reference._cnn = record  # this analyzer only: the module's fixture
    cases = {}
    for file in ("obama_4.jpg", "collins_1.jpg"):  # whole-image fallback; a weak HOG proposal's crop
        reference._locate(reference._prepare(to_array(photo(file).path)))
        cases[file] = calls[-1]
    voss = reference._prepare(to_array(photo("voss_1.jpg").path))
    reference._confirm(voss, reference._locate(voss)[0].bbox)  # the crop that would confirm a face
    cases["voss_1.jpg crop"] = calls[-1]
    cases["voss_1.jpg crop, grey"] = _run(reference, calls[-1][0][:, :, 1].copy(), 0)
    group = downscale(to_array(photo("group_1.jpg").path), 800)[0][:320, 120:700]  # 7 windows: 1 weak, 1 off the top
    cases["group_1.jpg top"] = _run(reference, group, 0)
    cases["voss_2.jpg up 1"] = _run(reference, to_array(photo("voss_2.jpg").path), 1)
    return cases


def _run(reference, rgb, upsample):
    return rgb, upsample, reference.models.cnn(rgb, upsample)


# ------------------------------------------------------------------------------ same output as dlib


def test_detections_equal_dlibs_on_the_backends_images(port, backend_inputs):
    counts = {}
    for case, (rgb, upsample, theirs) in backend_inputs.items():
        ours = port.detect(rgb, upsample)
        counts[case] = len(ours)
        assert len(ours) == len(theirs), case
        for mine, d in zip(ours, theirs):  # both best first
            assert mine.box.dtype == np.float32
            assert np.abs(mine.box - rect_to_box(d.rect)).max() <= 1.0, case  # measured: 0 px on all
            assert abs(mine.confidence - d.confidence) < 1e-3, case  # measured: <= 3e-5
    assert counts == {
        "obama_4.jpg": 1,
        "collins_1.jpg": 0,  # the weak proposal is a mission patch: nothing to confirm
        "voss_1.jpg crop": 1,
        "voss_1.jpg crop, grey": 1,
        "group_1.jpg top": 7,
        "voss_2.jpg up 1": 1,
    }


def test_the_backend_runs_the_port_by_default_and_gets_dlibs_fallback_faces(backend_inputs):
    analyzer = get_face_analyzer("dlib")
    assert analyzer.config.detector == "torch" and isinstance(analyzer.cnn, MmodDetector)
    rgb, _, theirs = backend_inputs["obama_4.jpg"]
    ours = analyzer._cnn(rgb)
    assert len(ours) == len(theirs) == 1
    assert np.abs(ours[0][0] - rect_to_box(theirs[0].rect)).max() <= 1.0
    assert abs(ours[0][1] - theirs[0].confidence) < 1e-3
    with pytest.raises(InputError, match="detector"):
        DlibConfig(detector="onnx")


# ------------------------------------------------------------------------------ dlib's rules


@pytest.mark.parametrize("rows, cols", [(333, 384), (250, 172), (30, 400)])
def test_tiled_pyramid_packs_levels_of_five_sixths_without_overlap(rows, cols):
    tiles, (height, width) = tiled_pyramid_layout(rows, cols)
    assert tiles[0] == Tile(11, 11, cols, rows) and width == cols + 22
    for a, b in zip(tiles, tiles[1:]):
        assert (b.width, b.height) == (int(a.width * 5 / 6), int(a.height * 5 / 6))
    assert tiles[-1].height >= 5
    first = [t for t in tiles if t.left == 11]
    right = [t for t in tiles if t.left != 11]
    assert all(t.left + t.width == 11 + cols for t in right)  # stacked against the right edge
    assert all(b.top == a.top + a.height + 10 for a, b in zip(first, first[1:]))  # top down, 10 px apart
    assert all(b.top + b.height + 10 == a.top for a, b in zip(right, right[1:]))  # bottom up
    for i, a in enumerate(tiles):
        assert a.top + a.height <= height - 11
        for b in tiles[i + 1 :]:  # no two tiles overlap
            assert b.left >= a.left + a.width or a.left >= b.left + b.width or (
                b.top >= a.top + a.height or a.top >= b.top + b.height
            )


def test_output_positions_map_to_receptive_field_centres():
    x, y = MmodNetwork(MmodConfig.tiny()).output_to_input(np.array([0, 1, 5]), np.array([0, 2, 1]))
    assert x.tolist() == [14, 22, 54] and y.tolist() == [14, 30, 22]  # 3 unpadded 5x5 stride-2 convs: 8p + 14


def test_windows_map_from_their_tile_up_by_six_fifths_per_level():
    tiles = [Tile(11, 11, 100, 90), Tile(11, 111, 83, 75)]
    boxes = window_boxes(np.array([50.0, 60.0]), np.array([40.0, 150.0]), (20, 10), tiles)
    assert boxes[0].tolist() == [30, 25, 49, 34]  # level 0: centre - tile origin ± (size - 1) / 2
    level1 = np.array([60 - 9.5 - 11, 150 - 4.5 - 111, 60 + 9.5 - 11, 150 + 4.5 - 111]) * 1.2 + 0.3
    assert boxes[1].tolist() == round_half_away(level1).tolist()


def test_rounding_is_half_away_from_zero():
    assert round_half_away(np.array([-4.5, -4.4, 4.5, 2.5, 0.49])).tolist() == [-5, -4, 5, 3, 0]


def test_overlap_is_iou_or_coverage_of_inclusive_rectangles():
    a, b = np.array([0, 0, 9, 9]), np.array([5, 0, 14, 9])  # 50 px shared of 100 + 100: IoU 1/3
    assert overlaps(a, b, 0.33, 1.0) and not overlaps(a, b, 0.34, 1.0)
    inside = np.array([2, 2, 5, 5])
    assert overlaps(a, inside, 0.9, 0.99) and not overlaps(a, inside, 0.9, 1.0)
    assert not overlaps(a, np.array([10, 0, 19, 9]), 0.0, 0.0)  # touching is not overlapping


def test_suppression_keeps_the_best_of_overlapping_windows():
    boxes = np.array([[0, 0, 79, 79], [10, 0, 89, 79], [35, 0, 114, 79], [130, 0, 209, 79]])
    scores = np.array([0.9, 1.2, 0.5, 0.1])
    assert suppress(boxes, scores, 0.338, 1.0) == [1, 3]  # 0, 2 overlap the best by IoU > 0.338 (0.78, 0.52)


# ------------------------------------------------------------------------------ the network and the file


def test_reads_the_released_file_and_its_settings():
    parsed = parse_mmod_file(DETECTOR_FILE.read_bytes())
    o = parsed.options
    assert o.window == (80, 80) and abs(o.nms_iou - 0.338) < 1e-3 and o.nms_covered == 1.0
    assert np.allclose(o.mean, (122.782, 117.001, 104.298), atol=1e-3) and (o.padding, o.outer_padding) == (10, 11)
    state = mmod_state_dict(parsed.layers, MmodConfig.v1())
    assert set(state) == set(MmodNetwork().state_dict())  # module names line up with the file's layers
    assert state["downsampler.0.conv.weight"].shape == (16, 3, 5, 5) and state["head.weight"].shape == (1, 45, 9, 9)


def test_tiny_network_runs_on_one_thread_and_restores_torchs_setting():
    torch.manual_seed(0)
    tiny = MmodDetector(MmodNetwork(MmodConfig.tiny()), threads=1)
    image = np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    scores, tiles = tiny.scores(image)
    assert torch.get_num_threads() == threads
    _, (rows, cols) = tiled_pyramid_layout(60, 70)
    down = lambda s: (s - 5) // 2 + 1  # an unpadded 5x5 stride-2 conv; the padded ones keep the size
    assert scores.shape == (down(down(down(rows))), down(down(down(cols))))
    assert len(tiles) > 1 and tiles[0] == Tile(11, 11, 70, 60)
    with pytest.raises(InputError, match="uint8"):
        tiny.detect(image.astype(np.float32))
    with pytest.raises(InputError, match=r"\[H, W, 3\]"):
        tiny.detect(np.zeros((20, 20, 4), np.uint8))


@pytest.mark.parametrize("keep", [0, 5, 300, 500_000])
def test_a_truncated_file_is_a_checkpoint_error(tmp_path, keep):
    broken = tmp_path / "mmod.dat"
    broken.write_bytes(DETECTOR_FILE.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_mmod_detector(broken)


def test_other_networks_are_checkpoint_errors():
    with pytest.raises(CheckpointError, match="loss"):  # the face-recognition ResNet: another loss
        load_mmod_detector(dlib_models_dir() / DLIB_MODEL_FILES["recognizer"])
    with pytest.raises(CheckpointError, match="not the MMOD face detector"):
        load_mmod_detector(DETECTOR_FILE, MmodConfig.tiny())


def test_a_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(ModelFilesMissingError, match="pip install") as error:
        load_mmod_detector(tmp_path / "nowhere.dat")
    assert isinstance(error.value, LabError)
