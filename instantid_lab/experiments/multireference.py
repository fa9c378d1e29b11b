"""Multi-reference (the paper's Fig. 4): does conditioning on more reference photos of a person keep the
identity better, and which way of combining them (`references.COMBINERS`) works best?

The study: each *subject* is one identity with K reference images (analysed faces: embedding, box,
detection score) and one *target* (keypoints and prompt). For N = 1..K references and every combiner,
its first N references make one `References` record; all images of one (combiner, N), every subject x
noise seed, are generated in one pipeline call (or chunks of `batch_size`). Image (subject k, seed s)
starts from the same noise in every cell, so cells differ only in the references. A judge that took no
part in generation scores every image (`metrics.MiniatureScorer`: the evaluating recogniser;
`metrics.PhotoScorer` for photos). With one reference every combiner returns it unchanged, so N = 1
is generated once, as combiner "single".

    settings = StudySettings.ci()
    subjects = miniature_subjects(get_face_analyzer("miniature"), settings)
    result = run_study(pipe, subjects, MiniatureScorer(), settings)
    study_summary(result.table)      # mean and standard error per (combiner, N)
    gains(result.table)              # paired gain over one reference (same identity and noise)
    quote_table(result.table)        # both as "mean ± sem" text, one row per (combiner, N)
    plot_study(result.table)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from accelerate.utils import gather_object
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from ..data import face_photos
from ..images import load_image
from ..miniature.base import GUIDANCE_SCALE, SAMPLING_STEPS
from ..miniature.instantid import keypoint_image
from ..miniature.training.loop import process_state
from ..miniature.world import HELDOUT_IDS, Caption, Pose, render_id
from ..references import COMBINERS, References, face_weights
from .metrics import Request, summary

#: The label of the N = 1 cell (one reference: every combiner is that reference).
SINGLE = "single"


@dataclass(frozen=True)
class StudySettings:
    """The study's size and sampler (`ci()`: about 20 s on one CPU thread in the miniature).

    :param n_identities: subjects (held-out identities in the miniature).
    :param seeds: noise seeds per subject.
    :param n_references: the numbers of references N to compare (1 is the single-reference level).
    :param combiners: the combiners compared at every N > 1.
    :param weight_by: "weighted"'s weights: "area" (face box) or "det_score".
    :param steps, guidance_scale: the sampler (DDIM in the miniature).
    :param task_seed: seeds the miniature's renders (references and targets).
    :param batch_size: images per pipeline call; None: all images of one (combiner, N) in one call.
    """

    n_identities: int = 48
    seeds: tuple = (0, 1)
    n_references: tuple = (1, 2, 4, 6)
    combiners: tuple = COMBINERS
    weight_by: str = "area"
    steps: int = SAMPLING_STEPS
    guidance_scale: float = GUIDANCE_SCALE
    task_seed: int = 0
    batch_size: Optional[int] = None

    @classmethod
    def ci(cls, **over) -> "StudySettings":
        """6 identities x 2 seeds x N in {1, 2, 4}, DDIM 10 steps (the tests' and CI's size)."""
        return cls(**{**dict(n_identities=6, seeds=(0, 1), n_references=(1, 2, 4), steps=10), **over})


@dataclass
class Subject:
    """One identity of the study.

    :param identity: its label (the scorer's gallery key: a miniature id, or a photo identity's name).
    :param faces: its analysed reference faces (`Face`: embedding, bbox / area, det_score), in order.
    :param images: the reference images, same order.
    :param request: what its generated images are asked to show (target keypoints, prompt, caption).
    :param keypoint_image: the target's keypoint image.
    :param target_image: the target itself, when there is one (the miniature's render).
    """

    identity: Any
    faces: list
    images: list
    request: Request
    keypoint_image: Image.Image
    target_image: Optional[Image.Image] = None

    def references(self, n: int, combine: str, weight_by: str = "area") -> References:
        """Its first `n` reference embeddings, combined by `combine` (weights from the faces for "weighted")."""
        faces = self.faces[:n]
        weights = face_weights(faces, weight_by) if combine == "weighted" else None
        return References(np.stack([f.embedding for f in faces]), combine, weights)  # [n, D]


@dataclass
class StudyResult:
    """The study's outcome: `table` row i describes `images[i]`.

    :param table: one row per image: identity, seed, combiner, n_references and the scorer's columns
        (identity_similarity, rank1, chance_rank1, ...).
    """

    table: pd.DataFrame
    images: list = field(repr=False)
    subjects: list = field(repr=False)
    settings: StudySettings = StudySettings()


# ----------------------------------------------------------------------------- subjects


def miniature_subjects(analyzer, settings: StudySettings = StudySettings()) -> list[Subject]:
    """Held-out miniature identities, each with max(N) reference renders and one target render, every
    render with a random pose and caption; the analyzer (`get_face_analyzer("miniature")`) reads them."""
    k = max(settings.n_references)
    return [_miniature_subject(analyzer, i, k, settings.task_seed) for i in list(HELDOUT_IDS)[:settings.n_identities]]


def _miniature_subject(analyzer, identity: int, k: int, seed: int) -> Subject:
    rng = np.random.default_rng([seed, identity, 1])   # not the scorer's gallery stream ([seed, identity])
    renders = [render_id(identity, Pose.sample(rng), Caption.sample(rng)) for _ in range(k + 1)]
    *references, target = renders
    request = Request(identity, target.kps, target.caption.text(), target.caption)
    return Subject(identity, [analyzer.get_face(r.image) for r in references], [r.image for r in references],
                   request, keypoint_image(target.kps), target.image)


def photo_subjects(analyzer, target: Callable, prompt: str, role: str = "astronaut") -> list[Subject]:
    """The bundled photos (`data.face_photos(role)`) of every person with two or more, as subjects.

    :param target: `(face, image_size) -> (kps, keypoint image)` at the output size, e.g. a world's
        `reference_keypoint_image`; the target is the first photo's pose.
    :param prompt: every image's prompt.
    """
    people: dict = {}
    for p in face_photos(role):
        people.setdefault(p.identity, []).append(load_image(p.path))
    subjects = []
    for name, images in people.items():
        if len(images) >= 2:
            faces = [analyzer.get_face(im) for im in images]
            kps, kps_image = target(faces[0], images[0].size)
            subjects.append(Subject(name, faces, images, Request(name, kps, prompt), kps_image))
    return subjects


# ----------------------------------------------------------------------------- generation and scoring


def study_cells(settings: StudySettings) -> list[tuple[str, int]]:
    """The (combiner, N) cells to generate: (SINGLE, 1), then every combiner at every N > 1."""
    cells = [(SINGLE, 1)] if 1 in settings.n_references else []
    return cells + [(c, n) for n in settings.n_references if n > 1 for c in settings.combiners]


def run_study(pipe, subjects: Sequence[Subject], scorer, settings: StudySettings = StudySettings()) -> StudyResult:
    """Generate every cell (`study_cells`) for every subject with >= N references x seed, then score all
    images in one call of `scorer.score(images, requests)`.

    Under `torchrun --nproc_per_node N` the processes share the cells (cell k goes to process k mod N)
    and gather every image before scoring: every process returns the table one process would.
    """
    processes, cells = process_state(), study_cells(settings)
    made = []  # (cell index, row, image, request)
    for index in tqdm(range(processes.process_index, len(cells), processes.num_processes), desc="(combiner, N)"):
        combine, n = cells[index]
        items = [(k, s) for s in settings.seeds for k, subj in enumerate(subjects) if len(subj.faces) >= n]
        images = generate_cell(pipe, subjects, items, combine, n, settings)
        made += [(index, dict(identity=subjects[k].identity, seed=s, combiner=combine, n_references=n), image,
                  subjects[k].request) for (k, s), image in zip(items, images)]
    if processes.num_processes > 1:
        made = sorted(gather_object(made), key=lambda entry: entry[0])  # stable: each cell's items keep their order
    rows, images, requests = ([entry[i] for entry in made] for i in (1, 2, 3))
    scores = scorer.score(images, requests)
    table = pd.concat([pd.DataFrame(rows), scores.drop(columns="identity")], axis=1)
    return StudyResult(table, images, list(subjects), settings)


def generate_cell(pipe, subjects: Sequence[Subject], items: Sequence[tuple[int, int]], combine: str, n: int,
                  settings: StudySettings) -> list:
    """The images of one (combiner, N) cell, item = (subject index, seed), in chunks of `batch_size`."""
    combine = "mean" if combine == SINGLE else combine
    size = settings.batch_size or len(items)
    out = []
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        out += pipe([subjects[k].request.prompt for k, _ in chunk],
                    [subjects[k].references(n, combine, settings.weight_by) for k, _ in chunk],
                    [subjects[k].keypoint_image for k, _ in chunk], num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale, generator=[noise_generator(k, s) for k, s in chunk]).images
    return out


def noise_generator(subject: int, seed: int) -> torch.Generator:
    """The starting noise of image (subject, seed): the same in every cell of the study."""
    return torch.Generator().manual_seed(100_003 * seed + subject)


def embedding_agreement(subjects: Sequence[Subject], analyzer, n_references: Sequence[int]) -> pd.DataFrame:
    """The input side: per subject and N, the cosine between the mean of its first N reference embeddings
    and the embedding of its target render (an unseen image of the person), by the conditioning analyzer.
    ("norm_mean" has the same direction as "mean"; "concat" has no single vector.) Needs target images.

    :return: one row per (subject, N): identity, n_references, cosine.
    """
    rows = []
    for s in subjects:
        target = analyzer.get_face(s.target_image).embedding                       # [D]
        for n in n_references:
            mean = np.stack([f.embedding for f in s.faces[:n]]).mean(0)            # [n, D] -> [D]
            cosine = float(mean @ target / (np.linalg.norm(mean) * np.linalg.norm(target)))
            rows.append(dict(identity=s.identity, n_references=n, cosine=cosine))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- tables


def study_summary(table: pd.DataFrame, columns: Sequence[str] = ("identity_similarity", "rank1")) -> pd.DataFrame:
    """Mean, standard error and count of `columns` per (combiner, n_references)."""
    return summary(table, ["combiner", "n_references"], columns)


def gains(table: pd.DataFrame, column: str = "identity_similarity") -> pd.DataFrame:
    """Per (combiner, N > 1), the paired gain over one reference: `column` minus the same identity and
    seed's single-reference value; gain_mean, gain_sem, gain_count."""
    single = table[table.n_references == 1].set_index(["identity", "seed"])[column]
    more = table[table.n_references > 1]
    baseline = single.loc[list(zip(more.identity, more.seed))].to_numpy()
    return summary(more.assign(gain=more[column].to_numpy() - baseline), ["combiner", "n_references"], ["gain"])


def quote_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table a reader would quote, one row per (combiner, N): identity similarity, rank-1 and the paired
    gain in similarity over one reference, each "mean ± standard error", and the number of images."""
    stats = study_summary(table).merge(gains(table), how="left", on=["combiner", "n_references"])
    out = pd.DataFrame({"combiner": stats.combiner, "N": stats.n_references,
                        "identity similarity": _mean_sem(stats, "identity_similarity"),
                        "rank-1": _mean_sem(stats, "rank1"), "gain over N=1 (paired)": _mean_sem(stats, "gain", "+"),
                        "images": stats.identity_similarity_count})
    return out.sort_values(["N", "combiner"]).set_index(["N", "combiner"])


def _mean_sem(stats: pd.DataFrame, column: str, sign: str = "") -> list[str]:
    """"mean ± sem" per row ("" where the mean is missing)."""
    pairs = zip(stats[f"{column}_mean"], stats[f"{column}_sem"].fillna(0))
    return ["" if np.isnan(m) else f"{m:{sign}.3f} ± {e:.3f}" for m, e in pairs]


def target_level(subjects: Sequence[Subject], scorer) -> Optional[float]:
    """The scorer's identity similarity of the targets themselves (what a perfect generation would reach),
    or None when the subjects have no target image (photos)."""
    if any(s.target_image is None for s in subjects):
        return None
    scores = scorer.score([s.target_image for s in subjects], [s.request for s in subjects])
    return float(scores.identity_similarity.mean())


def example_columns(result: StudyResult, n_subjects: int = 4) -> dict[str, list]:
    """Pictures for a grid: column title -> one image per subject (first seed): its references, its target,
    the single-reference image and each combiner's image at the largest N."""
    k, seed, t = max(result.settings.n_references), result.settings.seeds[0], result.table
    subjects = [s for s in result.subjects if len(s.faces) >= k][:n_subjects]
    columns = {f"reference {j + 1}": [s.images[j] for s in subjects] for j in range(k)}
    if all(s.target_image is not None for s in subjects):
        columns["target"] = [s.target_image for s in subjects]
    for combine, n in [(SINGLE, 1)] + [(c, k) for c in result.settings.combiners]:
        rows = [t.index[(t.identity == s.identity) & (t.seed == seed) & (t.combiner == combine)
                        & (t.n_references == n)][0] for s in subjects]
        columns[f"{combine}\nN={n}"] = [result.images[r] for r in rows]
    return columns


def copies_vs_single(pipe, subject: Subject, settings: StudySettings, copies: int = 4) -> dict[str, float]:
    """Per combiner, the largest pixel difference between `copies` copies of the subject's first reference
    and that reference alone (same noise); 0 up to float error for every combiner."""
    e = subject.faces[0].embedding

    def generate(identity) -> np.ndarray:
        return pipe(subject.request.prompt, identity, subject.keypoint_image, output_type="np",
                    num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                    generator=noise_generator(0, 0)).images[0]

    alone = generate(e)
    return {c: float(np.abs(generate(References(np.repeat(e[None], copies, 0), c)) - alone).max()) for c in COMBINERS}


# ----------------------------------------------------------------------------- the plot


def plot_study(table: pd.DataFrame, levels: Optional[dict] = None, title: str = "") -> Figure:
    """Three panels vs N, one line per combiner from the single-reference point (error bars: standard error):
    identity similarity and rank-1 (dashed line and band: the single-reference level; `levels`: more
    labelled lines on the similarity panel, e.g. {"target renders": value}; dotted: chance rank-1), and
    the paired gain in similarity over one reference (same identity and noise; 0 = no change)."""
    stats, paired = study_summary(table), gains(table)
    zero = pd.DataFrame({"combiner": [SINGLE], "n_references": [1], "gain_mean": [0.0], "gain_sem": [0.0]})
    fig = plt.figure(figsize=(14, 4))
    plt.close(fig)                                   # shown only where the notebook displays it
    similarity, rank1, gain = fig.subplots(1, 3)
    _plot_panel(similarity, stats, "identity_similarity", "identity similarity (cosine)")
    _plot_panel(rank1, stats, "rank1", "rank-1")
    _plot_panel(gain, pd.concat([zero, paired]), "gain", "gain in similarity over N = 1 (paired)")
    for (label, value), style in zip((levels or {}).items(), ("-.", ":")):
        similarity.axhline(value, color="black", linestyle=style, linewidth=1, label=label)
    if "chance_rank1" in table:
        rank1.axhline(float(table.chance_rank1.mean()), color="grey", linestyle=":", label="chance")
    for ax in (similarity, rank1, gain):
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _plot_panel(ax, stats: pd.DataFrame, column: str, ylabel: str) -> None:
    mean, sem = f"{column}_mean", f"{column}_sem"
    single = stats[stats.combiner == SINGLE]
    for k, combine in enumerate(c for c in stats.combiner.unique() if c != SINGLE):
        line = pd.concat([single, stats[stats.combiner == combine]]).sort_values("n_references")
        shift = 0.04 * (k - 1.5)                     # side by side, so the error bars stay readable
        ax.errorbar(line.n_references + shift, line[mean], yerr=line[sem], marker="o", capsize=3, label=combine)
    level, error = float(single[mean].iloc[0]), float(single[sem].fillna(0).iloc[0])
    ax.axhline(level, color="black", linestyle="--", linewidth=1, label="one reference")
    ax.axhspan(level - error, level + error, color="black", alpha=0.08)
    ax.set_xlabel("number of references N")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted(stats.n_references.unique()))
