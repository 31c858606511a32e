"""Training methods: one definition per algorithm, registered by name.

A definition (``base.Algorithm``, torch-free) holds an algorithm's settings, how it is built for a run and
its communication per sync period; training, validation, the summary and the planner all read it. The
training code of each is a strategy of the one training loop (``strategies/``). Adding an algorithm is one
module (a definition and its strategy) plus one ``register_algorithm`` line.
"""

from __future__ import annotations

from geotrain.algorithms.base import Algorithm, AutoSetting, ModelLayout, SyncPattern
from geotrain.algorithms.ddp import DDP
from geotrain.algorithms.diloco import DiLoCo
from geotrain.algorithms.sparseloco import SparseLoCo
from geotrain.algorithms.streaming import StreamingDiLoCo
from geotrain.errors import ConfigError
from geotrain.registry import Registry

__all__ = [
    "Algorithm",
    "AutoSetting",
    "ModelLayout",
    "SyncPattern",
    "algorithm_names",
    "get_algorithm",
    "register_algorithm",
]

_REGISTRY: Registry[Algorithm] = Registry("algorithm")


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Make ``algorithm`` known to runs, validation and the planner by its name (replacing one of that name)."""
    return _REGISTRY.register(algorithm.name, algorithm)


register_algorithm(DDP())
register_algorithm(DiLoCo())
register_algorithm(StreamingDiLoCo())
register_algorithm(SparseLoCo())


def algorithm_names() -> list[str]:
    """Names of the registered algorithms, in registration order."""
    return _REGISTRY.names()


def get_algorithm(name: object, *, field: str = "run.algorithm") -> Algorithm:
    """The algorithm registered as ``name``, or a ConfigError naming the choices."""
    found = _REGISTRY.find(str(name))
    if found is None:
        raise ConfigError(_REGISTRY.unknown(name), field=field)
    return found
