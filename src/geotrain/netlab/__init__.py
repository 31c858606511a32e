"""The network lab: sites in Linux network namespaces, joined by a router that applies the run's links for real
(``geotrain netlab``, ``geotrain run --network netlab``). See ``geotrain.netlab.lab``."""

from geotrain.netlab.lab import (DEFAULT_MTU, PREFIX, ROUTER_MEASURED_BPS, Lab, LabLink, LabTcp, clean_stale,
                                 config_lab_links, enter_namespace, lab_links, require_root, router_warning,
                                 stale_labs)

__all__ = ["DEFAULT_MTU", "Lab", "LabLink", "LabTcp", "PREFIX", "ROUTER_MEASURED_BPS", "clean_stale",
           "config_lab_links", "enter_namespace", "lab_links", "require_root", "router_warning", "stale_labs"]
