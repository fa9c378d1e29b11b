"""Face analysis: the dlib backend on the bundled photos (real, offline), the insightface
backend on tiny random ONNX models in antelopev2's formats, and the backend choice."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
from PIL import Image

from instantid_lab.data import face_photos, photo
from instantid_lab.errors import ImageReadError, InputError, LabError, ModelFilesMissingError, NoFaceError
from instantid_lab.face_analysis import (
    ENV_VAR,
    DlibConfig,
    Face,
    InsightFaceConfig,
    find_antelopev2,
    get_face_analyzer,
    kps_from_68,
)
from onnx_models import block_photo, write_antelopev2

SINGLE = [p for p in face_photos() if p.faces == 1]
GROUPS = [p for p in face_photos() if p.faces > 1]

# Centre (x, y) and width of the face box in each single-person photo, checked by eye on a
# drawing of the detections (the person's face, not a patch, badge or background).
EXPECTED_BOXES = {
    "obama_1.jpg": (436, 245, 216),
    "obama_2.jpg": (266, 380, 259),
    "obama_3.jpg": (543, 304, 180),
    "obama_4.jpg": (472, 281, 228),
    "biden_1.jpg": (548, 424, 373),
    "biden_2.jpg": (484, 317, 216),
    "helms_1.jpg": (485, 270, 150),
    "helms_2.jpg": (128, 100, 125),
    "helms_3.jpg": (78, 136, 87),
    "voss_1.jpg": (170, 170, 150),
    "voss_2.jpg": (52, 86, 139),
    "coleman_1.jpg": (436, 317, 216),
    "coleman_2.jpg": (484, 460, 216),
    "wilcutt_1.jpg": (312, 460, 447),
    "collins_1.jpg": (223, 127, 88),
    "hopper_1.jpg": (269, 245, 216),
}


@pytest.fixture(scope="module")
def dlib_analyzer():
    return get_face_analyzer("dlib")


@pytest.fixture(scope="module")
def bundled(dlib_analyzer):
    """All faces of every bundled photo, found once per test session: {file: [Face, ...]}."""
    return {p.file: dlib_analyzer.detect(p.path) for p in face_photos()}


def _centre(face: Face) -> np.ndarray:
    return (face.bbox[:2] + face.bbox[2:]) / 2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


# ------------------------------------------------------------------------------ dlib: bundled photos


@pytest.mark.parametrize("file", [p.file for p in SINGLE])
def test_each_single_person_photo_has_exactly_one_face_the_right_one(bundled, file):
    faces = bundled[file]
    assert len(faces) == 1
    x, y, width = EXPECTED_BOXES[file]
    assert np.linalg.norm(_centre(faces[0]) - (x, y)) < 0.25 * width
    assert 0.67 < (faces[0].bbox[2] - faces[0].bbox[0]) / width < 1.5


@pytest.mark.parametrize("file", [p.file for p in GROUPS])
def test_group_photos_have_every_face_largest_first(bundled, file):
    faces = bundled[file]
    assert len(faces) == photo(file).faces  # 7 in group_1, 3 in group_2
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    centres = np.array([_centre(f) for f in faces])
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(centres, 2)) > 40  # no duplicates


def test_faces_follow_the_contract(bundled):
    face = bundled["helms_1.jpg"][0]
    assert face.backend == "dlib" and isinstance(face.det_score, float)
    assert face.bbox.shape == (4,) and face.kps.shape == (5, 2) and face.embedding.shape == (128,)
    assert face.bbox.dtype == face.kps.dtype == face.embedding.dtype == np.float32
    assert np.isclose(np.linalg.norm(face.normed_embedding), 1.0)
    assert np.isclose(face.area, (face.bbox[2] - face.bbox[0]) * (face.bbox[3] - face.bbox[1]))


def test_keypoints_are_ordered_like_an_upright_face(bundled):
    for file, faces in bundled.items():
        for face in faces:
            (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.kps
            assert lx < rx and mlx < mrx, file
            assert max(ly, ry) < ny < min(mly, mry), file  # eyes above nose above mouth
            x1, y1, x2, y2 = face.bbox
            pad = 0.15 * (x2 - x1)
            assert (x1 - pad < face.kps[:, 0]).all() and (face.kps[:, 0] < x2 + pad).all(), file
            assert (y1 - pad < face.kps[:, 1]).all() and (face.kps[:, 1] < y2 + pad).all(), file


def test_same_person_pairs_are_closer_than_different_person_pairs(bundled):
    embedding = {p.file: bundled[p.file][0].embedding for p in SINGLE}
    same, different = [], []
    for a, b in itertools.combinations(SINGLE, 2):
        distance = float(np.linalg.norm(embedding[a.file] - embedding[b.file]))  # dlib: Euclidean
        (same if a.identity == b.identity else different).append(distance)
    fraction = float((np.array(same)[:, None] < np.array(different)[None, :]).mean())
    print(f"same-person pair closer than different-person pair: {fraction:.3f} of {len(same) * len(different)}")
    assert len(same) == 12 and fraction >= 0.9


def test_wilcutt_is_the_front_row_centre_face_of_group_1(bundled):
    wilcutt = bundled["wilcutt_1.jpg"][0].embedding
    group = bundled["group_1.jpg"]
    distances = [float(np.linalg.norm(f.embedding - wilcutt)) for f in group]
    best = group[int(np.argmin(distances))]
    front_row = sorted(group, key=lambda f: -_centre(f)[1])[:3]  # the three lowest faces
    middle = sorted(front_row, key=lambda f: _centre(f)[0])[1]
    assert min(distances) < 0.6 and best is middle


def test_get_face_is_the_largest_detected_face_and_embed_its_embedding(dlib_analyzer, bundled):
    largest = bundled["group_2.jpg"][0]
    face = dlib_analyzer.get_face(photo("group_2.jpg").path)
    assert np.allclose(face.bbox, largest.bbox) and np.allclose(face.embedding, largest.embedding)
    assert np.allclose(dlib_analyzer.embed(photo("group_2.jpg").path), largest.embedding)


def test_paths_pil_images_and_arrays_give_the_same_face(dlib_analyzer, bundled):
    path = photo("helms_3.jpg").path
    expected = bundled["helms_3.jpg"][0]
    for image in (str(path), Image.open(path), np.asarray(Image.open(path))):
        face = dlib_analyzer.get_face(image)
        assert np.allclose(face.kps, expected.kps) and np.allclose(face.embedding, expected.embedding)


def test_weak_detections_need_the_cnn_to_confirm_them():
    # HOG also proposes the mission patch on collins' suit (SVM margin ~0.1); the CNN rejects it.
    path = photo("collins_1.jpg").path
    trusting = get_face_analyzer("dlib", confident_score=0.0).detect(path)
    assert len(trusting) == 2
    assert len(get_face_analyzer("dlib").detect(path)) == 1


def test_kps_from_68_picks_image_left_points_first():
    landmarks = np.zeros((68, 2), np.float32)
    landmarks[36:42] = (10, 10)  # the annotation's first eye
    landmarks[42:48] = (30, 10)
    landmarks[30] = (20, 20)
    landmarks[48], landmarks[54] = (12, 30), (28, 30)
    assert np.allclose(kps_from_68(landmarks), [[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]])
    mirrored = landmarks.copy()
    mirrored[:, 0] = 40 - mirrored[:, 0]  # first eye now on the image right: everything swaps
    assert np.allclose(kps_from_68(mirrored), [[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]])


# ------------------------------------------------------------------------------ dlib: awkward input


@pytest.fixture(scope="module")
def hopper(bundled):
    """The RGB photo used for mode conversions, and its face found from the original file."""
    return Image.open(photo("hopper_1.jpg").path).convert("RGB"), bundled["hopper_1.jpg"][0]


def _sixteen_bit(rgb: Image.Image) -> Image.Image:
    gray = np.asarray(rgb.convert("L")).astype(np.uint16) * 257  # [H, W] uint16, full range
    return Image.fromarray(gray)  # mode I;16


@pytest.mark.parametrize(
    "mode, convert, suffix",
    [
        ("L", lambda im: im.convert("L"), ".png"),
        ("RGBA", lambda im: im.convert("RGBA"), ".png"),
        ("I;16", _sixteen_bit, ".png"),
        ("CMYK", lambda im: im.convert("CMYK"), ".jpg"),
    ],
)
def test_other_image_modes_give_the_same_face(dlib_analyzer, hopper, tmp_path, mode, convert, suffix):
    rgb, expected = hopper
    path = tmp_path / f"photo{suffix}"
    converted = convert(rgb)
    converted.save(path)
    assert Image.open(path).mode == mode
    face = dlib_analyzer.get_face(path)
    assert _iou(face.bbox, expected.bbox) > 0.7
    assert np.abs(face.kps - expected.kps).max() < 0.1 * (expected.bbox[2] - expected.bbox[0])


@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_photo_gives_keypoints_in_the_upright_frame(dlib_analyzer, hopper, tmp_path, orientation, stored):
    rgb, expected = hopper
    exif = Image.Exif()
    exif[0x0112] = orientation  # viewers rotate the stored pixels back upright
    path = tmp_path / "rotated.jpg"
    rgb.transpose(stored).save(path, exif=exif, quality=95)
    face = dlib_analyzer.get_face(path)
    assert np.abs(face.kps - expected.kps).max() < 0.1 * (expected.bbox[2] - expected.bbox[0])
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.kps
    assert lx < rx and max(ly, ry) < ny < min(mly, mry)


def test_truncated_jpeg_is_an_image_read_error(dlib_analyzer, tmp_path):
    data = photo("helms_3.jpg").path.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError):
        dlib_analyzer.get_face(path)


def test_text_file_is_an_image_read_error(dlib_analyzer, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not a photo\n")
    with pytest.raises(ImageReadError, match="not an image"):
        dlib_analyzer.detect(path)


@pytest.mark.parametrize("kind", ["noise", "plain"])
def test_photo_without_a_face_raises_no_face_error_saying_what_was_tried(dlib_analyzer, kind):
    rng = np.random.default_rng(0)
    image = np.full((160, 160, 3), 128, np.uint8)
    if kind == "noise":
        image = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    assert dlib_analyzer.detect(image) == []
    with pytest.raises(NoFaceError, match="HOG.*CNN") as caught:
        dlib_analyzer.get_face(image)
    assert isinstance(caught.value, LabError)


# ------------------------------------------------------------------------------ insightface: tiny ONNX models


@pytest.fixture(scope="module")
def tiny_antelopev2(tmp_path_factory):
    return write_antelopev2(tmp_path_factory.mktemp("models") / "antelopev2")


def test_insightface_loads_tiny_antelopev2_and_picks_the_largest_face(tiny_antelopev2):
    analyzer = get_face_analyzer("insightface", model_dir=tiny_antelopev2)
    assert analyzer.backend == "insightface" and analyzer.embedding_dim == 512
    faces = analyzer.detect(block_photo())
    assert [f.area for f in faces] == [64 * 64, 32 * 32]  # the red block's face, then the green one's
    assert np.allclose(faces[0].bbox, [288, 288, 352, 352])
    face = analyzer.get_face(block_photo())
    assert np.allclose(face.bbox, faces[0].bbox) and np.allclose(face.embedding, faces[0].embedding)
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    assert not np.isclose(np.linalg.norm(face.embedding), 1.0)  # raw, not normalised
    assert np.isclose(np.linalg.norm(face.normed_embedding), 1.0)
    assert face.kps[0, 0] < face.kps[1, 0] and face.kps[1, 1] < face.kps[2, 1] < face.kps[3, 1]
    assert not np.allclose(faces[0].embedding, faces[1].embedding)


def test_insightface_retries_smaller_det_sizes_before_giving_up(tmp_path, caplog):
    folder = write_antelopev2(tmp_path / "a", "small_inputs", max_input=448)
    analyzer = get_face_analyzer("insightface", model_dir=folder)
    with caplog.at_level(logging.INFO, logger="instantid_lab.face_analysis"):
        face = analyzer.get_face(np.zeros((640, 640, 3), np.uint8))
    assert face.backend == "insightface"
    tried = [m for m in caplog.messages if "det_size" in m]
    assert tried[:3] == [f"insightface: no face at det_size {s}" for s in (640, 576, 512)]
    assert tried[3].endswith("face(s) at det_size 448") and len(tried) == 4


def test_insightface_no_face_lists_every_det_size_tried(tmp_path):
    analyzer = get_face_analyzer("insightface", model_dir=write_antelopev2(tmp_path / "a", "never"))
    with pytest.raises(NoFaceError, match=r"\[640, 576, 512, 448, 384, 320\]"):
        analyzer.get_face(block_photo())
    assert InsightFaceConfig().det_sizes() == (640, 576, 512, 448, 384, 320)


def test_missing_antelopev2_says_where_to_put_it(tmp_path):
    folder = tmp_path / "nowhere" / "antelopev2"
    with pytest.raises(ModelFilesMissingError) as caught:
        get_face_analyzer("insightface", model_dir=folder)
    message = str(caught.value)
    assert str(folder) in message and "scrfd_10g_bnkps.onnx" in message and "glintr100.onnx" in message
    assert ENV_VAR in message and "models/antelopev2" in message


def test_unreadable_model_files_are_a_model_files_error(tmp_path):
    folder = tmp_path / "antelopev2"
    folder.mkdir()
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        (folder / name).write_bytes(b"<html>404</html>")
    with pytest.raises(ModelFilesMissingError, match="fetch antelopev2 again"):
        get_face_analyzer("insightface", model_dir=folder)


# ------------------------------------------------------------------------------ finding models, choosing a backend


@pytest.fixture
def no_models_anywhere(tmp_path, monkeypatch):
    """cwd, home and the environment variable all point at empty folders; the repository's
    models/ folder is taken out of the search too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    backend = "instantid_lab.face_analysis.insightface_backend"
    monkeypatch.setattr(f"{backend}.DEFAULT_ANTELOPEV2_DIR", tmp_path / "repo_models")
    return tmp_path


