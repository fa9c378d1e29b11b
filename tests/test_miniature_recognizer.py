import math

import numpy as np
import torch

from instantid_lab.miniature.recognizer import (
    FaceRecognizer, RecognizerConfig, arcface_logits, embed_images, load_recognizer, save_recognizer, verification_scores,
)
from instantid_lab.miniature.training.data import labelled_renders
from instantid_lab.miniature.training.recognizers import train_recognizer
from instantid_lab.miniature.world import HELDOUT_IDS, Caption, Pose, images_to_tensor, render_id


def test_arcface_adds_the_margin_to_the_true_class_angle_only():
    emb = torch.tensor([[1.0, 0.0]])
    centres = torch.tensor([[math.cos(0.3), math.sin(0.3)], [0.0, 1.0]])
    logits = arcface_logits(emb, centres, torch.tensor([0]), s=10.0, m=0.2)
    assert torch.allclose(logits[0, 0], torch.tensor(10.0 * math.cos(0.5)), atol=1e-5)
    assert torch.allclose(logits[0, 1], torch.tensor(0.0), atol=1e-6)


def test_recognizer_maps_images_to_embeddings():
    model = FaceRecognizer(RecognizerConfig.tiny())
    out = model(torch.zeros(3, 3, 32, 32))
    assert out.shape == (3, 16)


def _heldout(n_ids=12, per_id=4):
    rng = np.random.default_rng(3)
    ids = list(HELDOUT_IDS)[:n_ids]
    images = [render_id(i, Pose.sample(rng), Caption.sample(rng)).image for i in ids for _ in range(per_id)]
    return images_to_tensor(images), torch.arange(n_ids).repeat_interleave(per_id)


def test_short_training_separates_heldout_identities_better_than_chance():
    images, labels = labelled_renders(30, 10, seed=0)
    held_x, held_y = _heldout()
    before = verification_scores(embed_images(FaceRecognizer(RecognizerConfig.tiny()), held_x), held_y)
    model, losses = train_recognizer(RecognizerConfig.tiny(), images, labels, steps=120, batch_size=64, progress=False)
    after = verification_scores(embed_images(model, held_x), held_y)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    gap_before = before["same_mean"] - before["different_mean"]
    gap_after = after["same_mean"] - after["different_mean"]
    assert gap_after > gap_before + 0.01


def test_a_saved_recognizer_loads_with_its_config_and_embeds_the_same(tmp_path):
    torch.manual_seed(0)
    model = FaceRecognizer(RecognizerConfig.tiny()).eval()
    save_recognizer(model, tmp_path / "r.safetensors")
    loaded = load_recognizer(tmp_path / "r.safetensors")
    x = images_to_tensor([render_id(i).image for i in HELDOUT_IDS[:2]])
    assert loaded.config == model.config
    assert torch.equal(embed_images(loaded, x), embed_images(model, x))


def test_a_missing_recognizer_says_how_to_train_it(tmp_path):
    import pytest

    from instantid_lab.errors import ModelFilesMissingError

    with pytest.raises(ModelFilesMissingError, match="train recognizers"):
        load_recognizer(tmp_path / "recognizer_conditioner.safetensors")
