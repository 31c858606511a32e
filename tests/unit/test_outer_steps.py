"""The outer steps against numbers worked out by hand.

* ``OuterOptimizer``: outer SGD with Nesterov momentum, the outer optimizer of DiLoCo (Douillard et al.,
  arXiv 2311.08105: lr 0.7, momentum 0.9), and its plain steps (the outer warm-up).
* ``DiLoCo(overlap=True)``: the delayed outer update of Kale et al. 2025, "Eager updates for overlapped
  communication and computation in DiLoCo": round t's average is applied at the end of round t+1.
* ``StreamingDiLoCo``: the merge of a fragment whose sync lands tau steps after it started,
  alpha * local + (1 - alpha) * global (Douillard et al., "Streaming DiLoCo with overlapping communication",
  arXiv 2501.18512).

No processes: a scripted comm plays the one other site, whose pseudo-gradients each test chooses, so every
average, and so every parameter value, is known by hand. Inner steps are imitated by moving the parameters
by hand between ``after_inner_step`` calls. Torch's SGD with Nesterov momentum (dampening 0) does, on a
pseudo-gradient g:  buf = g on the first step, buf = m * buf + g afterwards;  p -= lr * (g + m * buf).
With lr 0.7 and m 0.9 a first momentum step therefore moves p by -0.7 * 1.9 * g = -1.33 * g.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geotrain.algorithms.strategies.base import StrategyContext
from geotrain.algorithms.strategies.diloco import DiLoCoStrategy as DiLoCo
from geotrain.algorithms.strategies.outer import OuterOptimizer
from geotrain.algorithms.strategies.streaming import StreamingStrategy as StreamingDiLoCo
from geotrain.config import OuterConfig, StreamingConfig

# -- helpers ------------------------------------------------------------------------------------------------


def _close(actual: torch.Tensor, expected: list[float]) -> None:
    """Equal up to float32 rounding (the hand-computed values are exact in decimal)."""
    torch.testing.assert_close(actual.detach().reshape(-1), torch.tensor(expected), rtol=0.0, atol=1e-6)


class _Landed:
    """An all-reduce that has already landed: ``wait()`` never blocks, so nothing depends on timing."""

    def __init__(self, mean: torch.Tensor) -> None:
        self._mean = mean

    def done(self) -> bool:
        return True

    def wait(self) -> torch.Tensor:
        return self._mean


class _TwoSites:
    """Stands in for CrossSiteComm: this site and one other, whose payloads per key are scripted.

    ``all_reduce_mean`` returns (this site's payload + the other site's next payload for that key) / 2 and
    records what this site sent, so a test can check the pseudo-gradient itself.
    """

    def __init__(self, others: dict[str, list[list[float]]]) -> None:
        self.others = {key: [torch.tensor(v) for v in values] for key, values in others.items()}
        self.sent: list[tuple[str, torch.Tensor]] = []

    def all_reduce_mean(self, flat: torch.Tensor, *, key: str = "all") -> _Landed:
        assert flat.dim() == 1 and flat.dtype == torch.float32, "cross-site payloads are flat fp32"
        self.sent.append((key, flat.clone()))
        return _Landed((flat + self.others[key].pop(0)) / 2)

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel

    def check_sent(self, key: str, expected: list[float]) -> None:
        """The latest payload is ``expected`` and went under ``key``."""
        assert self.sent, "nothing was sent"
        assert self.sent[-1][0] == key
        _close(self.sent[-1][1], expected)


class _Params(nn.Module):
    """A model that is nothing but named parameters, so every value can be set and read by hand."""

    def __init__(self, **values: list[float]) -> None:
        super().__init__()
        for name, v in values.items():
            self.register_parameter(name, nn.Parameter(torch.tensor(v)))


def _inner(p: nn.Parameter, minus: list[float]) -> None:
    """Imitate inner steps: p -= ``minus``."""
    with torch.no_grad():
        p.sub_(torch.tensor(minus))


def _ctx(model: nn.Module, comm: _TwoSites) -> StrategyContext:
    return StrategyContext(model=model, comm=comm, site_pg=None, workers=1)  # type: ignore[arg-type]


def _nesterov(**kw) -> OuterConfig:
    """DiLoCo's outer optimizer (arXiv 2311.08105): SGD, lr 0.7, Nesterov momentum 0.9; no warm-up unless given."""
    return OuterConfig(**{"lr": 0.7, "momentum": 0.9, "nesterov": True, "warmup_steps": 0, **kw})


