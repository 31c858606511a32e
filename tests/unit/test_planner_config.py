"""The plan's inputs: run and plan files in one vocabulary, flags and ``--set`` over them, the former plan
vocabulary refused with the new names, shipped configs, and no torch on import."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from geotrain.config import config_from_tree, read_toml
from geotrain.errors import ConfigError
from geotrain.planner.config import FLAG_KEYS, load_plan, plan_inputs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
PLAN_CONFIGS = [p for p in CONFIGS if p.name.startswith("plan-")]


def flags(**kw) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def write(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_importing_and_running_the_planner_does_not_import_torch():
    code = (
        "import sys, argparse\n"
        "import geotrain.planner, geotrain.planner.cli, geotrain.planner.config, geotrain.planner.report\n"
        "import geotrain.config, geotrain.summary, geotrain.hardware, geotrain.topology\n"
        "import geotrain.algorithms.timing, geotrain.comm.pattern, geotrain.comm.codecs.registry\n"
        "bad = [m for m in ('torch', 'torch.distributed', 'matplotlib', 'rich') if m in sys.modules]\n"
        "assert not bad, ('on import', bad)\n"
        "from geotrain.planner.cli import plan_output\n"
        "from geotrain.planner.config import plan_inputs\n"
        f"plan_output(plan_inputs({str(ROOT / 'configs' / 'plan-heterogeneous.toml')!r}, argparse.Namespace()))\n"
        f"plan_output(plan_inputs({str(ROOT / 'configs' / 'streaming-int4.toml')!r}, argparse.Namespace()))\n"
        f"plan_output(plan_inputs({str(ROOT / 'configs' / 'grid-outage.toml')!r}, argparse.Namespace()))\n"
        "bad = [m for m in ('torch', 'torch.distributed', 'matplotlib', 'rich') if m in sys.modules]\n"
        "assert not bad, ('after planning', bad)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("path", PLAN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_plan_config_validates(path):
    inputs = load_plan(path)
    assert inputs.spec.sites and inputs.config.model.params is not None


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in PLAN_CONFIGS], ids=lambda p: p.name)
def test_every_shipped_run_config_plans_at_its_own_scale(path):
    inputs = plan_inputs(path)
    config = inputs.config
    assert config.model.params is None  # the demo GPT's size, from its shape
    assert inputs.spec.model.params == sum(n for _, n in config.model.layout())
    # the run's own batch: batch_size sequences of seq_len per worker, every site
    assert inputs.spec.model.batch_tokens == (config.data.batch_size * config.model.seq_len * config.run.sites
                                              * config.run.workers_per_site)
    assert len(inputs.spec.sites) == config.run.sites


def test_the_shipped_plan_configs_say_what_their_comments_say():
    three = load_plan(ROOT / "configs" / "plan-three-datacenters.toml").spec
    assert [s.name for s in three.sites] == ["east", "central", "west"]
    assert [s.accelerators for s in three.sites] == [357142] * 3  # 300 MW / (700 W * 1.2), no count given
    assert (three.model.params, three.model.tokens, three.model.batch_tokens) == (70 * 10**9, 15 * 10**12, 16 * 10**6)
    assert three.topology.link(0, 2).bandwidth_bps == 10e9 and three.topology.link(0, 2).latency_s == 0.03
    hetero = load_plan(ROOT / "configs" / "plan-heterogeneous.toml")
    spec = hetero.spec
    assert [s.accelerator.name for s in spec.sites] == ["B200", "MI300X", "H100"]
    assert spec.sites[1].peak_flops == 1.307e15 and spec.sites[1].watts == 750
    assert spec.sites[2].watts == 1275 and spec.sites[2].pue == 1.3
    assert spec.topology.link(0, 1).bandwidth_bps == 400e9  # the metro pair
    assert spec.topology.link(1, 2).bandwidth_bps == 100e9  # cross-country
    assert hetero.simulation is not None and hetero.simulation.mtbf_hours == [12, 6, 24]


def test_defaults_are_the_runs_defaults():
    inputs = plan_inputs(None, flags())
    spec, config = inputs.spec, inputs.config
    assert len(spec.sites) == 4
    # The demo GPT (445,952 params), 1.6M tokens, a batch of 16 sequences of 128 bytes at each of 4 sites.
    assert (spec.model.params, spec.model.tokens, spec.model.batch_tokens) == (445_952, 1_600_000, 8192)
    assert spec.algorithm.name == "diloco" and config.outer.sync_every == 50 and config.comm.overlap is None
    assert (config.streaming.fragments, config.streaming.overlap_steps) == (4, None)
    assert spec.codec.name == "fp32"
    assert all(s.accelerator.name == "H100" and s.mfu == 0.4 and s.pue == 1.2 for s in spec.sites)
    assert [s.accelerators for s in spec.sites] == [1] * 4  # one per worker
    link = spec.topology.default
    assert (link.bandwidth_bps, link.latency_s) == (2e6, 0.05)
    assert inputs.link_text == "2mbit/50ms"
    assert inputs.simulation is None and inputs.target_utilization is None and inputs.sweep_bps is None


@pytest.mark.parametrize(
    ("tree", "field", "hint"),
    [
        ({"outer": {"sync_evry": 5}}, "outer.sync_evry", "did you mean 'outer.sync_every'"),
        ({"modle": {}}, "modle", "did you mean 'model'"),
        ({"site": [{"nam": "x"}]}, "site[0].nam", "did you mean 'site[0].name'"),
        ({"simulate": {"mtbf": 3}}, "simulate.mtbf", "mtbf_hours"),
        ({"plan": {"target": 0.9}}, "plan.target", "target_utilization"),
    ],
)
def test_unknown_keys_are_refused_with_the_closest_name(tree, field, hint):
    with pytest.raises(ConfigError) as info:
        config_from_tree(tree)
    assert info.value.field == field
    assert hint in str(info.value)


@pytest.mark.parametrize(
    ("tree", "field", "new"),
    [
        ({"algorithm": {"sync_every": 5}}, "algorithm", "[outer] sync_every"),
        ({"model": {"tokens": "15t"}}, "model.tokens", "run.tokens"),
        ({"model": {"batch_tokens": "16m"}}, "model.batch_tokens", "plan.batch_tokens"),
        ({"sites": {"count": 3}}, "sites.count", "run.sites"),
        ({"link": {"link": "metro"}}, "link", "[wan] link"),
        ({"links": [{"between": [0, 1], "link": "metro"}]}, "links", "[[wan.links]]"),
        ({"link_presets": {"metro": "1gbit/1ms"}}, "link_presets", "[wan.presets]"),
        ({"question": {"compare": True}}, "question", "[plan]"),
    ],
)
def test_the_former_plan_vocabulary_is_refused_with_the_new_name(tree, field, new):
    with pytest.raises(ConfigError) as info:
        config_from_tree(tree)
    assert info.value.field == field
    assert new in str(info.value) and "former vocabulary" in str(info.value)


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, """
        [run]
        algorithm = "streaming"
        [outer]
        sync_every = 100
        [streaming]
        fragments = 4
        overlap_steps = 1
        [[site]]
        name = "a"
        mfu = 0.3
        [[site]]
        name = "b"
        mfu = 0.5
        [wan]
        link = "metro"
        [[wan.links]]
        between = ["a", "b"]
        link = "internet"
    """)
    before = path.read_text()
    spec = plan_inputs(path).spec
    assert [s.mfu for s in spec.sites] == [0.3, 0.5]
    assert spec.topology.link(0, 1).bandwidth_bps == 1e9  # the internet preset, per pair
    out = plan_inputs(path, flags(mfu="0.45", bandwidth="10gbit", algorithm="diloco", sync_every="500")).spec
    assert [s.mfu for s in out.sites] == [0.45, 0.45]  # a site flag sets every site
    assert out.topology.overrides == {}  # a link flag replaces per-pair links
    link = out.topology.link(0, 1)
    assert (link.bandwidth_bps, link.latency_s) == (10e9, 0.001)  # metro's latency stays
    assert out.algorithm.name == "diloco" and out.config.outer.sync_every == 500
    assert path.read_text() == before  # the file is not modified


def test_an_algorithm_flag_drops_the_files_overlap_where_the_method_has_none(tmp_path):
    path = write(tmp_path, """
        [model]
        params = "1b"
        [comm]
        overlap = true
    """)
    assert plan_inputs(path).config.comm.overlap is True
    for algorithm in ("ddp", "streaming"):  # both refuse comm.overlap
        config = plan_inputs(path, flags(algorithm=algorithm)).config
        assert config.run.algorithm == algorithm and config.comm.overlap is None
    # An explicit --overlap with a method that has none is still refused, naming the key.
    with pytest.raises(ConfigError) as info:
        plan_inputs(path, flags(algorithm="ddp", overlap=True))
    assert info.value.field == "comm.overlap"


def test_numbers_with_suffixes():
    spec = plan_inputs(None, flags(model_params="7.5b", tokens="1.5t", batch_tokens="4m", seq_len="4k",
                                   accelerators_per_site="2k", sites="2")).spec
    assert (spec.model.params, spec.model.tokens, spec.model.batch_tokens, spec.model.seq_len) == (
        7_500_000_000, 1_500_000_000_000, 4_000_000, 4000)
    assert [s.accelerators for s in spec.sites] == [2000, 2000]


def test_every_flag_sets_its_key():
    args = flags(model_params="1b", tokens="1t", batch_tokens="1m", seq_len="2048", sites="3",
                 workers_per_site="2", algorithm="streaming", sync_every="40", fragments="2", overlap_steps="3",
                 codec="topk+int8", topk_fraction="0.05", target_utilization="0.9", sweep="1gbit,10gbit",
                 plot="x.png", mtbf_hours="24", sim_seed="5", recovery="restart", jitter="0.1",
                 silent_fraction="0.5")
    config = plan_inputs(None, args).config
    expected = {"model.params": 10**9, "run.tokens": 10**12, "plan.batch_tokens": 10**6, "model.seq_len": 2048,
                "run.sites": 3, "run.workers_per_site": 2, "run.algorithm": "streaming", "outer.sync_every": 40,
                "streaming.fragments": 2, "streaming.overlap_steps": 3, "comm.codec": "topk+int8",
                "comm.topk_fraction": 0.05, "plan.target_utilization": 0.9, "plan.sweep": "1gbit,10gbit",
                "plan.plot": "x.png", "simulate.mtbf_hours": 24.0, "simulate.seed": 5,
                "simulate.recovery": "restart", "simulate.jitter": 0.1,
                "simulate.silent_fraction": 0.5}
    assert set(expected) == set(FLAG_KEYS.values()) - {"comm.overlap"}
    tree = config.to_dict()
    for key, value in expected.items():
        section, name = key.split(".")
        assert tree[section][name] == value, key


def test_site_flags_and_step_seconds():
    inputs = plan_inputs(None, flags(accelerator="b200", accelerators_per_site="8", mfu="0.5", power_cap="1",
                                     pue="1.1", watts="900", step_seconds="0.25", sites="2"))
    for s in inputs.spec.sites:
        assert (s.accelerator.name, s.accelerators, s.mfu, s.power_cap_mw, s.pue, s.watts, s.step_seconds) == (
            "B200", 8, 0.5, 1.0, 1.1, 900.0, 0.25)


def test_set_overrides_the_file_and_flags_override_set(tmp_path):
    path = write(tmp_path, """
        [outer]
        sync_every = 10
    """)
    assert plan_inputs(path, flags(), overrides=["outer.sync_every=20"]).config.outer.sync_every == 20
    both = plan_inputs(path, flags(sync_every="30"), overrides=["outer.sync_every=20", "comm.codec=int8"]).config
    assert both.outer.sync_every == 30 and both.comm.codec == "int8"
    with pytest.raises(ConfigError) as info:
        plan_inputs(path, flags(), overrides=["outer.sync_evry=20"])
    assert info.value.field == "outer.sync_evry"


def test_per_pair_links_presets_and_custom_accelerators(tmp_path):
    path = write(tmp_path, """
        [model]
        params = "1b"
        [run]
        tokens = "100b"
        [[site]]
        name = "a"
        accelerator = "mi300x"
        accelerators = 8
        [[site]]
        name = "b"
        accelerators = 8
        [[site]]
        name = "c"
        accelerators = 8
        [accelerators.MI300X]
        peak_flops = 1.307e15
        watts = 750
        [accelerators.H100]
        watts = 1275
        [wan]
        link = "10gbit/20ms"
        [wan.presets]
        metro = "800gbit/1ms"
        [[wan.links]]
        between = ["a", 2]
        link = "1gbit/20ms"
        [[wan.links]]
        between = ["b", "c"]
        link = "metro"
    """)
    spec = plan_inputs(path).spec
    assert spec.sites[0].accelerator.name == "MI300X" and spec.sites[0].peak_flops == 1.307e15
    assert spec.sites[1].watts == 1275 and spec.sites[1].peak_flops == 989e12  # the preset, overridden in part
    assert (spec.topology.link(0, 2).bandwidth_bps, spec.topology.link(0, 2).latency_s) == (1e9, 0.02)
    assert spec.topology.link(0, 1).bandwidth_bps == 10e9
    assert spec.topology.link(1, 2).bandwidth_bps == 800e9  # the preset as the file redefines it
    inputs = plan_inputs(path)
    assert inputs.link_text == "10gbit/20ms + 2 per-pair link(s)"
    bad = write(tmp_path, path.read_text().replace('between = ["b", "c"]', 'between = ["b", "cc"]'), "bad.toml")
    with pytest.raises(ConfigError, match="'cc' is not a site"):
        plan_inputs(bad)
    tpu = write(tmp_path, path.read_text().replace('accelerator = "mi300x"', 'accelerator = "TPU"')
                + "[accelerators.TPU]\nwatts = 300\n", "tpu.toml")
    with pytest.raises(ConfigError, match="peak_flops") as info:
        plan_inputs(tpu)
    assert info.value.field == "accelerators.TPU"


@pytest.mark.parametrize(
    ("args", "field", "words"),
    [
        (dict(power_cap="-5"), None, "power_cap_mw"),
        (dict(mfu="1.2"), None, "(0, 1]"),
        (dict(mfu="high"), "sites.mfu", "expected a number"),
        (dict(accelerator="H1000"), "sites.accelerator", "did you mean 'H100'"),
        (dict(bandwidth="fast"), "wan.link", "cannot parse bandwidth"),
        (dict(bandwidth="10gbps"), "wan.link", "ambiguous"),
        (dict(link="transatlantic"), "wan.link", "cannot parse link"),
        (dict(link="10gbit"), "wan.link", "cannot parse link"),
        (dict(latency="-3ms"), "wan.link", "negative"),
        (dict(codec="int3"), "comm.codec", "unknown codec"),
        (dict(codec="topk", topk_fraction="2"), "comm.topk_fraction", "(0, 1]"),
        (dict(sites="0"), "run.sites", "at least 1 site"),
        (dict(workers_per_site="0"), "run.workers_per_site", "at least 1 worker"),
        (dict(target_utilization="95"), "plan.target_utilization", "(0, 1]"),
        (dict(plot="out.txt"), "plan.plot", ".png"),
        (dict(simulate=True, recovery="hope"), "simulate.recovery", "restart, elastic"),
        (dict(sync_every="2.5"), "outer.sync_every", "integer"),
        (dict(model_params="seventy"), "model.params", "integer"),
        (dict(algorithm="dilocco"), "run.algorithm", "did you mean 'diloco'"),
        (dict(step_seconds="-1"), None, "step_seconds"),
        (dict(sweep="1gbit:1tbit:1"), "plan.sweep", "from 2 to 1000"),
    ],
)
def test_bad_flags_raise_config_error(args, field, words):
    with pytest.raises(ConfigError) as info:
        plan_inputs(None, flags(**args))
    if field is not None:
        assert info.value.field == field
    assert words in str(info.value)


def test_sites_count_must_match_site_tables():
    with pytest.raises(ConfigError, match=r"\[\[site\]\]") as info:
        config_from_tree({"run": {"sites": 3}, "site": [{"name": "a"}]})
    assert info.value.field == "run.sites"
    # without a count, the tables set it
    assert config_from_tree({"site": [{"name": "a"}, {"name": "b"}]}).run.sites == 2


def test_simulation_settings_imply_simulate(tmp_path):
    inputs = plan_inputs(None, flags(mtbf_hours="24", sim_seed="3"))
    assert inputs.simulation is not None and inputs.simulation.seed == 3 and inputs.simulation.mtbf_hours == 24.0
    per_site = plan_inputs(None, flags(mtbf_hours="24, 0, 12, 6")).simulation
    assert per_site.mtbf_hours == [24.0, 0.0, 12.0, 6.0]
    assert plan_inputs(None, flags(sim_seed="3")).simulation is None  # a seed alone asks for nothing
    # in a file, too: a failure setting without `enabled`, read as the command line reads it
    path = write(tmp_path, "[simulate]\njitter = 0.1\n")
    assert plan_inputs(path, flags()).simulation is not None
    off = write(tmp_path, "[simulate]\njitter = 0.1\nenabled = false\n", "off.toml")
    assert plan_inputs(off, flags()).simulation is None


def test_load_plan_reads_a_file_as_the_command_line_does(tmp_path):
    path = write(tmp_path, "[simulate]\nmtbf_hours = 24\n")
    assert plan_inputs(path, flags()).simulation is not None
    assert load_plan(path).simulation is not None


def test_plot_without_sweep_gets_a_default_sweep():
    inputs = plan_inputs(None, flags(plot="x.png"))
    assert inputs.sweep_bps is not None and len(inputs.sweep_bps) == 41
    assert inputs.sweep_bps[0] == pytest.approx(100e6) and inputs.sweep_bps[-1] == pytest.approx(1e12)


def test_read_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        plan_inputs(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nparams = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        plan_inputs(bad)
