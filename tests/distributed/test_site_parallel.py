"""Data parallelism inside a site (``geotrain.comm.site_parallel``): a site of 2 workers under PyTorch's DDP,
or under FSDP2, trains the same model as a site of one worker that takes both workers' batches at once.

Every site draws one batch per step and its workers split it (``site_batch_workload``), so only the rounding of
the arithmetic may differ: the final global parameters must agree to fp32 tolerance. 2 sites of DiLoCo, H=2.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from _utils.runs import run_tiny, tiny_config
from _utils.workloads import site_batch_workload

pytestmark = pytest.mark.slow  # starts processes

SETTINGS = {"run.sites": 2, "run.algorithm": "diloco", "outer.sync_every": 2, "run.tokens": 2 * 8 * 32 * 6,
            "optim.warmup_steps": 0}


def _run(out, **values):
    outcome = run_tiny(out, workload_factory=site_batch_workload, **SETTINGS, **values)
    assert outcome.exit_code == 0, outcome.summary["error"]
    assert outcome.summary["steps"] == 6 and outcome.summary["sites_in_sync"]
    return load_file(str(out / "model.safetensors"))


def test_two_workers_per_site_equal_one_worker_with_the_doubled_batch(tmp_path):
    one = _run(tmp_path / "one", **{"run.workers_per_site": 1})
    for fsdp in (False, True):  # DDP, then FSDP2
        two = _run(tmp_path / f"two-{fsdp}", **{"run.workers_per_site": 2, "run.fsdp": fsdp})
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{'fsdp' if fsdp else 'ddp'} {name}: {m}")
    # not vacuous: training moved the parameters well beyond that tolerance
    from geotrain.models.gpt import init_gpt

    init = dict(init_gpt(tiny_config(tmp_path / "x").model, seed=0).named_parameters())
    assert max(float((one[n] - init[n].detach()).abs().max()) for n in one) > 1e-3