def _buf(outer: OuterOptimizer) -> torch.Tensor | None:
    return outer.opt.state[outer.params].get("momentum_buffer")


# -- OuterOptimizer ------------------------------------------------------------------------------------------


def test_nesterov_outer_steps_match_hand_computation():
    """Three outer Nesterov steps (DiLoCo's outer optimizer, arXiv 2311.08105: lr 0.7, momentum 0.9) follow
    torch.optim.SGD's rule: buf = g first, then buf = 0.9 * buf + g; p -= 0.7 * (g + 0.9 * buf)."""
    outer = OuterOptimizer(torch.tensor([1.0, 2.0]), _nesterov())

    g1 = torch.tensor([0.5, -1.0])
    outer.step(g1)
    # buf = g1 = [0.5, -1.0]
    # update = g1 + 0.9 * buf = [0.5 + 0.45, -1.0 - 0.9] = [0.95, -1.9]
    # p = [1, 2] - 0.7 * [0.95, -1.9] = [1 - 0.665, 2 + 1.33] = [0.335, 3.33]
    _close(_buf(outer), [0.5, -1.0])
    _close(outer.params, [0.335, 3.33])
    _close(g1, [0.5, -1.0])  # the pseudo-gradient handed in is left as it was

    outer.step(torch.tensor([0.25, 0.5]))
    # buf = 0.9 * [0.5, -1.0] + [0.25, 0.5] = [0.45 + 0.25, -0.9 + 0.5] = [0.7, -0.4]
    # update = [0.25, 0.5] + 0.9 * [0.7, -0.4] = [0.25 + 0.63, 0.5 - 0.36] = [0.88, 0.14]
    # p = [0.335, 3.33] - 0.7 * [0.88, 0.14] = [0.335 - 0.616, 3.33 - 0.098] = [-0.281, 3.232]
    _close(_buf(outer), [0.7, -0.4])
    _close(outer.params, [-0.281, 3.232])

    outer.step(torch.tensor([0.0, 1.0]))
    # buf = 0.9 * [0.7, -0.4] + [0.0, 1.0] = [0.63, -0.36 + 1.0] = [0.63, 0.64]
    # update = [0.0, 1.0] + 0.9 * [0.63, 0.64] = [0.567, 1.0 + 0.576] = [0.567, 1.576]
    # p = [-0.281, 3.232] - 0.7 * [0.567, 1.576] = [-0.281 - 0.3969, 3.232 - 1.1032] = [-0.6779, 2.1288]
    _close(_buf(outer), [0.63, 0.64])
    _close(outer.params, [-0.6779, 2.1288])


def test_plain_step_subtracts_the_pseudo_gradient_and_the_next_step_is_a_first_momentum_step():
    """``plain=True`` (the outer warm-up) subtracts the averaged pseudo-gradient as it is, ignoring lr and
    momentum, and creates no momentum: the next outer step is a first Nesterov step, buf = g."""
    outer = OuterOptimizer(torch.tensor([1.0, 2.0]), _nesterov())

    outer.step(torch.tensor([0.5, -1.0]), plain=True)
    # p = [1, 2] - [0.5, -1.0] = [0.5, 3.0]: plain averaging of the sites, no lr, no momentum
    _close(outer.params, [0.5, 3.0])
    assert _buf(outer) is None

    outer.step(torch.tensor([0.25, 0.5]))
    # first momentum step: buf = g = [0.25, 0.5]; update = 1.9 * g = [0.475, 0.95]
    # p = [0.5, 3.0] - 0.7 * [0.475, 0.95] = [0.5 - 0.3325, 3.0 - 0.665] = [0.1675, 2.335]
    _close(_buf(outer), [0.25, 0.5])
    _close(outer.params, [0.1675, 2.335])


