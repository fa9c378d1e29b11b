"""The image projection: a perceiver ("Resampler") that turns an identity embedding into identity tokens.

InstantID feeds the 512-d face-recognition embedding of the reference face (not a CLIP image
embedding) through a small perceiver. A fixed set of learned queries (`latents`, 16 of them)
attends, layer after layer, to the projected embedding and to itself; the result is projected
to the UNet's cross-attention width::

    x       = proj_in(embeds)                                  # [B, N, dim]
    latents = latents + PerceiverAttention(x, latents)         # repeated `depth` times,
    latents = latents + FeedForward(latents)                   # each with its own weights
    tokens  = norm_out(proj_out(latents))                      # [B, num_queries, output_dim]

Module names equal the released checkpoint's `image_proj` keys, so loading is `load_state_dict`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .errors import CheckpointError, InputError


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of the Resampler. The defaults are those of the released SDXL checkpoint.

    :param dim: width of the latents (the perceiver's working width).
    :param depth: number of (attention, feed-forward) layers.
    :param dim_head: width of one attention head.
    :param heads: number of attention heads.
    :param num_queries: number of latents = number of identity tokens produced.
    :param embedding_dim: width of the input identity embedding (512 for ArcFace).
    :param output_dim: width of the identity tokens = the UNet's cross-attention dim.
    :param ff_mult: the feed-forward hidden width is `dim * ff_mult`.
    """

    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16
    embedding_dim: int = 512
    output_dim: int = 2048
    ff_mult: int = 4

    @classmethod
    def sdxl(cls) -> "ResamplerConfig":
        """The released InstantID adapter (SDXL 1.0)."""
        return cls()

    @classmethod
    def mini(cls, **over) -> "ResamplerConfig":
        """A Resampler small enough to train on a CPU, with the real 512-d input and 16 queries."""
        sizes = dict(dim=128, depth=2, dim_head=64, heads=2, num_queries=16, embedding_dim=512, output_dim=64)
        return cls(**{**sizes, **over})

    @classmethod
    def tiny(cls, **over) -> "ResamplerConfig":
        """Random-weight tests only."""
        sizes = dict(dim=32, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=16, output_dim=32)
        return cls(**{**sizes, **over})

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], dim_head: Optional[int] = None) -> "ResamplerConfig":
        """Read the sizes off an `image_proj` state dict.

        Every size but `dim_head` is visible in the weight shapes; only `heads * dim_head` is. The
        released checkpoints use 64 (as does the `mini` preset), so 64 is assumed whenever the
        attention width is a multiple of 64; otherwise 8 (the `tiny` preset). Pass `dim_head` to
        override.

        :param sd: the Resampler's state dict (the checkpoint's `image_proj` entry).
        :param dim_head: width of one head, if known.
        :raises CheckpointError: a key the sizes are read from is missing.
        """
        _require_keys(sd, ["latents", "proj_in.weight", "proj_out.weight",
                           "layers.0.0.to_q.weight", "layers.0.1.1.weight"])
        num_queries, dim = sd["latents"].shape[-2:]
        inner = sd["layers.0.0.to_q.weight"].shape[0]
        if dim_head is None:
            dim_head = 64 if inner % 64 == 0 else 8
        if inner % dim_head:
            raise CheckpointError(f"attention width {inner} is not a multiple of dim_head={dim_head}; pass dim_head=")
        depth = len({m.group(1) for k in sd for m in [re.match(r"layers\.(\d+)\.", k)] if m})
        return cls(
            dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head, num_queries=num_queries,
            embedding_dim=sd["proj_in.weight"].shape[1], output_dim=sd["proj_out.weight"].shape[0],
            ff_mult=sd["layers.0.1.1.weight"].shape[0] // dim,
        )


def _require_keys(sd: Mapping[str, Tensor], keys: list[str]) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(
            f"not a Resampler (image_proj) state dict: missing {missing}. "
            "Pass the checkpoint's 'image_proj' entry (see checkpoint.load_adapter_state)."
        )


