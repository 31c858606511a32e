"""Error feedback: the sender carries what compression lost into the next round.

With a lossy codec C, a site that sends C(x_t) every round loses x_t - decode(C(x_t)) for good, and for top-k
that is most of x_t. Error feedback (Seide et al. 2014; Karimireddy et al., arXiv 1901.09847; used with top-k by
DeMo, arXiv 2411.19870, and SparseLoCo, arXiv 2508.15706) keeps the loss as a residual e and sends
C(x_t + e_t) instead, with e_{t+1} = x_t + e_t - decode(C(x_t + e_t)). Summed over R rounds, what was decoded
equals sum(x_t) + e_0 - e_R: the error of the sum is one residual, which stays bounded, instead of growing
with R.

The residual is the one piece of state next to the pure codecs. It lives with the sender (one per site and
tensor), is computed from the decoded payload itself, so it is exactly what receivers lost, and belongs in a
checkpoint (``state_dict``) for an exact resume.
"""

from __future__ import annotations

import torch

from geotrain.comm.codecs.base import Codec, CodecError, as_float32_vector

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Wrap a codec with a sender-side residual.

    ``decay`` (SparseLoCo's beta) scales the residual before it is added: 1.0 is classic error feedback;
    values below 1 forget old residual, which SparseLoCo uses in place of outer momentum.
    """

    __slots__ = ("codec", "decay", "_residual", "_spare", "_decoded", "_undo")

    def __init__(self, codec: Codec, *, decay: float = 1.0) -> None:
        if not isinstance(codec, Codec):
            raise CodecError(f"ErrorFeedback wraps a Codec, got {type(codec).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise CodecError(f"decay must be in [0, 1], got {decay}")
        self.codec = codec
        self.decay = float(decay)
        self._residual: torch.Tensor | None = None
        # Two more buffers of the same size, reused round after round: allocating a large tensor each round
        # costs more in page faults than the encode.
        self._spare: torch.Tensor | None = None
        self._decoded: torch.Tensor | None = None
        self._undo = False

    @property
    def residual(self) -> torch.Tensor | None:
        """What has been lost so far and will be added to the next input (None before the first round)."""
        return self._residual

    def reset(self) -> None:
        """Forget the residual (for example when the tensor it belongs to is replaced)."""
        self._residual = self._spare = self._decoded = None
        self._undo = False

    def commit(self) -> None:
        """The payload of the latest encode was delivered: keep its residual (the default if nothing is said)."""
        self._undo = False

    def rollback(self) -> None:
        """The payload of the latest encode was not delivered (a sync voted down, or this site's update left out):
        restore the residual from before it, so that what it carried is sent again next time."""
        if self._undo:
            self._residual, self._spare = self._spare, self._residual
            self._undo = False

    def encode(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x`` plus the residual and keep what the payload loses as the next residual.

        If encoding fails (for example NaN in ``x``), the residual is left as it was.
        """
        x = as_float32_vector(x)
        numel = x.numel()
        if self._residual is not None and self._residual.numel() != numel:
            raise CodecError(
                f"ErrorFeedback holds a residual of {self._residual.numel()} values but got {numel}; "
                "use one ErrorFeedback per tensor, or reset() it when the tensor changes"
            )
        if self.codec.lossless:
            return self.codec.encode(x, out=out)
        if self._spare is None or self._spare.numel() != numel:
            self._spare = torch.empty(numel)
        y = self._spare
        if self._residual is None:
            y.copy_(x)
        elif self.decay == 1.0:
            torch.add(x, self._residual, out=y)
        else:
            torch.add(x, self._residual, alpha=self.decay, out=y)
        payload = self.codec.encode(y, out=out)
        if self._decoded is None or self._decoded.numel() != numel:
            self._decoded = torch.empty(numel)
        y.sub_(self.codec.decode(payload, out=self._decoded))
        # y is the new residual; the old residual's buffer is next round's spare (and what rollback() restores).
        self._residual, self._spare = y, self._residual
        self._undo = True
        return payload

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        """The residual, for a checkpoint."""
        return {"residual": None if self._residual is None else self._residual.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        """Restore a residual saved by ``state_dict``."""
        residual = state.get("residual")
        self.reset()  # also forgets an undo
        if residual is not None:
            self._residual = as_float32_vector(residual).clone()