def test_plain_step_between_momentum_steps_leaves_the_buffer_as_it_was():
    """A plain step after momentum has built up moves p by the pseudo-gradient and does not touch the buffer;
    the step after it continues from the buffer of the last momentum step."""
    outer = OuterOptimizer(torch.tensor([1.0, 2.0]), _nesterov())
    outer.step(torch.tensor([0.5, -1.0]))
    # as in the first test: buf = [0.5, -1.0], p = [0.335, 3.33]

    outer.step(torch.tensor([1.0, 1.0]), plain=True)
    # p = [0.335, 3.33] - [1.0, 1.0] = [-0.665, 2.33]; buf stays [0.5, -1.0]
    _close(outer.params, [-0.665, 2.33])
    _close(_buf(outer), [0.5, -1.0])

    outer.step(torch.tensor([0.0, 1.0]))
    # buf = 0.9 * [0.5, -1.0] + [0.0, 1.0] = [0.45, 0.1]
    # update = [0.0, 1.0] + 0.9 * [0.45, 0.1] = [0.405, 1.09]
    # p = [-0.665, 2.33] - 0.7 * [0.405, 1.09] = [-0.665 - 0.2835, 2.33 - 0.763] = [-0.9485, 1.567]
    _close(_buf(outer), [0.45, 0.1])
    _close(outer.params, [-0.9485, 1.567])


# -- DiLoCo, synchronous and overlapped ----------------------------------------------------------------------
#
# One site with w = [1.0, 2.0] and H = 2, so rounds end after steps 1, 3 and 5. In round t this site's inner
# steps move w by -D[t] (half of it in each of the round's two steps), so its pseudo-gradient, start - end, is
# D[t]; the other site's is O[t]; the average is A[t] = (D[t] + O[t]) / 2:
#   A[0] = ([0.2, -0.4] + [0.6, 0.0]) / 2 = [0.4, -0.2]
#   A[1] = ([0.1, 0.3] + [-0.3, 0.1]) / 2 = [-0.1, 0.2]
#   A[2] = ([0.0, 0.2] + [0.4, -0.2]) / 2 = [0.2, 0.0]
# The global parameters after the outer steps on A[0], A[0..1], A[0..2] (Nesterov, lr 0.7, momentum 0.9):
#   G1: buf = [0.4, -0.2]; update = 1.9 * buf = [0.76, -0.38]
#       G1 = [1, 2] - 0.7 * [0.76, -0.38] = [1 - 0.532, 2 + 0.266] = [0.468, 2.266]
#   G2: buf = 0.9 * [0.4, -0.2] + [-0.1, 0.2] = [0.26, 0.02]
#       update = [-0.1, 0.2] + 0.9 * [0.26, 0.02] = [-0.1 + 0.234, 0.2 + 0.018] = [0.134, 0.218]
#       G2 = [0.468, 2.266] - 0.7 * [0.134, 0.218] = [0.468 - 0.0938, 2.266 - 0.1526] = [0.3742, 2.1134]
#   G3: buf = 0.9 * [0.26, 0.02] + [0.2, 0.0] = [0.434, 0.018]
#       update = [0.2, 0.0] + 0.9 * [0.434, 0.018] = [0.2 + 0.3906, 0.0162] = [0.5906, 0.0162]
#       G3 = [0.3742, 2.1134] - 0.7 * [0.5906, 0.0162] = [0.3742 - 0.41342, 2.1134 - 0.01134] = [-0.03922, 2.10206]

_D = [[0.2, -0.4], [0.1, 0.3], [0.0, 0.2]]
_O = [[0.6, 0.0], [-0.3, 0.1], [0.4, -0.2]]
_G0, _G1, _G2, _G3 = [1.0, 2.0], [0.468, 2.266], [0.3742, 2.1134], [-0.03922, 2.10206]


def _diloco(*, overlap: bool, **outer) -> tuple[DiLoCo, _Params, _TwoSites]:
    model = _Params(w=[1.0, 2.0])
    comm = _TwoSites({"outer": [list(o) for o in _O]})
    return DiLoCo(_ctx(model, comm), outer=_nesterov(sync_every=2, **outer), overlap=overlap), model, comm


def _round(strategy: DiLoCo, model: _Params, t: int, *, last: bool = False) -> bool:
    """Round t: two inner steps that together move w by -D[t]; returns what the round's last step returned."""
    half = [x / 2 for x in _D[t]]
    _inner(model.w, half)
    assert strategy.after_inner_step(2 * t, last=False) is False  # mid-round: nothing is synchronised
    _inner(model.w, half)
    return strategy.after_inner_step(2 * t + 1, last=last)


