"""What a training stage writes next to its weights: a JSON report with a short loss summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


def write_report(out: Path, name: str, report: dict) -> dict:
    """Write `out/<name>.json` (the main process only, under `accelerate launch`) and return the report."""
    from .loop import is_main_process

    if is_main_process():
        (Path(out) / f"{name}.json").write_text(json.dumps(report, indent=2))
    return report


def follower(state) -> dict:
    """What a stage returns on a process other than the main one, which alone saves and scores."""
    return {"finished": state.finished, "step": state.step, "losses": state.losses, "main_process": False}


def loss_summary(losses: Sequence[float]) -> dict:
    """Mean of the first and of the last n losses, n = a fifth of the run (1 to 50): {"first", "last"}."""
    n = max(1, min(50, len(losses) // 5))
    return {"first": float(np.mean(losses[:n])), "last": float(np.mean(losses[-n:]))} if losses else {}


def unfinished(state) -> dict:
    """What a stage returns when its loop stopped early (`stop_after`): where it stands."""
    return {"finished": False, "step": state.step, "seconds": round(state.seconds, 1), "losses": state.losses}
