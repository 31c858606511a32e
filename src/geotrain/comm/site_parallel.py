"""Data parallelism inside a site, with PyTorch's own tools.

A site's ``W`` workers train one replica of the model together over the site's fast fabric:

* **DistributedDataParallel** (the default): every worker holds the whole model, and gradients are averaged
  in buckets while backward is still running.
* **FSDP2** (``run.fsdp``): ``fully_shard`` spreads parameters, gradients and optimizer state over the
  workers, for models that do not fit one device. Each parameter is then a ``DTensor`` whose local part is
  this worker's shard, and that shard is also what the worker carries across sites: strategies, checkpoints
  and healing see local shards (:func:`local`), and only the exported model is gathered whole.

The site group is built for both devices (``cpu:gloo,cuda:nccl`` on GPUs, see :func:`site_backend`), so
the CPU-side sums of evaluation and checkpoints use gloo while GPU gradients use NCCL. Cross-site traffic
never uses this group.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ddp_buffer_options", "full_tensors", "is_sharded", "load_model_state", "local", "reshard",
           "reshard_optimizer_state", "site_backend", "wrap_model"]


def site_backend(device: str) -> str:
    """The site group's backend: gloo for CPU tensors, and NCCL for CUDA tensors where there are GPUs."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded tensors
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This worker's part of ``t``: the local shard of a sharded tensor (sharing its storage), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model (the entries of its ModuleLists), each sharded as one FSDP unit so only
    one block's full weights exist at a time."""
    return [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]


def wrap_model(model: nn.Module, *, site_pg: Any, workers: int, device: str, fsdp: bool) -> nn.Module:
    """The module to run forward on. With one worker the model itself; otherwise DDP over the site group, or,
    with ``fsdp``, the model sharded in place by FSDP2 (the returned module is ``model``)."""
    if workers == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(site_pg, device_type=device)
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=site_pg, **ddp_buffer_options())


def ddp_buffer_options() -> dict[str, bool]:
    """DDP options that skip broadcasting buffers before every forward (every worker computes its own, as one
    worker would): ``forward_sync_buffers=False`` where this torch has it, else ``broadcast_buffers=False``."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def reshard(model: nn.Module) -> None:
    """Free the whole parameters FSDP gathered for a forward pass with no backward (evaluation): the root module
    keeps its own after forward, and until resharded its parameters are not shards."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` where ``state`` holds local shards for the model's sharded entries (as
    checkpoints and healers keep them)."""
    like = model.state_dict()
    full = {}
    for k, v in state.items():
        target = like.get(k)
        if is_sharded(target):
            from torch.distributed.tensor import DTensor

            v = DTensor.from_local(v.to(target.device), target.device_mesh, target.placements, run_check=False,
                                   shape=target.shape, stride=target.stride())
        full[k] = v
    model.load_state_dict(full)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of local shards: make the state of sharded parameters sharded again,
    laid out like its parameter (the optimizer's step mixes them)."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not is_sharded(v) and v.shape == p.to_local().shape:
                    state[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                                  shape=p.shape, stride=p.stride())


def full_tensors(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Whole CPU copies of ``values``, where each value is laid out like the parameter beside it (a local shard
    of a sharded one). Gathering is a collective: every worker of the site calls this together."""
    out = []
    for p, v in zip(params, values, strict=True):
        if is_sharded(p):
            from torch.distributed.tensor import DTensor

            v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                   stride=p.stride()).full_tensor()
        out.append(v.detach().to("cpu").contiguous().clone())
    return out
