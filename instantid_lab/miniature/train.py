"""Training entry points for the miniature, one per stage.

    python -m instantid_lab.miniature.train encoders --preset quick --out data/miniature
    python -m instantid_lab.miniature.train inspector --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train autoencoder --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train base --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train instantid --preset full --out /tmp/mini/full

Stages, in order: `encoders` (the conditioning and the evaluating face recogniser), `inspector` (reads
keypoints and caption attributes off a face, for the evaluation only), `autoencoder`
(images <-> latents), `base` (caption-conditioned latent diffusion, then frozen) and `instantid`
(Resampler + decoupled attention + IdentityNet on the frozen base). Each writes safetensors weights
plus a JSON record of how it was trained and what it measured.

The generative stages run through `train_loop`: a plain PyTorch loop that writes a checkpoint
(trainable weights, optimizer, EMA, step, sampling RNG) into `--out` every few hundred steps, so
re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import ModelFilesMissingError
from .autoencoder import AutoencoderConfig
from .base import BaseConfig
from .inspector import InspectorConfig
from .instantid import InstantIDConfig
from .recognizer import (
    FaceRecognizer, RecognizerConfig, config_dict, embed_images, images_to_tensor,
    render_training_set, train_recognizer, verification_scores,
)
from .world import HELDOUT_IDS, TRAIN_IDS, Caption, Pose, random_samples, render_id


@dataclass
class EncoderPreset:
    identities: int
    renders_per_identity: int
    steps: int
    batch_size: int
    heldout_identities: int = 48
    heldout_renders: int = 10

    @classmethod
    def named(cls, name: str) -> "EncoderPreset":
        presets = {"quick": cls(100, 10, 150, 64), "full": cls(1000, 20, 800, 128)}
        return presets[name]


def heldout_set(n_identities: int, renders: int, seed: int = 12345):
    """Renders of the first `n_identities` held-out identities: (images [N,3,32,32], labels [N])."""
    rng = np.random.default_rng(seed)
    ids = list(HELDOUT_IDS)[:n_identities]
    images = [render_id(i, Pose.sample(rng), Caption.sample(rng)).image for i in ids for _ in range(renders)]
    return images_to_tensor(images), torch.arange(n_identities).repeat_interleave(renders)


def train_encoders(preset: EncoderPreset, out: Path, progress: bool = True) -> dict:
    """Train the conditioning and the evaluating recogniser; save them to `out`; return their metrics."""
    out.mkdir(parents=True, exist_ok=True)
    images, labels = render_training_set(preset.identities, preset.renders_per_identity, seed=0)
    held_x, held_y = heldout_set(preset.heldout_identities, preset.heldout_renders)
    report = {}
    for role, config in (("conditioner", RecognizerConfig.conditioner()), ("evaluator", RecognizerConfig.evaluator())):
        start = time.perf_counter()
        model, losses = train_recognizer(config, images, labels, preset.steps, preset.batch_size, progress=progress)
        seconds = time.perf_counter() - start
        metrics = verification_scores(embed_images(model, held_x), held_y)
        save_file(model.state_dict(), str(out / f"recognizer_{role}.safetensors"),
                  metadata={"config": json.dumps(config_dict(config))})
        report[role] = {"config": config_dict(config), "train_seconds": round(seconds, 1),
                        "final_loss": float(np.mean(losses[-20:])), "heldout": metrics}
    report["preset"] = preset.__dict__
    (out / "recognizers.json").write_text(json.dumps(report, indent=2))
    return report


def train_inspector_stage(config, out: Path, progress: bool = True) -> dict:
    """Train the inspector (evaluation only), save `out/inspector.safetensors`, report it on held-out renders."""
    from .inspector import caption_accuracy, inspect, keypoint_error, save_inspector, train_inspector

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, losses = train_inspector(config, progress=progress)
    seconds = time.perf_counter() - start
    save_inspector(model, out / "inspector.safetensors")
    held = random_samples(HELDOUT_IDS, 512, seed=3)
    read = inspect(model, images_to_tensor([s.image for s in held]))
    requested = torch.from_numpy(np.stack([s.kps for s in held]))
    return _write_report(out, "inspector", {
        "config": config.__dict__, "train_seconds": round(seconds, 1), "loss": _loss_summary(losses),
        "heldout_renders": len(held), "heldout_keypoint_error_px": round(keypoint_error(read["kps"], requested), 3),
        "heldout_caption_accuracy": caption_accuracy(read, [s.caption for s in held])})


def load_recognizer(path: Path) -> FaceRecognizer:
    """A recogniser saved by `train_encoders` (config read from the file's metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    config["widths"] = tuple(config["widths"])
    model = FaceRecognizer(RecognizerConfig(**config))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ----------------------------------------------------------------------------- the resumable loop


@dataclass(frozen=True)
class LoopSettings:
    """How `train_loop` optimises: AdamW, linear warmup then cosine decay to `final_lr_fraction`."""

    steps: int
    lr: float
    warmup: int = 0
    weight_decay: float = 1e-2
    ema_decay: Optional[float] = None
    checkpoint_every: int = 200
    final_lr_fraction: float = 0.1


def learning_rate(step: int, s: LoopSettings) -> float:
    """lr(step) = lr * step / warmup during warmup, then a cosine from lr down to lr * final_lr_fraction."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.final_lr_fraction + (1 - s.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_update(ema: dict, model: nn.Module, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * theta, with d = min(decay, (1 + step) / (10 + step)) (fast start)."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].lerp_(p.detach(), 1 - d)


def checkpoint_path(out: Path, name: str) -> Path:
    return Path(out) / f"{name}_checkpoint.pt"


def train_loop(name: str, model: nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], s: LoopSettings,
               out: Path, seed: int = 0, stop_after: Optional[int] = None, progress: bool = True,
               on_checkpoint: Optional[Callable[[int], dict]] = None) -> dict:
    """Minimise `loss_fn(generator)` over `model`'s trainable parameters; resume from `out` if a checkpoint exists.

    :param loss_fn: draws its batch with the given generator (whose state is checkpointed, so a
        resumed run sees the same batches an uninterrupted one would) and returns a scalar loss.
    :param stop_after: stop (after checkpointing) once this many steps are done, as an interruption would.
    :param on_checkpoint: called with the step number at step 0 and at every checkpoint (model in eval
        mode); what it returns is kept, with the step, in "evals" (and in the checkpoint).
    :return: {"step", "losses", "seconds", "ema" (name -> tensor, or None), "evals", "finished"}
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    state = _fresh_state(model, s, seed)
    path = checkpoint_path(out, name)
    if path.exists():
        state = _resume(path, model, optimizer)
    end = s.steps if stop_after is None else min(s.steps, stop_after)
    if on_checkpoint is not None and state["step"] == 0:
        state["evals"].append({"step": 0, **_evaluate(model, on_checkpoint, 0)})
    model.train()
    start = time.perf_counter()
    for step in tqdm(range(state["step"], end), desc=name, initial=state["step"], total=s.steps, disable=not progress):
        loss = _step(model, optimizer, loss_fn, state["generator"], learning_rate(step, s))
        state["losses"].append(loss)
        if state["ema"] is not None:
            ema_update(state["ema"], model, s.ema_decay, step)
        state["step"] = step + 1
        if state["step"] % s.checkpoint_every == 0 or state["step"] == end:
            state["seconds"] += time.perf_counter() - start
            if on_checkpoint is not None:
                state["evals"].append({"step": state["step"], **_evaluate(model, on_checkpoint, state["step"])})
            start = time.perf_counter()
            _save_checkpoint(path, model, optimizer, state)
    model.eval()
    keep = ("step", "losses", "seconds", "ema", "evals")
    return {**{k: state[k] for k in keep}, "finished": state["step"] >= s.steps}


def _evaluate(model: nn.Module, on_checkpoint: Callable[[int], dict], step: int) -> dict:
    model.eval()
    try:
        return on_checkpoint(step)
    finally:
        model.train()


def _fresh_state(model: nn.Module, s: LoopSettings, seed: int) -> dict:
    ema = None
    if s.ema_decay is not None:
        ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"step": 0, "losses": [], "seconds": 0.0, "ema": ema, "evals": [],
            "generator": torch.Generator().manual_seed(seed)}


