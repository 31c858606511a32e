"""Flattening parameters and gradients into one fp32 buffer: the layout of every cross-site payload.

Under FSDP (``run.fsdp``) each worker flattens its local shards (``geotrain.comm.site_parallel.local``), which
is the part of every payload it carries across sites.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from geotrain.comm.site_parallel import local

__all__ = ["flatten", "unflatten_into"]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (their local shards) into one new 1-D fp32 CPU buffer."""
    return torch.cat([local(t).detach().reshape(-1).to("cpu", torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (any device or dtype; local shards)."""
    offset = 0
    for t in tensors:
        t = local(t)
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    assert offset == flat.numel(), "flat buffer does not match the tensors"
