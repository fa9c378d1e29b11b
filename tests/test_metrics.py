"""The experiments' metrics: identity by an evaluator that did not condition, keypoints, prompt; tidy tables."""

import numpy as np
import pandas as pd
import pytest
import torch

from instantid_lab.errors import InputError
from instantid_lab.experiments.metrics import (
    MiniatureScorer, PhotoScorer, Request, caption_hits, gallery_scores, normalised_keypoint_error, summary,
)
from instantid_lab.miniature.evaluate import HeldoutTask
from instantid_lab.miniature.world import Caption


def test_gallery_scores_are_cosine_to_the_wanted_row_and_nearest_row_hits():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    table = gallery_scores(torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), gallery, [0, 0, 0])
    np.testing.assert_allclose(table.identity_similarity, [1.0, 2 ** -0.5, 0.0], atol=1e-6)
    assert table.rank1.tolist() == [True, True, False]  # a tie goes to the first row


def test_normalised_keypoint_error_divides_by_the_requested_eye_distance():
    requested = np.array([[10, 10], [30, 10], [20, 20], [12, 28], [28, 28]], float)  # eyes 20 px apart
    assert normalised_keypoint_error(requested + [3, 4], requested) == pytest.approx(5 / 20)
    assert normalised_keypoint_error(requested, requested) == 0.0


def test_caption_hits_mark_each_attribute_and_all_four():
    read = {"background": ["blue", "red"], "expression": ["neutral", "smiling"], "accessory": ["none", "hat"],
            "style": ["flat", "flat"]}
    requests = [Request(1, caption=Caption("blue", "neutral", "none", "flat")),
                Request(2, caption=Caption("red", "smiling", "hat", "outline"))]
    table = caption_hits(read, requests)
    assert table.caption_all.tolist() == [1.0, 0.0] and table.caption_style.tolist() == [1.0, 0.0]
    assert caption_hits(read, [Request(1), Request(2)]).caption_all.isna().all()  # no caption asked: not scored


@pytest.fixture(scope="module")
def task_and_scorer():
    return HeldoutTask.make(8, seed=0), MiniatureScorer()


def test_miniature_scorer_rates_real_targets_high_and_names_the_evaluator(task_and_scorer):
    task, scorer = task_and_scorer
    requests = [Request(i, t.kps, t.caption.text(), t.caption) for i, t in zip(task.ids, task.targets)]
    table = scorer.score([t.image for t in task.targets], requests)
    assert isinstance(table, pd.DataFrame) and len(table) == 8
    assert table.rank1.mean() >= 0.75 and table.identity_similarity.mean() > 0.7
    assert table.keypoint_error.mean() < 1.5 and table.caption_all.mean() >= 0.75
    assert set(table.scored_by) == {"miniature evaluator recogniser + inspector"} and table.face_detected.isna().all()
    assert table.chance_rank1.iloc[0] == pytest.approx(1 / 8)
    shuffled = scorer.score([t.image for t in task.targets[1:] + task.targets[:1]], requests)
    assert shuffled.identity_similarity.mean() < table.identity_similarity.mean() - 0.3
    assert shuffled.keypoint_error.mean() > 2 * table.keypoint_error.mean()


def test_miniature_scorer_asks_for_every_requested_identity_in_the_gallery(task_and_scorer):
    task, scorer = task_and_scorer
    with pytest.raises(InputError, match="not in the gallery"):
        scorer.score([task.targets[0].image], [Request(task.ids[0])], gallery_ids=task.ids[1:])
    with pytest.raises(InputError, match="one Request per image"):
        scorer.score([task.targets[0].image], [])


def test_photo_scorer_detects_scores_identity_and_skips_clip_with_a_message(fake_analyzer, colour_photo, tmp_path):
    red, blue = (colour_photo(tmp_path / f"{n}.png", c) for n, c in (("red", (200, 0, 0)), ("blue", (0, 0, 200))))
    black = colour_photo(tmp_path / "black.png", (0, 0, 0))
    scorer = PhotoScorer({"red": [red], "blue": [blue]}, analyzer=fake_analyzer)
    face = fake_analyzer.get_face(red)
    table = scorer.score([red, blue, black], [Request("red", face.kps), Request("red"), Request("blue")])
    assert table.face_detected.tolist() == [True, True, False]
    assert table.rank1.tolist()[:2] == [True, False] and np.isnan(table.rank1.iloc[2])
    assert table.keypoint_error.iloc[0] == pytest.approx(0.0) and np.isnan(table.keypoint_error.iloc[1])
    assert table.clip_score.isna().all() and "CLIP score skipped" in scorer.clip_message
    assert set(table.scored_by) == {"fake face analyzer"}


def test_summary_gives_mean_sem_and_count_per_group():
    table = pd.DataFrame({"group": ["a", "a", "b"], "identity_similarity": [0.2, 0.4, 0.9], "rank1": [True, False, True]})
    out = summary(table, ["group"]).set_index("group")
    assert out.loc["a", "identity_similarity_mean"] == pytest.approx(0.3)
    assert out.loc["a", "rank1_mean"] == 0.5 and out.loc["a", "identity_similarity_count"] == 2
    assert out.loc["a", "identity_similarity_sem"] == pytest.approx(0.1)
