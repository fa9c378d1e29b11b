"""Interactive panels for the notebooks (ipywidgets), each a plain class the tests drive without a browser.

- `IdentityExplorer` (`explorer`): pick a photo and a face; its keypoint image and nearest identities.
- `Playground` (`playground`): every knob of InstantID on one panel, live: reference identities, prompt,
  adapter scale, IdentityNet scale and window, a pose editor on the keypoints, seed; the result with
  the judges' readouts, a history strip, one-call sweeps, and an `AttentionExplorer` (`attention`).
  Its logic without widgets: `studio` (request -> pipeline call -> scored image), `sources`
  (references, targets and judges per world), `live` (the worker thread: newest request wins).

The playground's modules import torch and the miniature; they load on first use, so importing
`IdentityExplorer` stays cheap.
"""

from __future__ import annotations

import importlib

from .explorer import IdentityExplorer, Neighbour, Selection, identity_explorer

_LAZY = {
    "Playground": "playground", "AttentionExplorer": "attention", "Studio": "studio",
    "GenerationRequest": "studio", "PoseEdit": "studio", "Generation": "studio", "Readout": "studio",
    "Sweep": "studio", "MiniatureReferences": "sources", "PhotoReferences": "sources",
    "LatestOnly": "live", "Cancelled": "live",
}

__all__ = ["IdentityExplorer", "Neighbour", "Selection", "identity_explorer", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
