"""Accelerators as the planner (and a site's power model) knows them: peak throughput and board power.

Every preset is a starting point, not a truth: a configuration can override any figure
(``[accelerators.H100] watts = 1275`` for an all-in per-GPU figure that includes host, NICs and fans) or add
new ones. The figures are vendor peaks; what a run achieves is ``peak * mfu``, and ``mfu`` is the user's input.
Pure Python.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from geotrain.errors import ConfigError

__all__ = ["ACCELERATORS", "Accelerator", "resolve_accelerator"]


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One accelerator type: its peak dense bf16 throughput and its board power."""

    name: str
    """Name as users write it (case-insensitive on input)."""
    peak_flops: float
    """Peak dense (no 2:4 sparsity) bf16 tensor throughput, FLOP/s."""
    watts: float
    """Board power (TDP) in watts; host, network and cooling come on top (cooling via PUE)."""
    source: str = ""
    """Where the figures come from."""


# Dense bf16 figures: NVIDIA's datasheets print the 2:4-sparse figure first, the dense one is half of it.
# Training does not use structured sparsity, so the dense figure is the honest peak for MFU.
ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): BF16 312 TFLOPS dense (624 sparse), max TDP 400 W.
    "A100": Accelerator(name="A100", peak_flops=312e12, watts=400.0, source="NVIDIA A100 datasheet, SXM"),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): BF16 1,979 TFLOPS with sparsity -> 989 dense; up to 700 W.
    "H100": Accelerator(name="H100", peak_flops=989e12, watts=700.0, source="NVIDIA H100 datasheet, SXM"),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): same Hopper tensor cores as H100 (1,979 sparse -> 989
    # dense); more and faster HBM, which the 6*N*T model does not see. Up to 700 W.
    "H200": Accelerator(name="H200", peak_flops=989e12, watts=700.0, source="NVIDIA H200 datasheet, SXM"),
    # NVIDIA HGX B200 datasheet, per GPU at the 1,000 W configuration: BF16 4.5 PFLOPS sparse -> 2.25 dense.
    "B200": Accelerator(name="B200", peak_flops=2.25e15, watts=1000.0, source="NVIDIA HGX B200 datasheet"),
}


def resolve_accelerator(name: str, table: dict[str, Accelerator] | None = None, *,
                        field: str = "sites.accelerator") -> Accelerator:
    """Look up ``name`` (case-insensitive) in ``table`` (the presets by default)."""
    table = ACCELERATORS if table is None else table
    by_lower = {k.lower(): v for k, v in table.items()}
    found = by_lower.get(str(name).strip().lower())
    if found is None:
        close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
        hint = f" (did you mean {by_lower[close[0]].name!r}?)" if close else ""
        raise ConfigError(
            f"unknown accelerator {name!r}{hint}; known: {', '.join(table)}. "
            "Define a new one as [accelerators.NAME] with peak_flops and watts.",
            field=field,
        )
    return found
