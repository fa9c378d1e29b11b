"""Training data of the miniature, rendered once: images, latents, captions, identities and keypoints.

Every stage draws its batches from tensors rendered up front (the renderer is cheap, encoding is
not); the generative stages cache theirs in the output folder, so a resumed run reads them back.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ...errors import CheckpointError, InputError
from ..autoencoder import encode
from ..base import tokenize
from ..instantid import keypoint_tensor
from ..objective import TrainingBatch
from ..recognizer import embed_images
from ..world import (
    HELDOUT_IDS,
    TRAIN_IDS,
    Caption,
    Pose,
    images_to_tensor,
    random_samples,
    render_id,
)
from .loop import is_main_process


def render_images(identity_ids: Sequence[int], n: int, seed: int) -> torch.Tensor:
    """`n` random renders (pose and caption random) as a tensor [n, 3, 32, 32] in [-1, 1]."""
    return images_to_tensor([s.image for s in random_samples(identity_ids, n, seed)])


def labelled_renders(n_identities: int, renders_per_identity: int, seed: int, heldout: bool = False):
    """`renders_per_identity` renders (random pose and caption) of each of the first `n_identities` ids.

    :return: (images [N, 3, 32, 32] in [-1, 1], labels [N] in [0, n_identities)), identity-major.
    """
    rng = np.random.default_rng(seed)
    ids = list(HELDOUT_IDS if heldout else TRAIN_IDS)[:n_identities]
    images = [render_id(i, Pose.sample(rng), Caption.sample(rng)).image for i in ids for _ in range(renders_per_identity)]
    return images_to_tensor(images), torch.arange(n_identities).repeat_interleave(renders_per_identity)


def caption_batch(vae, tokenizer, n: int, seed: int, identity_ids=TRAIN_IDS) -> tuple[TrainingBatch, list]:
    """`n` random renders as a base training batch (scaled latents, caption ids), and the samples themselves."""
    samples = random_samples(identity_ids, n, seed)
    images = images_to_tensor([s.image for s in samples])
    return TrainingBatch(encode(vae, images), tokenize(tokenizer, [s.caption.text() for s in samples])), samples


@torch.no_grad()
def identity_batch(vae, tokenizer, conditioner, n: int, seed: int, identity_ids=TRAIN_IDS,
                   other_reference: float = 0.0) -> TrainingBatch:
    """`n` random renders as an InstantID training batch: latents, caption ids, the conditioning
    recogniser's identity embeddings and the keypoint images (uint8).

    :param other_reference: the fraction of samples whose embedding comes from another render of the same
        identity (own random pose and caption, as the evaluation's reference is); the rest embed the image itself.
    """
    if not 0.0 <= other_reference <= 1.0:
        raise InputError(f"other_reference ({other_reference}) is a fraction of the samples: give a number from 0 "
                         "(every embedding from the training image itself) to 1 (every one from another render)")
    batch, samples = caption_batch(vae, tokenizer, n, seed, identity_ids)
    rng = np.random.default_rng([seed, 1])
    references = [render_id(s.identity_id, Pose.sample(rng), Caption.sample(rng)) if rng.random() < other_reference
                  else s for s in samples]
    embeddings = embed_images(conditioner, images_to_tensor([r.image for r in references]))
    return TrainingBatch(batch.latents, batch.ids, embeddings, keypoint_tensor(np.stack([s.kps for s in samples])))


def cached(path: Path, build: Callable[[], TrainingBatch]) -> TrainingBatch:
    """`build()` once and save it to `path`; later runs (resumes) read the saved tensors instead."""
    if path.exists():  # files of earlier versions may hold more tensors: keep the batch's fields
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as error:  # truncated or not a torch file
            raise CheckpointError(f"cannot read the cached training data {path} ({type(error).__name__}): delete "
                                  "it and run again to render it afresh; nothing was changed.") from error
        return TrainingBatch(**{f.name: saved.get(f.name) for f in fields(TrainingBatch)})
    batch = build()  # every process renders the same data; the main one keeps it
    if is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(batch.as_dict(), tmp)
        os.replace(tmp, path)  # atomic: an interruption never leaves half a file
    return batch
