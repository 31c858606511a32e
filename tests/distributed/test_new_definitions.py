"""A new algorithm and a new codec are one definition each plus one registry line: defined here, in the
test, they are accepted by ``geotrain run`` (in real site processes) and by ``geotrain plan``, which prices
them from the same definitions, with no other change anywhere."""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import pytest
import torch

from _utils.runs import TINY
from geotrain import algorithms
from geotrain.algorithms import Algorithm, ModelLayout, SyncPattern, register_algorithm
from geotrain.algorithms.strategies.base import Strategy
from geotrain.cli import main
from geotrain.comm.codecs import registry
from geotrain.comm.codecs.base import Codec
from geotrain.comm.codecs.layout import HEADER_SIZE, pad8
from geotrain.comm.codecs.registry import CodecSpec, register_codec
from geotrain.comm.flat import flatten, unflatten_into

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class HalfCodec(Codec):
    """float16 payloads: 2 bytes per value (a toy; bf16 is the registered half-width codec)."""

    __slots__ = ()
    codec_id: ClassVar[int] = 99

    @property
    def name(self) -> str:
        return "toy-fp16"

    def _body_size(self, numel: int) -> int:
        return pad8(2 * numel)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> None:
        body[: 2 * x.numel()].view(torch.float16).copy_(x.clamp(-65504, 65504))
        body[2 * x.numel():].zero_()

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(body[: 2 * out.numel()].view(torch.float16))


class HalfSpec(CodecSpec):
    name = "toy-fp16"
    summary = "float16 values"

    def encoded_size(self, numel: int, options: dict[str, Any]) -> int:
        return HEADER_SIZE + pad8(2 * numel)

    def build(self, options: dict[str, Any]) -> Codec:
        return HalfCodec()


class AverageStrategy(Strategy):
    def __init__(self, ctx: Any, *, every: int) -> None:
        super().__init__(ctx)
        self.every = every

    @torch.no_grad()
    def after_inner_step(self, step: int, *, last: bool) -> bool:
        if (step + 1) % self.every and not last:
            return False
        params = self.ctx.params
        unflatten_into(self.ctx.comm.all_reduce_mean(flatten(params), key="params").wait(), params)
        self.outer_rounds += 1
        return True


class Average(Algorithm):
    """Plain model averaging every H steps (local SGD): DiLoCo without an outer optimizer."""

    name = "toy-average"
    summary = "average the sites' models every H steps"
    settings = ("outer.sync_every",)

    def describe(self, config: Any) -> dict[str, Any]:
        return {"sync_every": config.outer.sync_every, "fragments": 1, "overlap_steps": 0, "overlap": False}

    def pattern(self, config: Any, layout: ModelLayout) -> SyncPattern:
        h = config.outer.sync_every
        return SyncPattern(round_steps=h, period_steps=float(h), hide_steps=0.0, payloads=(layout.params,))

    def sync_counts(self, config: Any, steps: int, *, stopped_early: bool = False) -> list[int]:
        return [self.sync_periods(config, steps)]

    def sync_periods(self, config: Any, steps: int, *, stopped_early: bool = False) -> int:
        return math.ceil(steps / config.outer.sync_every)

    def build(self, config: Any, ctx: Any) -> Strategy:
        return AverageStrategy(ctx, every=config.outer.sync_every)


@pytest.fixture
def registered(monkeypatch):
    """Register the two for one test, leaving the registries as they were afterwards."""
    monkeypatch.setattr(algorithms, "_REGISTRY", algorithms._REGISTRY.copy())
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.copy())
    register_algorithm(Average())
    register_codec(HalfSpec())


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_and_run_accept_a_new_algorithm_and_codec(registered, tmp_path, capsys):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    common = ["--algorithm", "toy-average", "--codec", "toy-fp16", "--sites", "2", "--sync-every", "4",
              "--tokens", str(2 * 4 * 32 * 12), *sets]

    code, out, err = _run(capsys, ["plan", *common, "--json"])
    assert code == 0, err
    planned = json.loads(out)
    assert planned["algorithm"] == "toy-average" and planned["codec"] == "toy-fp16"
    assert planned["collective"] == "all_gather"  # a lossy codec between two sites
    assert planned["steps"] == 12 and planned["syncs"] == 3

    code, _, err = _run(capsys, ["run", "--quiet", *common, "--out", str(tmp_path)])
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["algorithm"] == "toy-average" and summary["codec"] == "toy-fp16"
    assert summary["outer_rounds"] == 3 and summary["eval_loss"] < math.log(256)
    # the plan priced exactly what the run sent: float16 values and a header, per sync and in all
    params = summary["param_bytes"] // 4
    assert summary["payload_bytes_per_sync"] == planned["payload_bytes_per_sync"] == HEADER_SIZE + pad8(2 * params)
    assert summary["wan_bytes"] == planned["wan_bytes"]


def test_unknown_names_are_refused_without_them(tmp_path, capsys):
    code, _, err = _run(capsys, ["run", "--dry-run", "--algorithm", "toy-average", "--out", str(tmp_path)])
    assert code == 2 and "run.algorithm" in err and "toy-average" in err
    code, _, err = _run(capsys, ["plan", "--codec", "toy-fp16"])
    assert code == 2 and "comm.codec" in err
