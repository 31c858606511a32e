"""Flattening parameters and gradients into one fp32 buffer, and averaging inside a site."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["flatten", "unflatten_into", "average_in_site"]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one new 1-D fp32 CPU buffer (the cross-site payload layout)."""
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (any device or dtype)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    assert offset == flat.numel(), "flat buffer does not match the tensors"


def average_in_site(grads: Sequence[torch.Tensor], site_pg: Any, workers: int) -> None:
    """Mean of gradients over the site's workers, in place (the fast fabric; never emulated)."""
    if workers == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    site_pg.allreduce([flat]).wait()
    flat.div_(workers)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
