"""A worker's training state as tensors plus JSON: what a checkpoint writes and what a healer sends.

The state is a tree of dicts and lists (model parameters, the inner optimizer's and scheduler's state dicts,
the strategy's global parameters and outer momentum, counters) whose leaves are tensors or JSON values.
:func:`flatten` splits it into ``{path: tensor}`` and a JSON skeleton; :func:`unflatten` puts it back. Dicts
with keys other than strings (an optimizer's per-parameter state) and tuples survive the trip.

:func:`pack` turns a flattened state into one safetensors blob (no pickle: a peer's bytes are never code)
and :func:`unpack` reads it back, checking its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import torch

from geotrain.comm.site_parallel import local
from geotrain.errors import ConfigError

__all__ = ["StateError", "flatten", "pack", "unflatten", "unpack"]


class StateError(ConfigError):
    """A state blob that does not parse or does not match its hash."""


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)``: every tensor of ``tree`` under a path key, and the rest as JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = path or "."
            tensors[key] = local(node).detach().to("cpu").contiguous().clone()  # a worker keeps its own shard
            return {"__tensor__": key}
        if isinstance(node, dict):
            if all(isinstance(k, str) for k in node) and "__tensor__" not in node and "__items__" not in node:
                return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"state at {path or '/'} holds a {type(node).__name__}, which a checkpoint cannot keep")

    return tensors, walk(tree, "")


def unflatten(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The tree :func:`flatten` split."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__items__" in node:
                return {k: walk(v) for k, v in node["__items__"]}
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def pack(tree: Any) -> bytes:
    """One safetensors blob of ``tree`` (its skeleton in the metadata)."""
    from safetensors.torch import save

    tensors, skeleton = flatten(tree)
    return save(tensors, metadata={"geotrain.state": json.dumps(skeleton)})


def digest(blob: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(blob).digest()


def unpack(blob: bytes, *, sha256: bytes | None = None) -> Any:
    """The tree in a blob from :func:`pack`; StateError if it is damaged or does not match ``sha256``."""
    from safetensors.torch import load

    if sha256 is not None and digest(blob) != sha256:
        raise StateError("the state received does not match its SHA-256 (damaged in transit)", field="heal")
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8: 8 + n])
        skeleton = json.loads(header["__metadata__"]["geotrain.state"])
        tensors = load(bytes(blob))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same bad input
        raise StateError(f"the state blob does not parse ({type(e).__name__}: {e})", field="heal") from None
    return unflatten(tensors, skeleton)
