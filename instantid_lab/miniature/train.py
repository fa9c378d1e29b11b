"""Training the miniature from the command line, one stage at a time.

    python -m instantid_lab.miniature.train recognizers --preset quick --out data/miniature
    python -m instantid_lab.miniature.train inspector --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train autoencoder --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train base --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train instantid --preset full --out /tmp/mini/full
    python -m instantid_lab.miniature.train instantid --preset full --base-dir data/miniature --out DIR --track 16
    python -m instantid_lab.miniature.train instantid --preset full --set timestep_draws=3 --out DIR

Stages, in order: `recognizers` (the conditioning and the evaluating face recogniser; the old name
`encoders` still works), `inspector` (reads keypoints and caption attributes off a face, for the
evaluation only), `autoencoder` (images <-> latents), `base` (caption-conditioned latent diffusion,
then frozen) and `instantid` (Resampler + decoupled attention + IdentityNet on the frozen base). Each
writes safetensors weights plus a JSON report of how it was trained and what it measured. Re-running
the same command after an interruption continues from the stage's checkpoint in `--out`. `--set NAME=VALUE`
changes one field of the stage's config (e.g. `InstantIDConfig.timestep_draws`) for an experiment; the
report records the whole config.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from ..errors import InputError, LabError
from .autoencoder import AutoencoderConfig
from .base import BaseConfig
from .inspector import InspectorConfig
from .instantid import InstantIDConfig
from .training import (RecognizerPreset, train_autoencoder, train_base, train_inspector_stage, train_instantid,
                       train_recognizers)

#: stage -> (its config class with `quick()` / `full()` presets, the function that trains it)
STAGES = {"recognizers": (RecognizerPreset, train_recognizers), "inspector": (InspectorConfig, train_inspector_stage),
          "autoencoder": (AutoencoderConfig, train_autoencoder), "base": (BaseConfig, train_base),
          "instantid": (InstantIDConfig, train_instantid)}
#: old stage names that still work
ALIASES = {"encoders": "recognizers"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, *ALIASES])
    parser.add_argument("--preset", default="quick", choices=["quick", "full"])
    parser.add_argument("--out", type=Path, default=Path("data/miniature"))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    parser.add_argument("--base-dir", "--base", dest="base_dir", type=Path, default=None,
                        help="instantid: folder of the frozen base and recognisers (default: --out)")
    parser.add_argument("--track", type=int, default=0,
                        help="instantid: score this many held-out identities at every checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="change one field of the stage's config, e.g. --set timestep_draws=3 (repeatable)")
    return parser.parse_args(argv)


def apply_overrides(config, overrides: list[str]):
    """`config` with each "NAME=VALUE" applied; VALUE is a Python literal of the field's type (1e-3, 3, None, (16, 32)).

    :raises InputError: an unknown field, a malformed item or a value of the wrong type (the message says which).
    """
    known = {f.name: f for f in fields(config)}
    changes = {}
    for item in overrides:
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in known:
            raise InputError(f"--set {item!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise InputError(f"--set {item!r}: {text!r} is not a Python literal "
                             "(e.g. 3, 1e-3, None, (16, 32))") from None
        changes[name] = _as_field_type(known[name], getattr(config, name), value, item)
    return replace(config, **changes)


def _as_field_type(field, preset, value, item: str):
    """`value` checked against the field (type of its preset value; ints widen to floats, lists become tuples)."""
    optional = "Optional" in str(field.type) or preset is None
    if value is None and optional:
        return None
    if isinstance(preset, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(preset, tuple) and isinstance(value, (tuple, list)):
        return tuple(value)
    if preset is not None and type(value) is type(preset):  # exact: True is not an int here
        return value
    wanted = type(preset).__name__ + (" or None" if optional else "")
    raise InputError(f"--set {item!r}: {field.name} takes {wanted} (preset value {preset!r}), got {value!r}")


def main(argv=None) -> None:
    args = parse_args(argv)
    config_cls, run = STAGES[ALIASES.get(args.stage, args.stage)]
    config = getattr(config_cls, args.preset)()
    if args.steps is not None:
        if args.steps < 1:
            sys.exit(f"error: --steps must be a positive number of training steps, got {args.steps}")
        config = replace(config, steps=args.steps)
    extra = {"base_dir": args.base_dir, "track": args.track} if run is train_instantid else {}
    try:
        report = run(apply_overrides(config, args.overrides), args.out, **extra)
    except LabError as error:  # a bad --set, missing weights, a corrupt checkpoint, ...: the message says what to do
        sys.exit(f"error: {error}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "losses", "evals")}, indent=2))


if __name__ == "__main__":
    main()