class PerceiverAttention(nn.Module):
    """Latents attend to the concatenation of the input tokens and themselves.

    softmax((q s)(k s)^T) v with s = dim_head ** -0.25 on both q and k (= 1/sqrt(dim_head) overall,
    kept small before the product for fp16); the softmax runs in float32.
    """

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """
        :param x: input tokens, shape [B, N, dim]
        :param latents: shape [B, Q, dim]
        :return: the attention output for the latents, shape [B, Q, dim]
        """
        x, latents = self.norm1(x), self.norm2(latents)
        q = self._split_heads(self.to_q(latents))                     # [B, h, Q, d]
        kv_input = torch.cat([x, latents], dim=-2)                    # [B, N + Q, dim]
        k, v = (self._split_heads(t) for t in self.to_kv(kv_input).chunk(2, dim=-1))  # [B, h, N + Q, d]
        s = self.dim_head ** -0.25
        weight = (q * s) @ (k * s).transpose(-2, -1)                  # [B, h, Q, N + Q]
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = weight @ v                                              # [B, h, Q, d]
        b, h, nq, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, nq, h * d))  # [B, Q, h * d] -> [B, Q, dim]

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # [B, n, h*d] -> [B, h, n, d]


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear(dim, dim*mult) -> GELU -> Linear(dim*mult, dim), no biases (keys 0, 1, 3)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """Identity embedding(s) -> `num_queries` identity tokens of width `output_dim`.

    Build, then load: ``Resampler(ResamplerConfig.from_state_dict(sd)).load_state_dict(sd)``, or
    `Resampler.from_state_dict(sd)` which does both and explains a mismatch.
    """

    def __init__(self, config: Optional[ResamplerConfig] = None, **overrides):
        super().__init__()
        self.config = c = replace(config or ResamplerConfig(), **overrides)
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth)
        )

    @property
    def device(self) -> torch.device:
        """Where the weights live (diffusers asks every pipeline component for this)."""
        return self.latents.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (diffusers asks every pipeline component for this)."""
        return self.latents.dtype

    def forward(self, embeds: Tensor) -> Tensor:
        """
        :param embeds: identity embeddings, shape [B, D] (one per sample) or [B, N, D] (N tokens
            per sample, e.g. several references), D = `config.embedding_dim`
        :return: identity tokens, shape [B, num_queries, output_dim]
        """
        x = self._check_embeds(embeds)                                # [B, N, D]
        latents = self.latents.expand(x.shape[0], -1, -1)             # [B, Q, dim]
        x = self.proj_in(x)                                           # [B, N, dim]
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))                  # [B, Q, output_dim]

    def _check_embeds(self, embeds: Tensor) -> Tensor:
        if not isinstance(embeds, Tensor) or embeds.ndim not in (2, 3):
            got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds).__name__
            raise InputError(f"Resampler expects a tensor of shape [B, D] or [B, N, D], got {got}")
        if embeds.shape[-1] != self.config.embedding_dim:
            raise InputError(
                f"Resampler expects {self.config.embedding_dim}-d identity embeddings, got {embeds.shape[-1]}-d. "
                "Use the face model this adapter was trained with (InstantID: insightface antelopev2, 512-d)."
            )
        return embeds[:, None, :] if embeds.ndim == 2 else embeds   # [B, D] -> [B, 1, D]

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], dim_head: Optional[int] = None) -> "Resampler":
        """Build a Resampler sized for `sd` and load it.

        :param sd: the checkpoint's `image_proj` entry.
        :param dim_head: width of one head, if not the standard 64 (see `ResamplerConfig.from_state_dict`).
        :raises CheckpointError: `sd` is not a Resampler state dict (names the odd keys).
        """
        model = cls(ResamplerConfig.from_state_dict(sd, dim_head=dim_head))
        check_state_dict(model, sd, what="image_proj (Resampler)")
        model.load_state_dict(sd)
        return model

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    """Raise `CheckpointError` naming the missing, unexpected and mis-shaped keys of `sd` for `model`.

    :param model: the module `sd` should load into (may live on the meta device).
    :param sd: a state dict.
    :param what: how to call `sd` in the message.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in sd.items()}
    problems = describe_mismatch(expected, given)
    if problems:
        raise CheckpointError(f"{what} state dict does not fit the model: {problems}")


def describe_mismatch(expected: Mapping[str, tuple], given: Mapping[str, tuple], show: int = 6) -> str:
    """A one-paragraph list of missing / unexpected / mis-shaped keys ('' when they match).

    :param expected: key -> shape the model wants.
    :param given: key -> shape the state dict has.
    :param show: how many keys of each kind to name.
    """

    def names(keys: list[str]) -> str:
        more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
        return ", ".join(keys[:show]) + more

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shaped = [f"{k} {list(given[k])} (model: {list(expected[k])})"
              for k in expected if k in given and given[k] != expected[k]]
    parts = [f"{label} {len(keys)} key(s): {names(keys)}" for label, keys in
             [("missing", missing), ("unexpected", unexpected), ("wrong shape for", shaped)] if keys]
    return "; ".join(parts)
