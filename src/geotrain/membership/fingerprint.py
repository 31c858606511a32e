"""What a site must share with the run to join it: the model's parameters and the settings that shape training.

A joining site sends its fingerprint; the coordinator compares it with the run's (the first site's) and refuses
a site that differs, naming the first difference, before it can average a pseudo-gradient of another shape or
of another configuration into the run. Nothing here imports torch: a fingerprint is built from names, shapes
and dtype names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SHARED_SETTINGS", "describe_difference", "fingerprint", "shared_settings"]

SHARED_SETTINGS = ("run.algorithm", "run.tokens", "run.seed", "run.sites", "run.workers_per_site", "run.fsdp",
                   "run.wall_seconds", "model", "data.batch_size", "optim", "outer", "streaming",
                   "sparseloco", "comm", "wan", "membership", "guard", "checkpoint", "run.site_speeds", "grid")
"""Setting paths every site must agree on (sections or single keys). A site's own output directory, data path,
device and logging may differ."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def shared_settings(config_tree: Mapping[str, Any]) -> dict[str, Any]:
    """The flat ``{dotted.key: value}`` of the settings in :data:`SHARED_SETTINGS`."""
    flat = _flatten(config_tree)
    return {k: v for k, v in sorted(flat.items())
            if any(k == p or k.startswith(p + ".") for p in SHARED_SETTINGS)}


def fingerprint(params: Iterable[tuple[str, Iterable[int], str]], config_tree: Mapping[str, Any]) -> dict[str, Any]:
    """``params``: (name, shape, dtype name) of every trained parameter, in order."""
    plist = [[name, [int(d) for d in shape], str(dtype)] for name, shape, dtype in params]
    digest = hashlib.sha256(json.dumps(plist, separators=(",", ":")).encode()).hexdigest()
    return {"params": plist, "params_sha256": digest, "settings": shared_settings(config_tree)}


def _shape(p: list) -> str:
    return f"{tuple(p[1])} {p[2]}"


def describe_difference(run: Mapping[str, Any] | None, site: Mapping[str, Any] | None) -> str | None:
    """None when ``site`` may join a run of fingerprint ``run``; otherwise the first difference, in words."""
    if run is None or site is None:
        return None if run is site else "one side sent no model fingerprint"
    if run.get("params_sha256") != site.get("params_sha256"):
        mine = {p[0]: p for p in run.get("params", [])}
        theirs = {p[0]: p for p in site.get("params", [])}
        for name, p in mine.items():
            if name not in theirs:
                return (f"its model has no parameter {name!r} (the run's model has {len(mine)} parameters, "
                        f"this site's {len(theirs)})")
            if p != theirs[name]:
                return f"parameter {name!r} is {_shape(theirs[name])} here and {_shape(p)} in the run"
        for name in theirs:
            if name not in mine:
                return f"its model has a parameter {name!r} that the run's model lacks"
        return "its model lists the same parameters in another order"
    a, b = run.get("settings", {}), site.get("settings", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"setting {key} is {b.get(key)!r} here and {a.get(key)!r} in the run"
    return None
