"""The identity explorer, driven without a browser: select photos, read its state and widgets."""

import pytest

from instantid_lab.data import Photo
from instantid_lab.errors import InputError
from instantid_lab.widgets import IdentityExplorer


def _photo(tmp_path, colour_photo, file, identity, colour, **kwargs):
    colour_photo(tmp_path / file, colour, **kwargs)
    return Photo(file=str(tmp_path / file), identity=identity, role="test", faces=1, notes="")


@pytest.fixture
def photos(tmp_path, colour_photo):
    red, blue = (250, 10, 10), (10, 10, 250)
    return [
        _photo(tmp_path, colour_photo, "red_1.png", "red", red),
        _photo(tmp_path, colour_photo, "red_2.png", "red", (240, 20, 10)),
        _photo(tmp_path, colour_photo, "blue_1.png", "blue", blue, size=(120, 100)),
        _photo(tmp_path, colour_photo, "blue_2.png", "blue", (20, 10, 240)),
        _photo(tmp_path, colour_photo, "group.png", None, (245, 15, 10), second_face=True),
        _photo(tmp_path, colour_photo, "empty.png", None, (0, 0, 0)),
    ]


def _names(selection):
    return [n.name.split("/")[-1] for n in selection.neighbours]


def test_builds_once_and_shows_the_first_photo(photos, fake_analyzer):
    explorer = IdentityExplorer(photos, fake_analyzer, k=3)
    assert len(fake_analyzer.calls) == len(photos)  # every photo analysed exactly once
    assert explorer.selection.name == photos[0].file and explorer.selection.face == 0
    assert _names(explorer.selection)[0] == "red_2.png"  # same colour = same identity
    assert explorer.photo_view.value[:4] == b"\x89PNG" and explorer.kps_view.value[:4] == b"\x89PNG"
    assert "red_2.png" in explorer.table.value and "yes" in explorer.table.value


def test_choosing_in_the_dropdown_updates_views_and_table(photos, fake_analyzer):
    explorer = IdentityExplorer(photos, fake_analyzer, k=3)
    before = (explorer.photo_view.value, explorer.kps_view.value, explorer.table.value)
    explorer.photo_picker.value = photos[2].file  # what a click does
    assert explorer.selection.name == photos[2].file
    assert _names(explorer.selection)[0] == "blue_2.png"
    assert explorer.table.value != before[2] and explorer.photo_view.value != before[0]
    assert explorer.kps_view.value != before[1]  # other image size, other keypoints
    assert len(fake_analyzer.calls) == len(photos)  # no re-analysis on selection


def test_select_group_photo_and_pick_its_second_face(photos, fake_analyzer):
    explorer = IdentityExplorer(photos, fake_analyzer, k=2)
    group = photos[4].file
    explorer.select(group)
    assert [value for _, value in explorer.face_picker.options] == [0, 1]
    assert _names(explorer.selection)[0].startswith("red")  # largest face: red
    largest = explorer.kps_view.value
    explorer.face_picker.value = 1  # the second face's embedding points at blue
    assert explorer.selection.face == 1
    assert all(name.startswith("blue") for name in _names(explorer.selection))
    assert explorer.kps_view.value != largest
    assert explorer.select(photos[0].file).face == 0  # back to a one-face photo
    assert explorer.face_picker.options == (("1 of 1", 0),)


def test_photo_without_face_and_bad_requests(photos, fake_analyzer):
    explorer = IdentityExplorer(photos, fake_analyzer)
    selection = explorer.select(photos[5].file)
    assert selection.face == -1 and selection.neighbours == ()
    assert "no face found" in explorer.info.value
    with pytest.raises(InputError):
        explorer.select("nobody.png")
    with pytest.raises(InputError):
        explorer.select(photos[0].file, face=3)
    with pytest.raises(InputError):
        IdentityExplorer([], fake_analyzer)


def test_precomputed_faces_are_used_instead_of_detecting(photos, fake_analyzer):
    precomputed = {p.file: fake_analyzer.detect(p.path) for p in photos}
    fake_analyzer.calls.clear()
    explorer = IdentityExplorer(photos, fake_analyzer, faces=precomputed)
    assert fake_analyzer.calls == []
    assert explorer.selection.neighbours


def test_euclidean_backend_ranks_smallest_distance_first(photos, fake_analyzer):
    fake_analyzer.backend = "dlib"  # dlib descriptors are compared by Euclidean distance
    explorer = IdentityExplorer(photos, fake_analyzer, k=4)
    scores = [n.score for n in explorer.selection.neighbours]
    assert explorer.metric == "euclidean" and scores == sorted(scores)
    assert "Euclidean distance" in explorer.table.value and "&lt; 0.6" in explorer.table.value
