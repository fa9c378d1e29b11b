"""Stage `instantid`: Resampler + decoupled attention + IdentityNet trained on the frozen base.

The paper's recipe at miniature size: the base is frozen and only the adapter and IdentityNet learn,
with the base's own objective (`objective.denoising_loss`) on renders whose identity embedding
(conditioning recogniser), keypoint image and caption are known. Captions are dropped to the empty
prompt and identities to the zero embedding (the pipeline's negative identity) for guidance.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from ...images import image_sheet
from ..base import load_base, tokenize, training_scheduler
from ..evaluate import HeldoutTask, Judges, evaluate_ablations, generate
from ..instantid import InstantIDConfig, InstantIDParts, load_miniature
from ..objective import IdentityTerm, Shard, denoising_loss, drop_conditions, drop_paths
from ..recognizer import load_recognizer
from .data import cached, identity_batch
from .loop import LoopSettings, is_main_process, train_loop, training_device
from .report import follower, loss_summary, unfinished, write_report

CONDITIONER, EVALUATOR = "recognizer_conditioner.safetensors", "recognizer_evaluator.safetensors"


def train_instantid(config: InstantIDConfig, out: Path, stop_after: Optional[int] = None, progress: bool = True,
                    base_dir: Optional[Path] = None, track: int = 0) -> dict:
    """Train the InstantID parts on the frozen base; save them in the released layout into `out`.

    :param base_dir: folder holding the frozen base (vae, text encoder, tokenizer, unet, scheduler) and the
        recognisers; default `out`. E.g. retrain on the shipped base: `base_dir=MINIATURE_DIR, out=<new folder>`.
    :param track: if > 0, at step 0 and at every checkpoint generate that many held-out identities and
        record the evaluator's rank-1 and identity similarity (the report's "evals": training curves).
    :return: the report, or `report.unfinished` when `stop_after` interrupted the run.
    """
    base_dir = Path(base_dir) if base_dir is not None else Path(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    base = load_base(base_dir).to(training_device())
    conditioner = load_recognizer(base_dir / CONDITIONER)
    cache = "instantid_data.pt" if config.other_reference == 0 else f"instantid_data_other{config.other_reference:g}.pt"
    data = cached(Path(out) / cache, lambda: identity_batch(base.vae, base.tokenizer, conditioner, config.train_images,
                                                            seed=4, other_reference=config.other_reference))
    parts = InstantIDParts.build(base.unet, config)
    pipe = parts.attach(base)
    on_checkpoint = identity_tracker(pipe, base_dir, track) if track else None
    settings = LoopSettings(config.steps, config.lr, config.warmup, ema_decay=config.ema_decay,
                            checkpoint_every=config.checkpoint_every)
    identity = identity_term(base.vae, conditioner, config.identity_loss)
    state = train_loop("instantid", parts, instantid_loss(pipe, data, config, identity), settings, out,
                       stop_after=stop_after, progress=progress, on_checkpoint=on_checkpoint)
    if not state.finished:
        return unfinished(state)
    if not is_main_process():
        return follower(state)
    parts.save(out)
    return write_report(out, "instantid", {
        "config": asdict(config), "steps": state.step, "train_seconds": round(state.seconds, 1),
        "loss": loss_summary(state.losses), "trainable_parameters": sum(p.numel() for p in parts.parameters()),
        "evals": state.evals, "losses": [round(x, 5) for x in state.losses],
        **evaluate_instantid(base_dir, config.eval_identities, instantid=out)})


def identity_term(vae, conditioner, weight: float) -> Optional[IdentityTerm]:
    """The objective's identity term on the frozen autoencoder and conditioning recogniser (None if `weight` is 0)."""
    if weight == 0:
        return None
    conditioner = conditioner.to(vae.device).eval().requires_grad_(False)
    return IdentityTerm(vae.eval().requires_grad_(False), conditioner, weight)


def instantid_loss(pipe, data, config: InstantIDConfig, identity: Optional[IdentityTerm] = None) -> Callable:
    """`loss_fn` for `train_loop`: `denoising_loss` of `pipe` on a random batch of `data` (a `TrainingBatch`),
    captions and identities dropped (`config.caption_dropout`, `config.identity_dropout`), one identity path
    off for some samples (`config.adapter_only`, `config.identitynet_only`), plus `identity` if given."""
    scheduler, empty = training_scheduler(), tokenize(pipe.tokenizer, [""])[0]

    def loss_fn(generator: torch.Generator, shard: Shard) -> torch.Tensor:
        index = torch.randint(len(data), (config.batch_size,), generator=generator)
        batch = drop_conditions(data.rows(index), empty, config.caption_dropout, config.identity_dropout, generator)
        batch = drop_paths(batch, config.adapter_only, config.identitynet_only, generator)
        return denoising_loss(pipe, batch, scheduler, generator, config.min_snr_gamma, shard, config.timestep_draws,
                              identity)

    return loss_fn


def identity_tracker(pipe, base_dir: Path, n_identities: int, steps: int = 10) -> Callable[[int], dict]:
    """`on_checkpoint` for `train_loop`: held-out rank-1 and identity similarity of `pipe` (DDIM `steps` steps)."""
    task = HeldoutTask.make(n_identities, seed=1)
    conditioner = load_recognizer(Path(base_dir) / CONDITIONER)
    judges = Judges(task, load_recognizer(Path(base_dir) / EVALUATOR))
    pipe.set_progress_bar_config(disable=True)

    def track(step: int) -> dict:
        scores = judges.score(generate(pipe, task, conditioner, 1.0, 1.0, steps=steps))
        return {k: round(scores[k], 4) for k in ("rank1", "identity_similarity")}

    return track


def evaluate_instantid(base_dir: Path, n_identities: int, instantid: Optional[Path] = None) -> dict:
    """Held-out identity scores (evaluating recogniser) with InstantID on and off; `instantid_samples.png`."""
    out = Path(instantid) if instantid is not None else Path(base_dir)
    evaluator_path = Path(base_dir) / EVALUATOR
    if n_identities == 0 or not evaluator_path.exists():
        return {}
    pipe = load_miniature(base_dir, instantid=out)
    pipe.set_progress_bar_config(disable=True)
    conditioner = load_recognizer(Path(base_dir) / CONDITIONER)
    result = evaluate_ablations(pipe, conditioner, load_recognizer(evaluator_path), None, n_identities,
                                ablations={"instantid": (1.0, 1.0), "base only": (0.0, 0.0)})
    image_sheet(result["images"]["instantid"][:32], columns=8, scale=2).save(out / "instantid_samples.png")
    return {"heldout_identity": {**result["rows"], "chance": result["chance"], "identities": result["identities"],
                                 "sampler": result["sampler"] + ", scales 1.0"}}
