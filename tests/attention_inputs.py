"""Random attention inputs shared by the attention tests: queries, text keys/values, identity keys/values."""

import torch


def qkv(b=2, h=2, lq=6, lt=5, li=4, d=8, seed=0):
    """(q [b, h, lq, d], k and v [b, h, lt, d], k_id and v_id [b, h, li, d]), seeded."""
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randn(b, h, n, d, generator=g)  # noqa: E731
    return r(lq), r(lt), r(lt), r(li), r(li)
