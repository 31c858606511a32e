"""geotrain: train one model across several datacenters over slow wide-area links.

The core import is light (no torch); the training API lives in ``geotrain.api``.
"""

__version__ = "0.1.0"
