"""Looking at attention: the text and identity probabilities of the cross-attention layers, recorded
while a block of code runs (`capture_attention`), and turned into per-token maps over the image."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from .equation import token_grid
from .install import has_prefix, identity_processors


@dataclass
class AttentionMaps:
    """Attention probabilities recorded by `capture_attention`, mean over heads, on the CPU.

    `text[layer]` and `identity[layer]` hold one tensor per UNet call: [B, Lq, Lt] and [B, Lq, Li].
    Each row sums to 1 (the two softmaxes are separate).
    """

    text: dict[str, list[Tensor]] = field(default_factory=dict)
    identity: dict[str, list[Tensor]] = field(default_factory=dict)

    def record(self, layer: str, text_probs: Tensor, identity_probs: Optional[Tensor] = None) -> None:
        """:param text_probs: shape [B, h, Lq, Lt]; :param identity_probs: shape [B, h, Lq, Li] or None."""
        self.text.setdefault(layer, []).append(text_probs.mean(1).detach().float().cpu())
        if identity_probs is not None:
            self.identity.setdefault(layer, []).append(identity_probs.mean(1).detach().float().cpu())

    @property
    def layers(self) -> list[str]:
        return list(self.text)

    def token_maps(self, size: tuple[int, int], kind: str = "identity",
                   layers: Optional[Sequence[str]] = None) -> Tensor:
        """Where each token is looked at: per-token spatial maps, averaged over layers and calls.

        :param size: (H, W) of the output maps (the image or latent size; fixes each layer's grid).
        :param kind: "identity" or "text".
        :param layers: name prefixes to include (default: all recorded layers).
        :return: shape [B, N, H, W] (N = number of identity or text tokens)
        """
        store = {"identity": self.identity, "text": self.text}[kind]
        chosen = [n for n in store if layers is None or any(has_prefix(n, p) for p in layers)]
        if not chosen:
            raise InputError(f"no {kind} attention recorded for layers {layers}: run the UNet inside capture_attention")
        maps = [_to_image(p, size) for n in chosen for p in store[n]]
        return torch.stack(maps).mean(0)

    def clear(self) -> None:
        self.text.clear()
        self.identity.clear()


def _to_image(probs: Tensor, size: tuple[int, int]) -> Tensor:
    b, lq, n = probs.shape
    rows, cols = token_grid(lq, *size)
    grid = probs.transpose(1, 2).reshape(b, n, rows, cols)            # [B, Lq, N] -> [B, N, rows, cols]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)  # [B, N, H, W]


@contextmanager
def capture_attention(unet: nn.Module, layers: Optional[Sequence[str]] = None) -> Iterator[AttentionMaps]:
    """Record text and identity attention of the cross-attention layers while the block runs.

    The UNet's output is unchanged; the probabilities are computed a second time, explicitly, only
    while capturing. On exit every processor is as before (nothing stays attached). At SDXL size a
    map is large (4096 x 77 per layer per call): pass `layers` prefixes to record fewer.

    :param unet: a UNet with the adapter installed.
    :param layers: name prefixes of the layers to record (default: all cross-attention layers).
    """
    procs = {n: p for n, p in identity_processors(unet).items()
             if layers is None or any(has_prefix(n, pre) for pre in layers)}
    if not procs:
        raise InputError("nothing to capture: install_adapter(unet) first, and check the `layers` prefixes")
    maps = AttentionMaps()
    before = {n: p.recorder for n, p in procs.items()}
    for name, proc in procs.items():
        proc.recorder = partial(maps.record, name)
    try:
        yield maps
    finally:
        for name, proc in procs.items():
            proc.recorder = before[name]