def test_diloco_synchronous_rounds_match_hand_computation():
    """Reference for the overlapped runs below (DiLoCo, arXiv 2311.08105): each round ends with the outer step
    on its own average, and the site starts the next round from the new global parameters."""
    strategy, model, comm = _diloco(overlap=False)

    assert _round(strategy, model, 0) is True
    comm.check_sent("outer", [0.2, -0.4])  # D[0] = [1, 2] - [0.8, 2.4]
    _close(strategy.global_parameters()[0], _G1)
    _close(model.w, _G1)
    assert strategy.syncs_in_flight() == 0

    assert _round(strategy, model, 1) is True
    comm.check_sent("outer", [0.1, 0.3])  # D[1] = G1 - (G1 - D[1])
    _close(strategy.global_parameters()[0], _G2)
    _close(model.w, _G2)

    assert _round(strategy, model, 2, last=True) is True
    comm.check_sent("outer", [0.0, 0.2])
    _close(strategy.global_parameters()[0], _G3)
    _close(model.w, _G3)
    assert strategy.outer_rounds == 3 and strategy.syncs_in_flight() == 0


def _overlapped_first_two_rounds(strategy: DiLoCo, model: _Params, comm: _TwoSites) -> None:
    """Rounds 0 and 1 with overlap=True, the delayed outer update of Kale et al. 2025 ("Eager updates for
    overlapped communication and computation in DiLoCo"): A[0] travels during round 1 and is applied at its end."""
    assert _round(strategy, model, 0) is True
    comm.check_sent("outer", [0.2, -0.4])
    # no outer step yet: the global stays G0; the site goes on from G0 - D[0] = [0.8, 2.4], its own model
    _close(strategy.global_parameters()[0], _G0)
    _close(model.w, [0.8, 2.4])
    assert strategy.syncs_in_flight() == 1

    assert _round(strategy, model, 1) is True
    # the site ended round 1 at [0.8, 2.4] - [0.1, 0.3] = [0.7, 2.1] and sends its progress of round 1 alone:
    # start - end = [0.8, 2.4] - [0.7, 2.1] = [0.1, 0.3] = D[1]
    comm.check_sent("outer", [0.1, 0.3])
    # the outer step on A[0] (one round late) gives G1; the site starts round 2 from
    # G1 - D[1] = [0.468 - 0.1, 2.266 - 0.3] = [0.368, 1.966]
    _close(strategy.global_parameters()[0], _G1)
    _close(model.w, [0.368, 1.966])
    assert strategy.syncs_in_flight() == 1
    assert strategy.outer_rounds == 2


def test_diloco_overlap_applies_each_average_one_round_late_and_the_last_round_synchronously():
    """With overlap=True the global model after round t is the synchronous one after round t-1; the last round
    (last=True) applies the pending A[1] and its own A[2] at once, so with the same pseudo-gradients the
    final model equals the synchronous run's G3 and every site holds it."""
    strategy, model, comm = _diloco(overlap=True)
    _overlapped_first_two_rounds(strategy, model, comm)

    assert _round(strategy, model, 2, last=True) is True
    # the site ended at [0.368, 1.966] - [0.0, 0.2] = [0.368, 1.766]; it sends D[2] = [0.0, 0.2]
    comm.check_sent("outer", [0.0, 0.2])
    # A[1] then A[2]: G2, then G3, the same as the synchronous run; the site holds the global model
    _close(strategy.global_parameters()[0], _G3)
    _close(model.w, _G3)
    assert strategy.syncs_in_flight() == 0
    assert strategy.outer_rounds == 3


def test_diloco_overlap_round_in_flight_is_applied_by_close():
    """A run stopped between rounds (time budget) with A[2] still in flight: ``close()`` applies it, and the
    site's parameters become the global model (Kale et al. 2025's delayed update, drained)."""
    strategy, model, comm = _diloco(overlap=True)
    _overlapped_first_two_rounds(strategy, model, comm)

    assert _round(strategy, model, 2) is True  # not the last round: A[2] goes in flight
    comm.check_sent("outer", [0.0, 0.2])
    # A[1] applied: G2; the site goes on from G2 - D[2] = [0.3742, 2.1134 - 0.2] = [0.3742, 1.9134]
    _close(strategy.global_parameters()[0], _G2)
    _close(model.w, [0.3742, 1.9134])
    assert strategy.syncs_in_flight() == 1

    _inner(model.w, [0.05, 0.05])  # one more inner step before the run stops
    assert strategy.after_inner_step(6, last=False) is False
    strategy.close()
    # A[2] applied: G3; the local progress since round 2 ended is dropped for the global model
    _close(strategy.global_parameters()[0], _G3)
    _close(model.w, _G3)
    assert strategy.syncs_in_flight() == 0
    assert len(comm.sent) == 3  # close() sends nothing


