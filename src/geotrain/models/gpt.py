"""A small byte-level GPT: the demo model that geotrain trains across emulated sites.

A decoder-only transformer over raw bytes (vocabulary 256, so no tokenizer). The design follows the
spirit of Andrej Karpathy's nanoGPT: one short file you can read top to bottom, pre-LayerNorm blocks,
learned position embeddings, a GELU MLP four times as wide as the model, the output layer tied to the
input embedding, and GPT-2's initialisation (normal with std 0.02, residual projections scaled down by
``1/sqrt(2 * n_layer)`` so the residual stream does not grow with depth). The code here is our own.

The model holds no parallelism code: the training loop and the strategies (DDP, DiLoCo, ...) treat it as
an ordinary ``nn.Module``.

Shapes: B batch, T time (<= seq_len), C d_model, H n_head, D = C / H head size, V = 256.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geotrain.config import ModelConfig

__all__ = ["VOCAB_SIZE", "GPTConfig", "GPT", "init_gpt"]

VOCAB_SIZE = 256
"""One token per byte value."""


GPTConfig = ModelConfig
"""The model's size is the configuration's ``[model]`` section (``geotrain.config.ModelConfig``): one
definition, validated once, read by the run, ``geotrain sample`` and the planner (which also counts the
parameters from it, ``ModelConfig.layout``)."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.d_model, config.d_model)  # back into the residual stream
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, H, T, D): heads become a batch dimension for the attention kernel.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # is_causal builds the lower-triangular mask inside the kernel, so no (T, T) mask buffer is stored.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, H, T, D) -> (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward layer, 4x wider than the model, with GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # Normalising the input of each branch (not the sum) keeps a clean residual path from the
        # embeddings to the output, which is what makes deep and small-batch training stable.
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Byte-level decoder-only transformer.

    ``GPT(config)`` initialises from the global torch RNG, like any ``nn.Module``; use ``init_gpt`` for an
    initialisation that depends only on a seed.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(VOCAB_SIZE, config.d_model)  # byte -> vector; reused as the output layer
        self.wpe = nn.Embedding(config.seq_len, config.d_model)  # position -> vector, learned
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        # No separate lm_head module: the output projection is F.linear with wte.weight (weight tying).
        # Tying saves V*C parameters and, because the weight is held once, the state_dict has no aliased
        # entries, so safetensors, checkpoints and per-parameter outer optimizers see each tensor once.
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter in place: GPT-2 style, drawn from ``generator`` (or the global RNG).

        Parameters are visited in ``named_parameters`` order, so one generator state gives one model.
        """
        # Each residual branch adds to the stream; scaling its output projection by 1/sqrt(2 * n_layer)
        # (two branches per block) keeps the stream's variance independent of depth at init.
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.normal_(0.0, resid_std, generator=generator)
                elif name.endswith(".weight") and p.dim() == 2:  # Linear and Embedding weights
                    p.normal_(0.0, 0.02, generator=generator)
                elif name.startswith("ln_f.") or ".ln_" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)  # LayerNorm starts as plain normalisation
                else:
                    assert name.endswith(".bias"), name
                    p.zero_()

    def num_params(self) -> int:
        """Number of parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits for the next byte at every position, and the mean cross-entropy if ``targets`` is given.

        Args:
            idx: (B, T) int64 byte values, T <= seq_len.
            targets: (B, T) int64 next bytes, or None.

        Returns:
            ``logits`` of shape (B, T, 256) and ``loss`` (a scalar, in nats per byte) or None.
        """
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence of length {T} is longer than the model's seq_len {self.config.seq_len}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) broadcast -> (B, T, C)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = F.linear(x, self.wte.weight)  # (B, T, C) @ (C, V) -> (B, T, V), the tied output layer
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, VOCAB_SIZE), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.8,
        top_k: int | None = 40,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue each row of ``idx`` (B, T) by ``max_new_tokens`` sampled bytes; returns (B, T + max_new_tokens).

        ``temperature`` divides the logits (0 means greedy: always the most likely byte); ``top_k`` keeps only
        the k most likely bytes before sampling (None keeps all). Pass a seeded ``generator`` for a repeatable
        sample. Runs in eval mode (no dropout) and restores the previous mode afterwards.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                # The model has only seq_len position embeddings, so condition on the last seq_len bytes.
                context = idx[:, -self.config.seq_len :]
                logits, _ = self(context)
                logits = logits[:, -1, :]  # (B, V): only the prediction for the next byte matters
                if temperature == 0:
                    next_byte = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < VOCAB_SIZE:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_byte = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
                idx = torch.cat((idx, next_byte), dim=1)
        finally:
            self.train(was_training)
        return idx


def init_gpt(config: GPTConfig, *, seed: int) -> GPT:
    """A GPT whose initial parameters depend only on ``seed``: not on, and not changing, the global RNG.

    Every site builds its replica with the same seed and so starts from identical parameters without a
    broadcast.
    """
    # The constructor's default init draws from the global RNG; save and restore its state so the caller's
    # RNG is untouched, then overwrite every parameter from the seeded generator. (Building on the meta
    # device would avoid the wasted draws, but its first use imports torch._dynamo: seconds per process.)
    state = torch.get_rng_state()
    try:
        model = GPT(config)
    finally:
        torch.set_rng_state(state)
    model.init_weights(generator=torch.Generator(device="cpu").manual_seed(seed))
    return model