def _step(model, optimizer, loss_fn, generator, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_fn(generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return loss.item()


def _save_checkpoint(path: Path, model: nn.Module, optimizer, state: dict) -> None:
    """Write atomically (temporary file, then rename), so an interruption never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": state["ema"],
               "step": state["step"], "losses": state["losses"], "seconds": state["seconds"],
               "evals": json.dumps(state["evals"]), "generator": state["generator"].get_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _resume(path: Path, model: nn.Module, optimizer) -> dict:
    payload = torch.load(path, weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    generator = torch.Generator()
    generator.set_state(payload["generator"])
    return {"step": payload["step"], "losses": list(payload["losses"]), "seconds": payload["seconds"],
            "ema": payload["ema"], "evals": json.loads(payload.get("evals", "[]")), "generator": generator}


def _write_report(out: Path, name: str, report: dict) -> dict:
    (Path(out) / f"{name}.json").write_text(json.dumps(report, indent=2))
    return report


def _loss_summary(losses: list) -> dict:
    n = max(1, min(50, len(losses) // 5))
    return {"first": float(np.mean(losses[:n])), "last": float(np.mean(losses[-n:]))} if losses else {}


# ----------------------------------------------------------------------------- stage: autoencoder


def train_autoencoder(config: "AutoencoderConfig", out: Path, stop_after: Optional[int] = None,
                      progress: bool = True) -> dict:
    """Train the autoencoder, set its latent scaling factor, fine-tune its decoder, save it to `out/vae`.

    Two phases, each resumable: (1) encoder + decoder jointly (`config.steps`), after which the latent
    scale is fixed; (2) the decoder alone on the frozen encoder's posterior means (`config.decoder_steps`):
    the latents, hence everything trained on them, stay exactly as they are while reconstructions sharpen.
    """
    from .autoencoder import build_autoencoder, latent_std, psnr, reconstruction_loss

    images = render_images(TRAIN_IDS, config.train_images, seed=1)
    vae = build_autoencoder(config)

    def loss_fn(generator):
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        return reconstruction_loss(vae, images[index], config.kl_weight, generator)

    settings = LoopSettings(config.steps, config.lr, warmup=config.steps // 20, weight_decay=1e-4,
                            checkpoint_every=config.checkpoint_every)
    state = train_loop("autoencoder", vae, loss_fn, settings, out, stop_after=stop_after, progress=progress)
    if not state["finished"]:
        return state
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, images[:1024]))
    held = render_images(HELDOUT_IDS, 256, seed=2)
    joint_psnr = psnr(vae, held)
    decoder = finetune_decoder(vae, config, out, progress=progress)
    if not decoder["finished"]:
        return decoder
    vae.save_pretrained(str(Path(out) / "vae"), safe_serialization=True)
    return _write_report(out, "autoencoder", {
        "config": config.__dict__, "steps": state["step"], "train_seconds": round(state["seconds"], 1),
        "loss": _loss_summary(state["losses"]), "scaling_factor": vae.config.scaling_factor,
        "heldout_psnr_db_after_joint_training": round(joint_psnr, 2),
        "decoder_steps": decoder["step"], "decoder_train_seconds": round(decoder["seconds"], 1),
        "decoder_loss": _loss_summary(decoder["losses"]),
        "heldout_psnr_db": round(psnr(vae, held), 2), "train_psnr_db": round(psnr(vae, images[:256]), 2)})


def finetune_decoder(vae, config: "AutoencoderConfig", out: Path, progress: bool = True) -> dict:
    """Phase 2 of the autoencoder: L1 + MSE of decode(posterior mean) with the encoder frozen."""
    import torch.nn.functional as F

    images = render_images(TRAIN_IDS, config.decoder_train_images, seed=11)
    vae.requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)

    def loss_fn(generator):
        index = torch.randint(len(images), (config.decoder_batch_size,), generator=generator)
        recon = vae.decode(means[index]).sample
        return F.l1_loss(recon, images[index]) + F.mse_loss(recon, images[index])

    settings = LoopSettings(config.decoder_steps, config.decoder_lr, warmup=min(50, config.decoder_steps // 10),
                            weight_decay=1e-4, checkpoint_every=config.checkpoint_every)
    state = train_loop("autoencoder_decoder", vae, loss_fn, settings, out, progress=progress)
    vae.requires_grad_(False)
    return state


def render_images(identity_ids, n: int, seed: int) -> torch.Tensor:
    """`n` random renders (pose and caption random) as a tensor [n, 3, 32, 32] in [-1, 1]."""
    return images_to_tensor([s.image for s in random_samples(identity_ids, n, seed)])


# ----------------------------------------------------------------------------- stage: base


def train_base(config: "BaseConfig", out: Path, stop_after: Optional[int] = None, progress: bool = True) -> dict:
    """Train the text encoder + UNet jointly on the autoencoder's latents; save the EMA weights to `out`."""
    from .base import (base_loss, build_text_encoder, build_unet, caption_tokenizer, drop_captions, sampling_scheduler,
                       tokenize, training_scheduler)

    vae = load_vae(out)
    tokenizer = caption_tokenizer(config.max_length)
    data = _cached(Path(out) / "base_data.pt", lambda: render_latents(vae, tokenizer, config.train_images, seed=3))
    latents, ids = data["latents"], data["ids"]
    text_encoder, unet = build_text_encoder(config, tokenizer), build_unet(config)
    model = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    scheduler, empty = training_scheduler(), tokenize(tokenizer, [""])[0]

    def loss_fn(generator):
        index = torch.randint(len(latents), (config.batch_size,), generator=generator)
        batch_ids = drop_captions(ids[index], empty, config.caption_dropout, generator)
        return base_loss(unet, text_encoder, scheduler, latents[index], batch_ids, generator, config.min_snr_gamma)

    settings = LoopSettings(config.steps, config.lr, config.warmup, ema_decay=config.ema_decay,
                            checkpoint_every=config.checkpoint_every)
    state = train_loop("base", model, loss_fn, settings, out, stop_after=stop_after, progress=progress)
    if not state["finished"]:
        return state
    model.load_state_dict({**model.state_dict(), **state["ema"]})  # the EMA weights are what ships
    for name, part in (("unet", unet), ("text_encoder", text_encoder), ("tokenizer", tokenizer),
                       ("scheduler", sampling_scheduler())):
        safe = {"safe_serialization": True} if isinstance(part, nn.Module) else {}
        part.save_pretrained(str(Path(out) / name), **safe)
    return _write_report(out, "base", {
        "config": config.__dict__, "steps": state["step"], "train_seconds": round(state["seconds"], 1),
        "loss": _loss_summary(state["losses"]),
        **evaluate_base(unet, text_encoder, tokenizer, vae, out, config.eval_captions)})


def evaluate_base(unet, text_encoder, tokenizer, vae, out: Path, n: int = 48) -> dict:
    """Sample `n` random captions; report how often the background matches; save a PNG grid."""
    from .base import background_of, sample_base

    captions = [Caption.sample(np.random.default_rng([7, i])) for i in range(n)]
    images = sample_base(unet, text_encoder, tokenizer, vae, [c.text() for c in captions], seed=0)
    save_grid(images, Path(out) / "base_samples.png", columns=8)
    hits = [got == c.background for got, c in zip(background_of(images), captions)]
    return {"background_accuracy": float(np.mean(hits)), "evaluated_captions": n,
            "sampler": "DDIM 20 steps, guidance 3.0"}


def load_vae(out: Path):
    from diffusers import AutoencoderKL

    folder = Path(out) / "vae"
    if not folder.is_dir():
        raise ModelFilesMissingError(f"{folder} is missing: run the autoencoder stage first")
    return AutoencoderKL.from_pretrained(str(folder)).eval().requires_grad_(False)


def render_latents(vae, tokenizer, n: int, seed: int, identity_ids=TRAIN_IDS) -> dict:
    """Pre-render `n` random faces once: scaled latents, caption ids and the samples themselves."""
    from .autoencoder import encode
    from .base import tokenize

    samples = random_samples(identity_ids, n, seed)
    images = images_to_tensor([s.image for s in samples])
    return {"latents": encode(vae, images), "ids": tokenize(tokenizer, [s.caption.text() for s in samples]),
            "images": images, "kps": torch.from_numpy(np.stack([s.kps for s in samples]))}


def _cached(path: Path, build: Callable[[], dict]) -> dict:
    """`build()` once; later runs (resumes) read the saved tensors instead."""
    if path.exists():
        return torch.load(path, weights_only=True)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def save_grid(images: torch.Tensor, path: Path, columns: int = 8, scale: int = 2) -> None:
    """Images [B, 3, H, W] in [-1, 1] as one PNG grid (nearest-neighbour upscaled by `scale`)."""
    from PIL import Image

    b, _, h, w = images.shape
    rows = -(-b // columns)
    grid = torch.zeros(3, rows * h, columns * w)
    for k, im in enumerate(images):
        r, c = divmod(k, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    array = ((grid.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()  # [rows*H, cols*W, 3]
    Image.fromarray(array).resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------- stage: instantid


def train_instantid(config: "InstantIDConfig", out: Path, stop_after: Optional[int] = None,
                    progress: bool = True, base: Optional[Path] = None, track: int = 0) -> dict:
    """Train Resampler + decoupled attention + IdentityNet on the frozen base; save them in the released layout.

    :param base: folder holding the frozen base (vae, text encoder, tokenizer, unet, scheduler) and the
        recognisers; default `out`. E.g. retrain on the shipped base: `base=MINIATURE_DIR, out=<new folder>`.
    :param track: if > 0, at step 0 and at every checkpoint generate that many held-out identities and
        record the evaluator's rank-1 and identity similarity (the report's "evals": training curves).
    """
    from .instantid import InstantIDParts

    base = Path(base) if base is not None else Path(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    vae, tokenizer, text_encoder, unet = load_base(base)
    data = _cached(Path(out) / "instantid_data.pt", lambda: instantid_data(vae, tokenizer, base, config.train_images))
    parts = InstantIDParts.build(unet, config)
    loss_fn = instantid_objective(parts, unet, text_encoder, tokenizer, data, config)
    on_checkpoint = None
    if track:
        on_checkpoint = identity_tracker(parts.pipeline(vae, text_encoder, tokenizer, unet, base), base, track)
    settings = LoopSettings(config.steps, config.lr, config.warmup, checkpoint_every=config.checkpoint_every)
    state = train_loop("instantid", parts, loss_fn, settings, out, stop_after=stop_after, progress=progress,
                       on_checkpoint=on_checkpoint)
    if not state["finished"]:
        return state
    parts.save(out)
    return _write_report(out, "instantid", {
        "config": config.__dict__, "steps": state["step"], "train_seconds": round(state["seconds"], 1),
        "loss": _loss_summary(state["losses"]), "trainable_parameters": sum(p.numel() for p in parts.parameters()),
        "evals": state["evals"], "losses": [round(x, 5) for x in state["losses"]],
        **evaluate_instantid(base, config.eval_identities, instantid=out)})


def identity_tracker(pipe, base: Path, n_identities: int, steps: int = 10) -> Callable[[int], dict]:
    """`on_checkpoint` for `train_loop`: held-out rank-1 and identity similarity of `pipe` (DDIM `steps` steps)."""
    from .evaluate import HeldoutTask, Judges, generate

    task = HeldoutTask.make(n_identities, seed=1)
    conditioner = load_recognizer(Path(base) / "recognizer_conditioner.safetensors")
    judges = Judges(task, load_recognizer(Path(base) / "recognizer_evaluator.safetensors"))
    pipe.set_progress_bar_config(disable=True)

    def track(step: int) -> dict:
        scores = judges.score(generate(pipe, task, conditioner, 1.0, 1.0, steps=steps))
        return {k: round(scores[k], 4) for k in ("rank1", "identity_similarity")}

    return track


def evaluate_instantid(base: Path, n_identities: int, instantid: Optional[Path] = None) -> dict:
    """Held-out identity scores (evaluating recogniser) with InstantID on and off; a PNG grid of samples."""
    from .evaluate import evaluate_ablations
    from .instantid import load_miniature

    out = Path(instantid) if instantid is not None else Path(base)
    evaluator_path = Path(base) / "recognizer_evaluator.safetensors"
    if n_identities == 0 or not evaluator_path.exists():
        return {}
    pipe = load_miniature(base, instantid=out)
    pipe.set_progress_bar_config(disable=True)
    conditioner = load_recognizer(Path(base) / "recognizer_conditioner.safetensors")
    result = evaluate_ablations(pipe, conditioner, load_recognizer(evaluator_path), None, n_identities,
                                ablations={"instantid": (1.0, 1.0), "base only": (0.0, 0.0)})
    save_grid(images_to_tensor(result["images"]["instantid"][:32]), out / "instantid_samples.png", columns=8)
    return {"heldout_identity": {**result["rows"], "chance": result["chance"], "identities": result["identities"],
                                 "sampler": result["sampler"] + ", scales 1.0"}}


def instantid_objective(parts, unet, text_encoder, tokenizer, data: dict, config: "InstantIDConfig") -> Callable:
    """`loss_fn(generator)` for `train_loop`: the base's objective on a random batch of `data`, with
    captions dropped to the empty prompt and identities to the zero embedding (each `config.*_dropout`)."""
    from .base import diffusion_loss, drop_captions, tokenize, training_scheduler
    from .instantid import drop_identities, predict

    scheduler, empty = training_scheduler(), tokenize(tokenizer, [""])[0]

    def loss_fn(generator):
        index = torch.randint(len(data["latents"]), (config.batch_size,), generator=generator)
        with torch.no_grad():
            text = text_encoder(drop_captions(data["ids"][index], empty, config.caption_dropout, generator))
        embeds = drop_identities(data["embeds"][index], config.identity_dropout, generator)
        kps = data["kps_images"][index].float() / 255  # [B, 3, 32, 32] in [0, 1]
        return diffusion_loss(lambda x, t: predict(parts, unet, x, t, text.last_hidden_state, embeds, kps),
                              scheduler, data["latents"][index], generator, config.min_snr_gamma)

    return loss_fn


def load_base(out: Path) -> tuple:
    """(vae, tokenizer, text_encoder, unet) of a trained base, all frozen."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(out)
    if not (folder / "unet").is_dir():
        raise ModelFilesMissingError(f"{folder / 'unet'} is missing: run the base stage first")
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval().requires_grad_(False)
    return load_vae(out), CLIPTokenizer.from_pretrained(str(folder / "tokenizer")), text_encoder, unet


def instantid_data(vae, tokenizer, out: Path, n: int) -> dict:
    """Pre-rendered training data: latents, caption ids, conditioner embeddings, keypoint images (uint8)."""
    from .instantid import keypoint_tensor

    data = render_latents(vae, tokenizer, n, seed=4)
    conditioner = load_recognizer(Path(out) / "recognizer_conditioner.safetensors")
    data["embeds"] = embed_images(conditioner, data.pop("images"))
    data["kps_images"] = keypoint_tensor(data["kps"].numpy())
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["encoders", *STAGES])
    parser.add_argument("--preset", default="quick", choices=["quick", "full"])
    parser.add_argument("--out", type=Path, default=Path("data/miniature"))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    parser.add_argument("--base", type=Path, default=None,
                        help="instantid: folder of the frozen base and recognisers (default: --out)")
    parser.add_argument("--track", type=int, default=0,
                        help="instantid: score this many held-out identities at every checkpoint")
    args = parser.parse_args(argv)
    if args.stage == "encoders":
        report = train_encoders(EncoderPreset.named(args.preset), args.out)
        print(json.dumps({k: v["heldout"] for k, v in report.items() if k != "preset"}, indent=2))
        return
    config_cls, run = STAGES[args.stage]
    config = getattr(config_cls, args.preset)()
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    extra = {"base": args.base, "track": args.track} if args.stage == "instantid" else {}
    report = run(config, args.out, **extra)
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "losses", "ema", "evals")}, indent=2))


STAGES = {"inspector": (InspectorConfig, train_inspector_stage), "autoencoder": (AutoencoderConfig, train_autoencoder), "base": (BaseConfig, train_base),
          "instantid": (InstantIDConfig, train_instantid)}


if __name__ == "__main__":
    main()