def test_diloco_close_without_a_round_in_flight_changes_nothing():
    """Synchronous DiLoCo has nothing in flight between rounds: ``close()`` leaves the model as it is."""
    strategy, model, comm = _diloco(overlap=False)
    _round(strategy, model, 0)
    _inner(model.w, [0.05, 0.05])
    strategy.close()
    _close(strategy.global_parameters()[0], _G1)
    _close(model.w, [0.468 - 0.05, 2.266 - 0.05])
    assert len(comm.sent) == 1


@pytest.mark.parametrize(
    ("overlap", "globals_after_rounds"),
    [
        # synchronous: round 0 ends at step 1 < 2 and is plain:   [1, 2] - A[0] = [1 - 0.4, 2 + 0.2] = [0.6, 2.2]
        #   round 1 (step 3) is a first momentum step on A[1]:    buf = [-0.1, 0.2]; 0.7 * 1.9 * buf = [-0.133, 0.266]
        #                                                          [0.6 + 0.133, 2.2 - 0.266] = [0.733, 1.934]
        #   round 2 (step 5): buf = 0.9 * [-0.1, 0.2] + [0.2, 0.0] = [0.11, 0.18]
        #                     update = [0.2, 0.0] + 0.9 * [0.11, 0.18] = [0.299, 0.162]
        #                     [0.733 - 0.7 * 0.299, 1.934 - 0.7 * 0.162] = [0.733 - 0.2093, 1.934 - 0.1134]
        #                                                               = [0.5237, 1.8206]
        (False, [[0.6, 2.2], [0.733, 1.934], [0.5237, 1.8206]]),
        # overlapped: A[0] is applied at the end of round 1 and is still plain (its round ended in the warm-up,
        # although round 1 did not); the last round applies A[1] then A[2] exactly as above
        (True, [[1.0, 2.0], [0.6, 2.2], [0.5237, 1.8206]]),
    ],
    ids=["synchronous", "overlap"],
)
def test_diloco_warmup_round_is_plain_even_when_applied_a_round_late(overlap, globals_after_rounds):
    """Outer warm-up (warmup_steps=2): the round ending at step 1 averages the sites plainly, the next rounds
    use Nesterov momentum from a first step. With overlap the plain flag travels with the pending average."""
    strategy, model, comm = _diloco(overlap=overlap, warmup_steps=2)
    for t, expected in enumerate(globals_after_rounds):
        assert _round(strategy, model, t, last=t == 2) is True
        comm.check_sent("outer", _D[t])  # the pseudo-gradients are the same in both modes
        _close(strategy.global_parameters()[0], expected)
    _close(model.w, globals_after_rounds[-1])


# -- Streaming DiLoCo ----------------------------------------------------------------------------------------


def _streaming(model: _Params, comm: _TwoSites, outer: OuterConfig, **streaming) -> StreamingDiLoCo:
    return StreamingDiLoCo(_ctx(model, comm), outer=outer, streaming=StreamingConfig(**streaming))


