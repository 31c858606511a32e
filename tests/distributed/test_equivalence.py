"""DiLoCo with H=1, inner SGD and outer SGD at lr 1 without momentum is DDP with SGD (guide, section 4).

Both runs use 2 sites as real processes on gloo; the final global parameters must agree to ~1e-6.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from _utils.runs import run_tiny
import pytest

pytestmark = pytest.mark.slow  # starts processes

SGD = {
    "optim.name": "sgd",
    "optim.lr": 0.5,
    "optim.weight_decay": 0.0,
    "optim.momentum": 0.0,
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.grad_clip": 0.0,
    "run.sites": 2,
    "run.tokens": 2 * 4 * 32 * 6,  # 6 inner steps per site
}


def test_diloco_h1_outer_sgd_lr1_equals_ddp(tmp_path):
    ddp = run_tiny(tmp_path / "ddp", **SGD, **{"run.algorithm": "ddp"})
    diloco = run_tiny(
        tmp_path / "diloco",
        **SGD,
        **{"run.algorithm": "diloco", "outer.sync_every": 1, "outer.lr": 1.0, "outer.momentum": 0.0},
    )
    assert ddp.exit_code == 0 and diloco.exit_code == 0, (ddp.summary["error"], diloco.summary["error"])
    assert ddp.summary["steps"] == diloco.summary["steps"] == 6
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "diloco" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved = max(moved, float((a[name] - b[name]).abs().max()))
    # and training really happened: the parameters moved away from a fresh initialisation
    init = run_tiny(tmp_path / "init", **{**SGD, "optim.lr": 1e-12, "run.algorithm": "ddp"})
    c = load_file(str(tmp_path / "init" / "model.safetensors"))
    assert init.exit_code == 0
    assert max(float((a[n] - c[n]).abs().max()) for n in a) > 1e-3


def test_diloco_differs_from_ddp_when_h_is_larger(tmp_path):
    """The equivalence above is not vacuous: with H=3 and outer momentum the models differ."""
    ddp = run_tiny(tmp_path / "ddp", **SGD, **{"run.algorithm": "ddp"})
    diloco = run_tiny(tmp_path / "diloco", **SGD, **{"run.algorithm": "diloco", "outer.sync_every": 3})
    assert ddp.exit_code == 0 and diloco.exit_code == 0
    assert ddp.summary["params_sha256"] != diloco.summary["params_sha256"]
