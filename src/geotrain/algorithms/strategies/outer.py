"""Outer optimizers: the step DiLoCo takes on the averaged pseudo-gradient.

DiLoCo (Douillard et al., arXiv 2311.08105) found SGD with Nesterov momentum 0.9 and learning rate 0.7 the
best outer optimizer; outer SGD at learning rate 1 without momentum is plain parameter averaging.
The global parameters are kept as one flat fp32 tensor, the same layout as the cross-site payload.
"""

from __future__ import annotations

import torch

from geotrain.config import OuterConfig

__all__ = ["OuterOptimizer"]


class OuterOptimizer:
    """Holds the global parameters (flat fp32) and steps them with a pseudo-gradient."""

    def __init__(self, initial: torch.Tensor, config: OuterConfig) -> None:
        self.params = torch.nn.Parameter(initial.detach().clone().to(torch.float32), requires_grad=False)
        self.opt = torch.optim.SGD(
            [self.params], lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
        )

    @torch.no_grad()
    def step(self, pseudo_grad: torch.Tensor, *, plain: bool = False) -> None:
        """θ_global ← OuterSGD(θ_global, Δ), where Δ = θ_global_before_round − θ_local_after_round (averaged).

        ``plain`` applies Δ as it is (plain averaging of the sites) and leaves the momentum untouched.
        """
        if plain:
            self.params.sub_(pseudo_grad)  # plain averaging of the sites' models; momentum starts afterwards
            return
        self.params.grad = pseudo_grad
        self.opt.step()
        self.params.grad = None

    def state_dict(self) -> dict:
        return {"params": self.params.detach().clone(), "opt": self.opt.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.params.copy_(state["params"])
        self.opt.load_state_dict(state["opt"])