def test_find_antelopev2_search_order(no_models_anywhere, tiny_antelopev2, monkeypatch):
    assert find_antelopev2() is None
    local = write_antelopev2(no_models_anywhere / "models" / "antelopev2")
    assert find_antelopev2() == local.resolve()  # ./models/antelopev2
    monkeypatch.setenv(ENV_VAR, str(tiny_antelopev2))
    assert find_antelopev2() == tiny_antelopev2.resolve()  # the environment variable comes first
    assert find_antelopev2(no_models_anywhere / "empty") is None  # an explicit folder is the only one searched


def test_find_antelopev2_accepts_the_zips_nested_folder(tmp_path):
    nested = write_antelopev2(tmp_path / "antelopev2" / "antelopev2")
    assert find_antelopev2(tmp_path / "antelopev2") == nested.resolve()


def test_auto_uses_insightface_when_antelopev2_is_found(no_models_anywhere, tiny_antelopev2, monkeypatch, capsys):
    monkeypatch.setenv(ENV_VAR, str(tiny_antelopev2))
    analyzer = get_face_analyzer()
    assert analyzer.backend == "insightface"
    assert "insightface" in capsys.readouterr().out


def test_auto_falls_back_to_dlib_and_says_so(no_models_anywhere, dlib_analyzer, capsys):
    analyzer = get_face_analyzer("auto", num_jitters=1, det_thresh=0.4)  # options of the other backend are ignored
    assert analyzer.backend == "dlib" and analyzer.embedding_dim == 128
    assert "dlib" in capsys.readouterr().out


def test_unknown_backend_option_or_bad_setting_is_an_input_error():
    with pytest.raises(InputError, match="insightface"):
        get_face_analyzer("mediapipe")
    with pytest.raises(InputError, match="num_jitters"):
        get_face_analyzer("dlib", jitters=3)
    with pytest.raises(InputError, match="multiples of 32"):
        InsightFaceConfig(det_size=600)
    with pytest.raises(InputError, match="upsample"):
        DlibConfig(upsample=())
    assert DlibConfig(upsample=[0]).upsample == (0,)
