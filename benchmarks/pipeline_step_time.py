"""Step time of the kit's `InstantIDPipeline` against the PLAIN diffusers `StableDiffusionXLControlNetPipeline`.

The plain pipeline is what a user would otherwise run: diffusers' own attention processors, no identity
attention, its ControlNet reading the text (77 tokens). The kit runs its identity processors on the same
UNet weights and IdentityNet (the same ControlNet weights) reading the 16 identity tokens of a Resampler
with the released number of queries. Same prompt, seed, size, steps, guidance 5.

A step's time is the time between two consecutive `callback_on_step_end` calls (ControlNet + UNet +
scheduler step). Runs are interleaved (plain, kit, kit, plain, ...) and the median over all steps of all
repeats is reported, with the ratio kit / plain (goal on a CPU, "small" preset, 256 px: <= 1.02). One torch
thread by default: on a small shared machine a second thread mostly measures the neighbours.

    python benchmarks/pipeline_step_time.py [--preset small|tiny] [--steps 10] [--repeats 4] [--threads 1]
                                            [--identity-tokens 16] [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch

from common import build_pair, interleaved, median_ms, runners, write_json
from instantid_lab.adapter import ResamplerConfig
from instantid_lab.tiny import TinyConfig, tiny_components

PRESETS = {
    "tiny": TinyConfig.sdxl(),
    "small": TinyConfig.sdxl(unet_channels=(32, 64, 128), transformer_layers=(1, 2, 2), heads=(2, 4, 8),
                             text_hidden=(32, 32), projection_dim=32, sample_size=32, vae_channels=(16, 16, 32, 32),
                             condition_channels=(16, 16, 32, 32)),
}
GOAL = 1.02


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--identity-tokens", type=int, default=16, help="the Resampler's queries (released: 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = PRESETS[args.preset]
    resampler = ResamplerConfig.tiny(num_queries=args.identity_tokens, output_dim=config.cross_attention_dim)
    kit, plain = build_pair(tiny_components(config, seed=0), resampler, args.device)
    runs = runners(kit, plain, config.image_size, resampler.embedding_dim, num_inference_steps=args.steps,
                   guidance_scale=5.0, output_type="latent")
    times = interleaved(runs, args.repeats)
    medians = {name: median_ms(t) for name, t in times.items()}
    ratio = medians["kit"] / medians["plain"]
    size = config.image_size
    print(f"preset {args.preset} ({size}x{size} px), {args.identity_tokens} identity tokens, {args.steps} steps x "
          f"{args.repeats} repeats, device {args.device}, torch threads {torch.get_num_threads()}")
    for name, median in medians.items():
        print(f"  {name:6s} median step {median:8.2f} ms  (n={len(times[name])})")
    print(f"  ratio kit / plain = {ratio:.3f}  (goal <= {GOAL})")
    record = dict(benchmark="pipeline_step_time", date=datetime.date.today().isoformat(), machine=platform.node(),
                  device=args.device, threads=torch.get_num_threads(), preset=args.preset, size=size, steps=args.steps,
                  identity_tokens=args.identity_tokens,
                  repeats=args.repeats, median_step_ms=medians, ratio_kit_over_plain=ratio, goal=GOAL,
                  torch=torch.__version__)
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
