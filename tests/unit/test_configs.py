"""Every shipped config validates, and the config loader keeps its promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from geotrain.config import load_config
from geotrain.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.toml") if not p.name.startswith("plan-"))
PLAN_CONFIGS = sorted(CONFIGS.glob("plan-*.toml"))


def test_there_are_shipped_configs():
    assert len(RUN_CONFIGS) >= 3 and PLAN_CONFIGS


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_config_validates(path):
    config = load_config(path)
    assert config.topology().sites == config.run.sites


@pytest.mark.parametrize("path", PLAN_CONFIGS, ids=lambda p: p.name)
def test_plan_config_validates(path):
    from geotrain.planner.cli import add_parser, run
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--config", str(path), "--json"])
    assert run(args) == 0


def test_demo_config_is_the_default():
    """configs/demo.toml writes the defaults out; keep the two in step."""
    shipped = load_config(CONFIGS / "demo.toml").to_dict()
    default = load_config(values={"run.out": "runs/demo"}).to_dict()
    assert shipped == default


def test_overrides_win_over_the_file_and_parse_types():
    c = load_config(CONFIGS / "demo.toml", overrides=["run.sites=3", "comm.codec=int8", "wan.link=10mbit/5ms",
                                                      "comm.overlap=true", "run.tokens=2M"])
    assert (c.run.sites, c.comm.codec, c.wan.link, c.comm.overlap, c.run.tokens) == (3, "int8", "10mbit/5ms", True, 2_000_000)


def test_link_override_outside_the_sites_is_refused():
    with pytest.raises(ConfigError, match="wan.links.between"):
        load_config(values={"run.sites": 2, "wan.links": [{"between": [0, 5], "link": "1mbit/1ms"}]})


def test_tau_must_be_below_h_for_streaming():
    with pytest.raises(ConfigError, match="streaming.overlap_steps"):
        load_config(values={"run.algorithm": "streaming", "outer.sync_every": 4, "streaming.overlap_steps": 4})


def test_comm_pattern_is_one_of_the_known_ones():
    assert load_config(values={"comm.codec": "int8", "comm.pattern": "all_gather"}).comm.pattern == "all_gather"
    with pytest.raises(ConfigError, match="comm.pattern") as e:
        load_config(values={"comm.pattern": "ring"})
    assert "reduce_scatter" in str(e.value)  # the message lists the choices
