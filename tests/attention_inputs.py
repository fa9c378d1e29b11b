"""Random attention inputs shared by the attention tests: queries, text keys/values, identity keys/values."""

import torch
from diffusers.models.attention_processor import Attention

from instantid_lab.attention import IdentityAttnProcessor


def qkv(b=2, h=2, lq=6, lt=5, li=4, d=8, seed=0):
    """(q [b, h, lq, d], k and v [b, h, lt, d], k_id and v_id [b, h, li, d]), seeded."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(b, h, n, d, generator=g)  # noqa: E731
    return r(lq), r(lt), r(lt), r(li), r(li)


def identity_layer(queries: int, seed: int = 0):
    """A cross-attention layer (query width 16, text width 8) and an identity processor with random
    identity projections: (attn, proc, hidden states [1, queries, 16], text tokens [1, 5, 8])."""
    torch.manual_seed(seed)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8).eval()
    proc = IdentityAttnProcessor(16, 8)
    torch.nn.init.normal_(proc.to_k_ip.weight)
    torch.nn.init.normal_(proc.to_v_ip.weight)
    return attn, proc, torch.randn(1, queries, 16), torch.randn(1, 5, 8)
