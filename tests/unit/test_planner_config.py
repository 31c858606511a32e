"""Plan files and flags: schema, unknown keys, overrides, shipped configs, and no torch on import."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.errors import ConfigError
from geotrain.planner.config import apply_flags, build, load_plan, load_raw

ROOT = Path(__file__).resolve().parents[2]

BASE = {"model": {"params": "70b", "tokens": "15t"}, "sites": {"accelerators": 1000}}


def flags(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_importing_the_planner_does_not_import_torch():
    code = (
        "import sys, geotrain.planner, geotrain.planner.cli, geotrain.planner.config, geotrain.planner.calibrate;"
        "bad = [m for m in ('torch', 'torch.distributed', 'matplotlib', 'rich') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("plan-*.toml")), ids=lambda p: p.name)
def test_every_shipped_plan_config_validates(path):
    cfg = load_plan(path)
    assert cfg.spec.sites


def test_defaults():
    cfg = build(BASE)
    spec = cfg.spec
    assert len(spec.sites) == 3
    assert spec.model.params == 70e9 and spec.model.tokens == 15e12 and spec.model.batch_tokens == 16e6
    assert spec.algorithm.name == "diloco" and spec.algorithm.sync_every == 100
    assert spec.codec.name == "fp32"
    assert all(s.accel.name == "H100" and s.mfu == 0.4 and s.pue == 1.2 for s in spec.sites)
    assert spec.topology.default.bandwidth_bps == 100e9  # the cross-country preset
    assert "cross-country" in cfg.link_text
    assert cfg.simulation is None and cfg.target_utilization is None


@pytest.mark.parametrize(
    ("raw", "field", "hint"),
    [
        ({**BASE, "algorithm": {"sync_evry": 5}}, "algorithm.sync_evry", "did you mean 'sync_every'"),
        ({**BASE, "modle": {}}, "modle", "did you mean 'model'"),
        ({"model": {"params": "70b", "tokens": "15t", "batchtokens": 1}}, "model.batchtokens", "'batch_tokens'"),
        ({**BASE, "site": [{"nam": "x", "accelerators": 1}]}, "site.nam", "'name'"),
        ({**BASE, "simulate": {"mtbf": 3}}, "simulate.mtbf", "'mtbf_hours'"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_name(raw, field, hint):
    with pytest.raises(ConfigError) as info:
        build(raw)
    assert info.value.field == field
    assert hint in str(info.value)


def test_missing_model_size_names_the_flag():
    with pytest.raises(ConfigError, match="--model-params"):
        build({"sites": {"accelerators": 1}})


def test_flags_override_the_file():
    raw = {
        **BASE,
        "site": [{"name": "a", "mfu": 0.3}, {"name": "b", "mfu": 0.5}],
        "link": {"link": "metro"},
        "links": [{"between": ["a", "b"], "link": "internet"}],
        "algorithm": {"name": "streaming", "fragments": 4, "overlap_steps": 1, "sync_every": 100},
    }
    cfg = build(raw)
    assert [s.mfu for s in cfg.spec.sites] == [0.3, 0.5]
    assert cfg.spec.topology.link(0, 1).bandwidth_bps == 1e9
    out = build(apply_flags(raw, flags(mfu="0.45", bandwidth="10gbit", algorithm="diloco", sync_every="500")))
    assert [s.mfu for s in out.spec.sites] == [0.45, 0.45]  # a flag sets every site
    assert out.spec.topology.overrides == {}  # a link flag replaces per-pair links
    link = out.spec.topology.link(0, 1)
    assert (link.bandwidth_bps, link.latency_s) == (10e9, 0.001)  # metro's latency stays
    assert out.spec.algorithm.name == "diloco" and out.spec.algorithm.sync_every == 500
    assert out.spec.algorithm.fragments == 1  # the file's streaming settings do not carry over
    assert raw["site"][0]["mfu"] == 0.3  # the file's dict is not modified


def test_numbers_with_suffixes():
    cfg = build(apply_flags({}, flags(model_params="7.5b", tokens="1.5t", batch_tokens="4m", seq_len="4k",
                                      accelerators_per_site="2k", sites="2")))
    spec = cfg.spec
    assert (spec.model.params, spec.model.tokens, spec.model.batch_tokens, spec.model.seq_len) == (
        7.5e9, 1.5e12, 4e6, 4000)
    assert [s.accelerators for s in spec.sites] == [2000, 2000]


def test_per_pair_links_and_custom_accelerators():
    raw = {
        "model": {"params": 1e9, "tokens": 1e11},
        "site": [{"name": "a", "accelerator": "mi300x", "accelerators": 8}, {"name": "b", "accelerators": 8},
                 {"name": "c", "accelerators": 8}],
        "accelerators": {"MI300X": {"peak_flops": 1.307e15, "watts": 750}, "H100": {"watts": 1275}},
        "link": {"bandwidth": "10gbit", "latency": "20ms"},
        "links": [{"between": ["a", 2], "bandwidth": "1gbit"}],
        "link_presets": {"metro": "800gbit/1ms"},
    }
    spec = build(raw).spec
    assert spec.sites[0].accel.peak_flops == 1.307e15
    assert spec.sites[1].watts_each == 1275  # preset overridden
    assert spec.topology.link(0, 2).bandwidth_bps == 1e9 and spec.topology.link(0, 2).latency_s == 0.02
    assert spec.topology.link(0, 1).bandwidth_bps == 10e9
    with pytest.raises(ConfigError, match="did you mean 'b'"):
        build({**raw, "links": [{"between": ["a", "bb"], "link": "metro"}]})
    with pytest.raises(ConfigError, match="peak_flops"):
        build({**raw, "accelerators": {"TPU": {"watts": 300}}})


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (dict(power_cap="-5"), "positive"),
        (dict(mfu="1.2"), "(0, 1]"),
        (dict(mfu="high"), "expected a number"),
        (dict(accelerator="H1000"), "did you mean 'H100'"),
        (dict(bandwidth="fast"), "cannot parse bandwidth"),
        (dict(bandwidth="10gbps"), "ambiguous"),
        (dict(link="transatlantic"), "unknown link"),
        (dict(latency="-3ms"), "negative"),
        (dict(codec="int3"), "unknown codec"),
        (dict(sites="0"), "from 1 to 1000"),
        (dict(target_utilization="95"), "(0, 1]"),
        (dict(plot="out.txt"), ".png"),
        (dict(simulate=True, recovery="hope"), "elastic"),
        (dict(sync_every="2.5"), "whole number"),
    ],
)
def test_bad_flags_raise_config_error(args, words):
    with pytest.raises(ConfigError) as info:
        build(apply_flags(BASE, flags(**args)))
    assert words in str(info.value)


def test_sites_count_must_match_site_tables():
    with pytest.raises(ConfigError, match=r"\[\[site\]\]"):
        build({**BASE, "sites": {"count": 3, "accelerators": 1}, "site": [{"name": "a"}]})


def test_simulation_settings_imply_simulate():
    cfg = build(apply_flags(BASE, flags(mtbf_hours="24", seed="3")))
    assert cfg.simulation is not None and cfg.simulation.seed == 3 and cfg.simulation.mtbf_hours == 24.0


def test_plot_without_sweep_gets_a_default_sweep():
    cfg = build({**BASE, "question": {"plot": "x.png"}})
    assert cfg.sweep_bps is not None and len(cfg.sweep_bps) == 41


def test_load_raw_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_raw(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nparams = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_raw(bad)
