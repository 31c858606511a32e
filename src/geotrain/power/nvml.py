"""A GPU's power through NVML (``nvidia-ml-py``): read what the board draws and cap it to the site's setpoint.

On a run with ``run.device = "cuda"`` and ``[grid]``, each worker opens its GPU here. Every step it reads the
board's draw (``gpu_watts`` in the step records) and, when the controller's share of the power range changes,
sets the board's power limit to the same share of its allowed range: ``min + active x (max - min)``, the
constraints NVML reports. The hardware then slows itself, so the loop does not also hold the step back for
power (``train/pace.py``; a site's speed factor still applies). Setting a limit needs root (or the admin's
permission on the board); when NVML refuses, the run says so once and falls back to holding steps back, as on
CPUs. Without a GPU, without ``nvidia-ml-py``, or when NVML cannot start, :meth:`GpuPower.open` returns None and
nothing here runs. On exit the board's limit is set back to what it was.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GpuPower"]


class GpuPower:
    """One GPU's power: ``watts()`` read, ``apply(active)`` limited. ``nvml`` is the ``pynvml`` module (a
    stand-in in tests)."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        lo, hi = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)  # milliwatts
        self.min_mw, self.max_mw = int(lo), int(hi)
        self.original_mw = int(nvml.nvmlDeviceGetPowerManagementLimit(handle))
        self.limiting = True
        """False once NVML refused a limit: the loop holds steps back instead."""
        self.refusal: str | None = None
        self._set_mw: int | None = None

    @classmethod
    def open(cls, index: int, *, nvml: Any = None) -> GpuPower | None:
        """The GPU ``index`` (as CUDA numbers it), or None where NVML is not available."""
        try:
            if nvml is None:
                import pynvml as nvml  # the module nvidia-ml-py installs
            nvml.nvmlInit()
            return cls(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # noqa: BLE001 - no library, no driver, no such board: run without it
            return None

    def watts(self) -> float | None:
        """The board's draw now, W (None if NVML cannot say)."""
        try:
            return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except Exception:  # noqa: BLE001
            return None

    def limit_for(self, active: float) -> int:
        """The power limit, mW, that gives the board ``active`` of its allowed range."""
        a = min(1.0, max(0.0, float(active)))
        return int(round(self.min_mw + a * (self.max_mw - self.min_mw)))

    def apply(self, active: float) -> bool:
        """Limit the board to ``active`` of its range; False (and ``limiting`` off) when NVML refuses."""
        if not self.limiting:
            return False
        target = self.limit_for(active)
        if target == self._set_mw:
            return True
        try:
            self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, target)
        except Exception as e:  # noqa: BLE001 - not permitted (needs root) or not supported
            self.limiting, self.refusal = False, f"{type(e).__name__}: {e}"
            return False
        self._set_mw = target
        return True

    def close(self) -> None:
        """Give the board its limit back."""
        if self._set_mw is not None and self._set_mw != self.original_mw:
            try:
                self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, self.original_mw)
            except Exception:  # noqa: BLE001
                pass
        self._set_mw = None
