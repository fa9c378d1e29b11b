"""Step time of the kit's `InstantIDPipeline` against diffusers' `StableDiffusionXLControlNetPipeline`.

Both pipelines share the same small SDXL-shaped weights: the same UNet object (so the same
identity attention processors), the same ControlNet, a scheduler of the same config, the same
steps, size and guidance. diffusers' pipeline gets the identity tokens through
`cross_attention_kwargs`, exactly as the kit passes them. Its ControlNet reads the text tokens
while IdentityNet reads the identity tokens, so the Resampler here makes as many identity
tokens as there are text tokens (77): both ControlNets do the same work.

A step's time is the time between two consecutive `callback_on_step_end` calls (ControlNet +
UNet + scheduler step). Runs are interleaved (kit, diffusers, diffusers, kit, ...) and the
median over all steps of all repeats is reported, with the ratio kit / diffusers (goal <= 1.10).

    python benchmarks/pipeline_step_time.py [--preset small|tiny] [--steps 5] [--repeats 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instantid_lab.adapter import Resampler, ResamplerConfig
from instantid_lab.keypoints import draw_kps
from instantid_lab.pipeline import BatchGeometry, InstantIDPipeline
from instantid_lab.tiny import TinyConfig, seeded, tiny_adapter_state, tiny_components

PRESETS = {
    "tiny": TinyConfig.sdxl(),
    "small": TinyConfig.sdxl(unet_channels=(32, 64, 128), transformer_layers=(1, 2, 2), heads=(2, 4, 8),
                             text_hidden=(32, 32), projection_dim=32, sample_size=32, vae_channels=(16, 16, 32, 32),
                             condition_channels=(16, 16, 32, 32)),
}
PROMPT = "a photo of an astronaut in space"
KPS = [[0.35, 0.40], [0.65, 0.40], [0.50, 0.55], [0.38, 0.72], [0.62, 0.72]]


def build(preset: str, device: str):
    """(kit pipeline, diffusers pipeline, keypoint image, embedding, identity tokens [2, 77, C]) on shared weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    config = PRESETS[preset]
    components = tiny_components(config, seed=0)
    state = tiny_adapter_state(components["unet"], seed=4, embedding_dim=16)
    with seeded(5):  # as many identity tokens as text tokens, so both ControlNets do the same work
        proj = Resampler(ResamplerConfig.tiny(num_queries=config.max_length, output_dim=config.cross_attention_dim))
    state["image_proj"] = proj.state_dict()
    kit = InstantIDPipeline(**components)
    kit.load_adapter(state)
    reference = StableDiffusionXLControlNetPipeline(
        **{k: v for k, v in components.items() if k != "scheduler"},
        scheduler=EulerDiscreteScheduler.from_config(components["scheduler"].config),
    )
    for pipe in (kit, reference):
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    size = config.image_size
    kps_image = draw_kps([[x * size, y * size] for x, y in KPS], (size, size))
    embedding = torch.randn(16, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        tokens = kit.encode_identity(embedding, BatchGeometry(1, 1, size, size, guided=True))  # [2, 77, C]: [neg, pos]
    return kit, reference, kps_image, embedding, tokens


def step_times(run) -> list[float]:
    """Seconds between consecutive step-end callbacks of one generation."""
    stamps = []

    def callback(pipe, step, t, tensors):
        _sync()
        stamps.append(time.perf_counter())
        return {}

    run(callback)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    kit, reference, kps_image, embedding, tokens = build(args.preset, args.device)
    common = dict(num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent")
    runs = {
        "kit": lambda cb: kit(PROMPT, embedding, kps_image, adapter_scale=0.8, identitynet_scale=0.8,
                              callback_on_step_end=cb, generator=torch.Generator().manual_seed(0), **common),
        "diffusers": lambda cb: reference(PROMPT, image=kps_image, controlnet_conditioning_scale=0.8,
                                          cross_attention_kwargs={"identity_tokens": tokens, "adapter_scale": 0.8},
                                          callback_on_step_end=cb, generator=torch.Generator().manual_seed(0), **common),
    }
    for run in runs.values():  # warm-up
        step_times(run)
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            times[name] += step_times(runs[name])
    medians = {name: statistics.median(t) for name, t in times.items()}
    size = PRESETS[args.preset].image_size
    print(f"preset {args.preset} ({size}x{size} px), {args.steps} steps x {args.repeats} repeats, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    for name, median in medians.items():
        print(f"  {name:10s} median step {median * 1000:8.2f} ms  (n={len(times[name])})")
    print(f"  ratio kit / diffusers = {medians['kit'] / medians['diffusers']:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