def test_streaming_merge_after_tau_steps_is_alpha_local_plus_one_minus_alpha_global():
    """Streaming DiLoCo (arXiv 2501.18512), one fragment, H = 2, tau = 1, alpha = 0.5: a sync starts after
    steps 1 and 3 and lands one step later, when the outer step moves the global fragment and the local one
    becomes 0.5 * local + 0.5 * global, keeping the step made while the sync travelled. The last step
    synchronises every fragment at once (key "final") and every site ends on the global model."""
    model = _Params(w=[1.0, 2.0])
    # the other site's pseudo-gradients, chosen so that the averages are A[0], A[1], A[2] of the DiLoCo tests
    comm = _TwoSites({"fragment0": [[0.6, 0.0], [-0.184, 0.417]], "final": [[0.3049, -0.0652]]})
    s = _streaming(model, comm, _nesterov(sync_every=2), fragments=1, overlap_steps=1, mix_alpha=0.5)

    _inner(model.w, [0.1, -0.2])  # w = [0.9, 2.2]
    assert s.after_inner_step(0, last=False) is False
    assert comm.sent == []

    _inner(model.w, [0.1, -0.2])  # w = [0.8, 2.4]
    assert s.after_inner_step(1, last=False) is True
    comm.check_sent("fragment0", [0.2, -0.4])  # [1, 2] - [0.8, 2.4]; average A[0] = [0.4, -0.2]
    _close(s.global_parameters()[0], _G0)  # in flight: nothing applied yet
    _close(model.w, [0.8, 2.4])
    assert s.syncs_in_flight() == 1

    _inner(model.w, [0.1, -0.1])  # w = [0.7, 2.5]: the step overlapping the sync
    assert s.after_inner_step(2, last=False) is False
    # landed: global = G1 = [0.468, 2.266];
    # local = 0.5 * [0.7, 2.5] + 0.5 * [0.468, 2.266] = [0.35 + 0.234, 1.25 + 1.133] = [0.584, 2.383]
    _close(s.global_parameters()[0], _G1)
    _close(model.w, [0.584, 2.383])
    assert s.syncs_in_flight() == 0

    _inner(model.w, [0.1, 0.1])  # w = [0.484, 2.283]
    assert s.after_inner_step(3, last=False) is True
    # the pseudo-gradient is taken from the global fragment: G1 - w = [0.468 - 0.484, 2.266 - 2.283]
    comm.check_sent("fragment0", [-0.016, -0.017])  # average ([-0.016, -0.017] + [-0.184, 0.417]) / 2 = A[1]
    _close(s.global_parameters()[0], _G1)

    _inner(model.w, [0.1, 0.1])  # w = [0.384, 2.183]
    assert s.after_inner_step(4, last=False) is False
    # landed: global = G2 = [0.3742, 2.1134] (momentum carried from the first sync);
    # local = 0.5 * [0.384, 2.183] + 0.5 * [0.3742, 2.1134] = [0.192 + 0.1871, 1.0915 + 1.0567] = [0.3791, 2.1482]
    _close(s.global_parameters()[0], _G2)
    _close(model.w, [0.3791, 2.1482])

    _inner(model.w, [0.1, 0.1])  # w = [0.2791, 2.0482]
    assert s.after_inner_step(5, last=True) is True
    # last: synchronous; G2 - w = [0.3742 - 0.2791, 2.1134 - 2.0482] = [0.0951, 0.0652]
    comm.check_sent("final", [0.0951, 0.0652])  # average ([0.0951, 0.0652] + [0.3049, -0.0652]) / 2 = A[2]
    # global = G3 = [-0.03922, 2.10206], and the local fragment is the global one (no alpha on the last sync)
    _close(s.global_parameters()[0], _G3)
    _close(model.w, _G3)
    assert s.syncs_in_flight() == 0
    assert s.outer_rounds == 3


def test_streaming_merge_waits_tau_steps_with_another_alpha():
    """tau = 2, alpha = 0.25, outer lr 1 without momentum (the outer step is then plain averaging of the
    sites): the sync started after step 2 changes nothing after step 3 and is merged after step 4 as
    0.25 * local + 0.75 * global (arXiv 2501.18512)."""
    model = _Params(w=[1.0, 2.0])
    comm = _TwoSites({"fragment0": [[0.5, -0.3]]})
    outer = OuterConfig(sync_every=3, lr=1.0, momentum=0.0, warmup_steps=0)
    s = _streaming(model, comm, outer, fragments=1, overlap_steps=2, mix_alpha=0.25)

    for step in range(3):
        _inner(model.w, [0.1, 0.1])
        assert s.after_inner_step(step, last=False) is (step == 2)
    # w = [0.7, 1.7]; sent [1, 2] - [0.7, 1.7] = [0.3, 0.3]; average ([0.3, 0.3] + [0.5, -0.3]) / 2 = [0.4, 0.0]
    comm.check_sent("fragment0", [0.3, 0.3])

    _inner(model.w, [0.1, 0.1])  # w = [0.6, 1.6]
    assert s.after_inner_step(3, last=False) is False
    _close(s.global_parameters()[0], [1.0, 2.0])  # still in flight after one step of the two
    _close(model.w, [0.6, 1.6])
    assert s.syncs_in_flight() == 1

    _inner(model.w, [0.1, 0.1])  # w = [0.5, 1.5]
    assert s.after_inner_step(4, last=False) is False
    # global = [1, 2] - 1.0 * [0.4, 0.0] = [0.6, 2.0]
    # local = 0.25 * [0.5, 1.5] + 0.75 * [0.6, 2.0] = [0.125 + 0.45, 0.375 + 1.5] = [0.575, 1.875]
    _close(s.global_parameters()[0], [0.6, 2.0])
    _close(model.w, [0.575, 1.875])
    assert s.syncs_in_flight() == 0


