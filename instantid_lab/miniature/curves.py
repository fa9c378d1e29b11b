"""Training curves of the miniature's InstantID stage: smoothing, plots and a low-noise loss.

The per-step training loss is noisy: every step draws new images, new noise and new timesteps, and
the timestep alone changes the loss more than a few hundred steps of training do. So the loss is
read smoothed over tens of steps (`smooth`), and two sets of weights are compared on one *fixed*
batch instead (`fixed_batch_loss`: the same held-out images, noise and timesteps for both), which
shows a difference that the training curve of a short run hides.

`training.train_instantid(..., track=K)` records held-out rank-1 and identity similarity at every
checkpoint; `plot_training_curves` draws them next to the smoothed loss.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from .base import training_scheduler
from .objective import TrainingBatch, denoising_loss
from .training.data import identity_batch
from .world import HELDOUT_IDS


def smooth(values: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Trailing moving average: m_k = mean(values[k - window + 1 .. k]), for k = window - 1 .. N - 1.

    :param window: clipped to [1, N].
    :return: (steps [N - window + 1] = the step each mean ends at, means [N - window + 1])
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise InputError(f"smooth needs a non-empty 1-d sequence, got shape {list(values.shape)}")
    window = int(np.clip(window, 1, len(values)))
    means = np.convolve(values, np.ones(window) / window, mode="valid")
    return np.arange(window - 1, len(values)), means


def plot_training_curves(losses: Sequence[float], evals: Sequence[dict], window: int = 25,
                         shipped: Optional[Mapping[str, float]] = None, chance: Optional[float] = None) -> Figure:
    """Three panels: the loss (raw and smoothed), held-out rank-1 and identity similarity against the step.

    :param evals: train_instantid's report["evals"]: [{"step", "rank1", "identity_similarity"}, ...]
    :param shipped: {"rank1", "identity_similarity"} of other weights (e.g. the shipped ones), drawn dashed.
    :param chance: rank-1 by chance (1 / identities), drawn dotted.
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 3.5))
    plt.close(fig)  # shown where the notebook displays it, not again by pyplot
    ax_loss, ax_rank, ax_sim = fig.subplots(1, 3)
    ax_loss.plot(np.arange(len(losses)), losses, color="tab:blue", alpha=0.25, lw=0.8, label="per step")
    steps, means = smooth(losses, window)
    ax_loss.plot(steps, means, color="tab:blue", label=f"mean of {min(window, len(losses))} steps")
    ax_loss.set(xlabel="step", ylabel="loss (v-prediction, min-SNR)", title="training loss")
    ax_loss.legend(fontsize=8)
    for ax, key, label in ((ax_rank, "rank1", "rank-1"), (ax_sim, "identity_similarity", "identity similarity")):
        ax.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", color="tab:orange", label="this run")
        if shipped is not None:
            ax.axhline(shipped[key], color="black", ls="--", label="shipped weights")
        if chance is not None and key == "rank1":
            ax.axhline(chance, color="gray", ls=":", label="chance")
        ax.set(xlabel="step", ylabel=label, title=f"{label}, held-out identities")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def heldout_batch(pipe, conditioner, n: int = 256, seed: int = 9) -> TrainingBatch:
    """Training-style data from `n` renders of held-out identities, for `fixed_batch_loss`.

    :param pipe: a miniature pipeline (its VAE encodes the images, its tokenizer the captions).
    :param conditioner: the conditioning recogniser (gives the identity embeddings).
    """
    return identity_batch(pipe.vae, pipe.tokenizer, conditioner, n, seed=seed, identity_ids=HELDOUT_IDS)


@torch.no_grad()
def fixed_batch_loss(pipe, data: TrainingBatch, batch_size: int = 64, seed: int = 0, min_snr_gamma: float = 5.0) -> float:
    """The training objective (`objective.denoising_loss`) of `pipe` on `data`, with fixed noise and timesteps.

    Chunk k of `data` (in order, no dropout) is noised with a generator seeded `seed + k`, so any two
    pipelines on the same base see exactly the same noisy latents and the difference is their weights.

    :param pipe: an `InstantIDPipeline` with IdentityNet and the adapter (e.g. from `load_miniature`).
    :param data: from `heldout_batch` (or the training data, `training.data.identity_batch`).
    """
    scheduler, total = training_scheduler(), 0.0
    for k, start in enumerate(range(0, len(data), batch_size)):
        chunk = data.rows(slice(start, start + batch_size))
        loss = denoising_loss(pipe, chunk, scheduler, torch.Generator().manual_seed(seed + k), min_snr_gamma)
        total += float(loss) * len(chunk)
    return total / len(data)
