"""The training code of DDP across sites (``geotrain.algorithms.ddp``): every step's gradient crosses the WAN."""

from __future__ import annotations

from geotrain.algorithms.strategies.base import Strategy
from geotrain.comm.flat import flatten, unflatten_into

__all__ = ["DDPStrategy"]


class DDPStrategy(Strategy):
    def reduce_gradients(self) -> None:
        params = [p for p in self.ctx.params if p.grad is not None]
        grads = [p.grad for p in params]
        mean = self.ctx.comm.all_reduce_mean(flatten(grads), key="grads").wait()
        unflatten_into(mean, grads)
        self.outer_rounds += 1

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        return True  # parameters are identical on every site after every step