def test_streaming_tau_zero_replaces_the_fragment_on_a_staggered_schedule():
    """tau = 0 (alpha is then unused): the global fragment replaces the local one at once. Two fragments,
    H = 4 (arXiv 2501.18512's staggered schedule): fragment 1 = b syncs after steps 1 and 5 (offset H/P = 2),
    fragment 0 = a after step 3; each fragment has its own outer optimizer and momentum, and a sync leaves
    the other fragment alone."""
    model = _Params(a=[1.0, 2.0], b=[3.0, 4.0])
    comm = _TwoSites({"fragment0": [[0.0, -0.4]], "fragment1": [[0.6, -0.2], [-0.2, 0.0]]})
    s = _streaming(model, comm, _nesterov(sync_every=4), fragments=2, overlap_steps=0, mix_alpha=0.5)
    assert [f.params for f in s.fragments] == [[model.a], [model.b]]

    def step(i: int) -> bool:
        _inner(model.a, [0.1, 0.1])
        _inner(model.b, [0.1, 0.1])
        return s.after_inner_step(i, last=False)

    assert step(0) is False
    assert comm.sent == []

    assert step(1) is False  # a = [0.8, 1.8], b = [2.8, 3.8]
    comm.check_sent("fragment1", [0.2, 0.2])  # [3, 4] - [2.8, 3.8]
    # average ([0.2, 0.2] + [0.6, -0.2]) / 2 = [0.4, 0.0]; first Nesterov step moves by -1.33 * [0.4, 0.0]
    # global b = [3 - 0.532, 4.0] = [2.468, 4.0], and b is replaced by it; a is untouched
    _close(s.global_parameters()[1], [2.468, 4.0])
    _close(model.b, [2.468, 4.0])
    _close(model.a, [0.8, 1.8])
    _close(s.global_parameters()[0], [1.0, 2.0])
    assert s.syncs_in_flight() == 0

    assert step(2) is False  # a = [0.7, 1.7], b = [2.368, 3.9]
    assert step(3) is True  # a = [0.6, 1.6], b = [2.268, 3.8]
    comm.check_sent("fragment0", [0.4, 0.4])  # [1, 2] - [0.6, 1.6]
    # average ([0.4, 0.4] + [0.0, -0.4]) / 2 = [0.2, 0.0]; a's own optimizer takes its first step:
    # global a = [1 - 1.33 * 0.2, 2.0] = [1 - 0.266, 2.0] = [0.734, 2.0]
    _close(s.global_parameters()[0], [0.734, 2.0])
    _close(model.a, [0.734, 2.0])
    _close(model.b, [2.268, 3.8])
    assert s.outer_rounds == 1  # two fragment syncs: one round of the whole model

    assert step(4) is False  # a = [0.634, 1.9], b = [2.168, 3.7]
    assert step(5) is False  # a = [0.534, 1.8], b = [2.068, 3.6]
    comm.check_sent("fragment1", [0.4, 0.4])  # [2.468, 4.0] - [2.068, 3.6]
    # average ([0.4, 0.4] + [-0.2, 0.0]) / 2 = [0.1, 0.2]; b's momentum continues from its first sync alone:
    # buf = 0.9 * [0.4, 0.0] + [0.1, 0.2] = [0.46, 0.2]
    # update = [0.1, 0.2] + 0.9 * [0.46, 0.2] = [0.1 + 0.414, 0.2 + 0.18] = [0.514, 0.38]
    # global b = [2.468 - 0.7 * 0.514, 4.0 - 0.7 * 0.38] = [2.468 - 0.3598, 4.0 - 0.266] = [2.1082, 3.734]
    _close(s.global_parameters()[1], [2.1082, 3.734])
    _close(model.b, [2.1082, 3.734])
    _close(model.a, [0.534, 1.8])
    _close(s.global_parameters()[0], [0.734, 2.0])


