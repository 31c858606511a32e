"""The network lab: sites in Linux network namespaces, joined by a router that applies the run's links for real
(``geotrain netlab``, ``geotrain run --network netlab``). See ``geotrain.netlab.lab``."""

from geotrain.netlab.lab import (DEFAULT_MTU, PREFIX, Lab, LabLink, clean_stale, enter_namespace, lab_links,
                                 require_root, stale_labs)

__all__ = ["DEFAULT_MTU", "Lab", "LabLink", "PREFIX", "clean_stale", "enter_namespace", "lab_links", "require_root",
           "stale_labs"]
