"""Similarity, averaging and ranking of identity embeddings, and the generic colour feature."""

import numpy as np
import pytest
from PIL import Image

from instantid_lab.embeddings import (
    color_histogram_feature,
    cosine_similarity,
    mean_embedding,
    metric_for,
    nearest,
    pair_ranking_accuracy,
    photo_variants,
    same_vs_different,
    similarity_matrix,
    variant_scores,
)
from instantid_lab.errors import InputError


def test_cosine_similarity_known_values_and_broadcasting():
    assert cosine_similarity([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert cosine_similarity([1.0, 1.0], [3.0, 3.0]) == pytest.approx(1.0)
    assert cosine_similarity([1.0, 0.0], [-1.0, 0.0]) == pytest.approx(-1.0)
    assert cosine_similarity([0.0, 0.0], [1.0, 0.0]) == 0.0  # zero vector: 0, not NaN
    rows = cosine_similarity(np.eye(3), [1.0, 0.0, 0.0])
    assert rows.shape == (3,) and np.allclose(rows, [1, 0, 0])
    with pytest.raises(InputError):
        cosine_similarity(np.ones(3), np.ones(4))


def test_cosine_similarity_accepts_torch():
    torch = pytest.importorskip("torch")
    a, b = torch.randn(16), torch.randn(16)
    want = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert cosine_similarity(a, b) == pytest.approx(want, abs=1e-6)


def test_similarity_matrix_cosine_and_euclidean(clustered_embeddings):
    embs, _ = clustered_embeddings
    cos = similarity_matrix(embs, "cosine")
    dist = similarity_matrix(embs, "euclidean")
    assert cos.shape == dist.shape == (12, 12)
    assert np.allclose(np.diag(cos), 1.0) and np.allclose(np.diag(dist), 0.0, atol=1e-5)
    assert np.allclose(cos, cos.T) and np.allclose(dist, dist.T)
    assert cos[0, 5] == pytest.approx(cosine_similarity(embs[0], embs[5]))
    assert dist[0, 5] == pytest.approx(np.linalg.norm(embs[0].astype(np.float64) - embs[5]), rel=1e-6)
    with pytest.raises(InputError):
        similarity_matrix(embs, "manhattan")


def test_nearest_orders_by_metric():
    embs = np.array([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [-1.0, 0.0]])
    assert [i for i, _ in nearest([1.0, 0.0], embs, k=2)] == [2, 1]
    assert [i for i, _ in nearest([1.0, 0.0], embs, k=2, metric="euclidean")] == [2, 1]
    far = nearest([10.0, 0.0], embs, k=4, metric="euclidean")
    assert far[0][0] == 2 and far[-1][0] == 3 and far[0][1] == pytest.approx(9.0)


@pytest.mark.parametrize("mode", ["mean", "norm_mean"])
def test_averaging_copies_of_one_embedding_returns_it(mode):
    e = np.random.default_rng(1).normal(size=512).astype(np.float32) * 3
    out = mean_embedding(np.stack([e] * 5), mode=mode)
    assert out.shape == (512,) and out.dtype == np.float32
    assert np.allclose(out, e, atol=1e-5)
    assert np.allclose(mean_embedding(e, mode=mode), e, atol=1e-5)  # one vector


def test_mean_is_the_plain_average_and_norm_mean_weighs_photos_equally():
    a, b = np.array([10.0, 0.0]), np.array([0.0, 1.0])
    assert np.allclose(mean_embedding([a, b], mode="mean"), [5.0, 0.5])
    out = mean_embedding([a, b], mode="norm_mean")
    assert out[0] == pytest.approx(out[1])  # direction halfway: both photos count equally
    assert np.linalg.norm(out) == pytest.approx(5.5)  # rescaled to the mean input norm
    assert np.linalg.norm(mean_embedding([a, b], mode="norm_mean", target_norm=20.0)) == pytest.approx(20.0)
    # Rescaling one input changes nothing in norm_mean's direction.
    direction = mean_embedding([a * 7, b], mode="norm_mean")
    assert np.allclose(direction / np.linalg.norm(direction), out / np.linalg.norm(out))


def test_mean_embedding_validates():
    with pytest.raises(InputError):
        mean_embedding(np.ones((2, 3)), mode="concat")
    with pytest.raises(InputError):
        mean_embedding(np.ones((2, 3, 4)))
    with pytest.raises(InputError):
        mean_embedding([[1.0, np.nan]])


def test_same_vs_different_splits_all_pairs(clustered_embeddings):
    embs, labels = clustered_embeddings
    scores = same_vs_different(embs, labels, "cosine")
    assert len(scores.same) == 4 * 3  # 4 people x C(3, 2) pairs
    assert len(scores.different) == 12 * 11 // 2 - 12
    assert scores.same.mean() > scores.different.mean()
    same, different, metric = scores  # unpacks like a tuple
    assert metric == "cosine" and np.array_equal(same, scores.same)
    with pytest.raises(InputError):
        same_vs_different(embs, labels[:-1])


def test_pair_ranking_accuracy_extremes_and_ties():
    # Perfect: same-person pairs are the two most similar pairs.
    embs = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labels = ["a", "a", "b", "b"]
    assert pair_ranking_accuracy(embs, labels) == 1.0
    assert pair_ranking_accuracy(embs, labels, metric="euclidean") == 1.0
    # Square corners, same person on the diagonals: every same pair is the least similar.
    square = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert pair_ranking_accuracy(square, ["a", "b", "a", "b"]) == 0.0
    assert pair_ranking_accuracy(square, ["a", "b", "a", "b"], metric="euclidean") == 0.0
    # All embeddings identical: every comparison is a tie, counted as one half.
    assert pair_ranking_accuracy(np.ones((4, 3)), labels) == 0.5


def test_pair_ranking_accuracy_equals_brute_force(clustered_embeddings):
    embs, labels = clustered_embeddings
    noisy = embs + np.random.default_rng(2).normal(size=embs.shape) * 6  # make mistakes happen
    for metric, better in (("cosine", np.greater), ("euclidean", np.less)):
        same, different = same_vs_different(noisy, labels, metric)[:2]
        wins = better(same[:, None], different[None, :]).mean() + 0.5 * (same[:, None] == different[None, :]).mean()
        assert pair_ranking_accuracy(noisy, labels, metric) == pytest.approx(wins)
        assert 0.5 < wins < 1.0


def test_pair_ranking_accuracy_needs_both_kinds_of_pair():
    with pytest.raises(InputError):
        pair_ranking_accuracy(np.eye(3), ["a", "b", "c"])
    with pytest.raises(InputError):
        pair_ranking_accuracy(np.eye(3), ["a", "a", "a"])


def test_metric_for_backend():
    assert metric_for("dlib") == "euclidean"
    assert metric_for("insightface") == "cosine"


def _two_tone(top, bottom, size=(64, 64)):
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[: size[1] // 2], array[size[1] // 2 :] = top, bottom
    return Image.fromarray(array)


def test_color_histogram_feature_groups_by_colour_not_content():
    red_blue = color_histogram_feature(_two_tone((200, 30, 30), (30, 30, 200)))
    blue_red = color_histogram_feature(_two_tone((30, 30, 200), (200, 30, 30)))  # same colours, moved
    green = color_histogram_feature(_two_tone((30, 200, 30), (30, 200, 30)))
    assert red_blue.shape == (8 * 4 * 4,) and red_blue.dtype == np.float32
    assert np.linalg.norm(red_blue) == pytest.approx(1.0, abs=1e-6)
    assert cosine_similarity(red_blue, blue_red) == pytest.approx(1.0)  # layout is ignored
    assert cosine_similarity(red_blue, green) == pytest.approx(0.0)  # no colour in common
    assert color_histogram_feature(_two_tone((0, 0, 0), (255, 255, 255)), bins=(2, 2, 2)).shape == (8,)


def test_photo_variants_edit_as_described():
    array = np.zeros((100, 120, 3), np.uint8)
    array[:, :60] = (200, 0, 0)  # left half red
    array[40:60, 50:70] = 255  # a sharp white square ("face" box 40..80)
    variants = photo_variants(Image.fromarray(array), bbox=[40, 30, 80, 70], margin=0.25)
    assert set(variants) == {"mirrored", "cropped", "blurred", "low resolution"}
    assert np.array_equal(np.asarray(variants["mirrored"]), array[:, ::-1])
    assert variants["cropped"].size == (60, 60)  # box 40 wide + 10 px on each side
    for name in ("blurred", "low resolution"):
        edited = np.asarray(variants[name]).astype(int)
        assert variants[name].size == (120, 100)
        assert 0 < np.abs(edited - array).mean() and edited[40, 60].min() < 255  # the square's edge softened


def test_variant_scores_with_a_stand_in_analyzer(fake_analyzer, colour_photo, tmp_path):
    path = colour_photo(tmp_path / "red.png", (250, 10, 10))
    same = Image.open(path).copy()
    black = Image.new("RGB", same.size)  # no face in it
    scores = variant_scores(fake_analyzer, path, variants={"copy": same, "black": black})
    assert scores["copy"] == pytest.approx(1.0) and np.isnan(scores["black"])
    fake_analyzer.backend = "dlib"
    assert variant_scores(fake_analyzer, path, variants={"copy": same})["copy"] == pytest.approx(0.0, abs=1e-6)