def _streaming_in_warmup(warmup_steps: int) -> tuple[StreamingDiLoCo, _Params, _TwoSites]:
    """One fragment, H = 2, tau = 1, alpha = 0.5; the first sync (started after step 1) is in the warm-up.

    w goes [1, 2] -> [0.9, 2.2] -> [0.8, 2.4]: sent [0.2, -0.4], average A[0] = [0.4, -0.2].
    Step 2 moves w to [0.7, 2.5] and merges: global = [1, 2] - [0.4, -0.2] = [0.6, 2.2] (plain);
    local = 0.5 * [0.7, 2.5] + 0.5 * [0.6, 2.2] = [0.65, 2.35].
    """
    model = _Params(w=[1.0, 2.0])
    # the second sync sends [0.05, -0.05] (below); ([0.05, -0.05] + [-0.25, 0.45]) / 2 = [-0.1, 0.2] = A[1]
    # (sent as a regular sync, or as the final one when the next step is the last)
    comm = _TwoSites({"fragment0": [[0.6, 0.0], [-0.25, 0.45]], "final": [[-0.25, 0.45]]})
    s = _streaming(model, comm, _nesterov(sync_every=2, warmup_steps=warmup_steps),
                   fragments=1, overlap_steps=1, mix_alpha=0.5)
    for step, minus in enumerate([[0.1, -0.2], [0.1, -0.2], [0.1, -0.1]]):
        _inner(model.w, minus)
        s.after_inner_step(step, last=False)
    comm.check_sent("fragment0", [0.2, -0.4])
    _close(s.global_parameters()[0], [0.6, 2.2])
    _close(model.w, [0.65, 2.35])
    return s, model, comm


def test_streaming_warmup_sync_is_plain_and_the_next_is_a_first_momentum_step():
    """Outer warm-up (warmup_steps=2) in Streaming DiLoCo: a sync started before step 2 averages plainly, the
    sync started after step 3 is the fragment's first Nesterov step."""
    s, model, comm = _streaming_in_warmup(warmup_steps=2)

    _inner(model.w, [0.1, 0.1])  # w = [0.55, 2.25]
    assert s.after_inner_step(3, last=False) is True
    comm.check_sent("fragment0", [0.05, -0.05])  # [0.6, 2.2] - [0.55, 2.25]; average A[1] = [-0.1, 0.2]

    _inner(model.w, [0.1, 0.1])  # w = [0.45, 2.15]
    assert s.after_inner_step(4, last=False) is False
    # first momentum step: [0.6, 2.2] - 1.33 * [-0.1, 0.2] = [0.6 + 0.133, 2.2 - 0.266] = [0.733, 1.934]
    # local = 0.5 * [0.45, 2.15] + 0.5 * [0.733, 1.934] = [0.225 + 0.3665, 1.075 + 0.967] = [0.5915, 2.042]
    _close(s.global_parameters()[0], [0.733, 1.934])
    _close(model.w, [0.5915, 2.042])


def test_streaming_last_sync_within_warmup_is_plain():
    """The final synchronous sync of a run that ends inside the outer warm-up should average plainly, as every
    other sync in the warm-up does and as DiLoCo's last round does (OuterConfig.warmup_steps: "Outer rounds
    that end within this many inner steps plainly average the sites"). The last sync once took a Nesterov
    step regardless, a first one moving the fragment by 1.33 times the averaged pseudo-gradient.
    """
    s, model, comm = _streaming_in_warmup(warmup_steps=100)

    _inner(model.w, [0.1, 0.1])  # w = [0.55, 2.25]
    assert s.after_inner_step(3, last=True) is True
    comm.check_sent("final", [0.05, -0.05])  # [0.6, 2.2] - [0.55, 2.25]; average A[1] = [-0.1, 0.2]
    # plain, as step 3 < 100: [0.6, 2.2] - [-0.1, 0.2] = [0.7, 2.0]
    # (a first Nesterov step would give [0.6 + 0.133, 2.2 - 0.266] = [0.733, 1.934])
    _close(s.global_parameters()[0], [0.7, 2.0])
    _close(model.w, [0.7, 2.0])
