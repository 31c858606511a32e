"""The demo byte-level GPT: shapes, initial loss, parameter count, seeded init and sampling, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from geotrain.models.gpt import GPT, VOCAB_SIZE, GPTConfig, init_gpt

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These models are tiny: on a busy 2-core machine, intra-op threads mostly wait on each other
    # (the guide's one-thread rule). Restore the setting so other test modules are unaffected.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_batch(seed: int, batch: int = 8, seq_len: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, seq_len), generator=g), torch.randint(
        0, VOCAB_SIZE, (batch, seq_len), generator=g
    )


def test_forward_shapes_and_loss_only_with_targets() -> None:
    model = init_gpt(GPTConfig(), seed=0)
    x, y = _random_batch(0, batch=3, seq_len=17)
    logits, loss = model(x)
    assert logits.shape == (3, 17, VOCAB_SIZE)
    assert loss is None
    logits, loss = model(x, y)
    assert logits.shape == (3, 17, VOCAB_SIZE)
    assert loss is not None and loss.shape == ()


def test_loss_at_init_is_near_uniform_over_bytes() -> None:
    # Small init makes the first prediction close to uniform over 256 bytes: loss ~ ln(256) = 5.545 nats.
    x, y = _random_batch(1, batch=16, seq_len=128)
    for seed in range(3):
        _, loss = init_gpt(GPTConfig(), seed=seed)(x, y)
        assert abs(loss.item() - math.log(VOCAB_SIZE)) < 0.3


def test_param_count_matches_architecture() -> None:
    cfg = GPTConfig()
    c, n_layer = cfg.d_model, cfg.n_layer
    block = (2 * 2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    expected = VOCAB_SIZE * c + cfg.seq_len * c + n_layer * block + 2 * c  # tied output layer adds nothing
    model = init_gpt(cfg, seed=0)
    assert model.num_params() == expected == sum(p.numel() for p in model.parameters())
    assert 0.40e6 < expected < 0.50e6  # "about 0.46M" for the defaults


def test_same_seed_same_params_and_global_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a = init_gpt(GPTConfig(), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # init_gpt neither reads nor advances it
    torch.manual_seed(12345)  # a different global state must not matter
    b = init_gpt(GPTConfig(), seed=7)
    c = init_gpt(GPTConfig(), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["wte.weight"], sc["wte.weight"])


def test_init_statistics() -> None:
    model = init_gpt(GPTConfig(n_layer=4, d_model=128), seed=0)
    sd = model.state_dict()
    assert sd["wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert sd["blocks.0.attn.c_proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(sd["blocks.1.ln_1.weight"], torch.ones(128))
    assert torch.equal(sd["blocks.1.mlp.c_fc.bias"], torch.zeros(512))


def test_state_dict_has_no_aliased_tensors_and_round_trips_through_safetensors(tmp_path) -> None:
    model = init_gpt(GPTConfig(), seed=0)
    save_file(model.state_dict(), tmp_path / "m.safetensors")  # refuses shared tensors
    other = init_gpt(GPTConfig(), seed=1)
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x, _ = _random_batch(2)
    assert torch.equal(model(x)[0], other(x)[0])


def test_output_layer_is_tied_to_embedding() -> None:
    model = init_gpt(GPTConfig(), seed=0)
    x, y = _random_batch(3)
    _, loss = model(x, y)
    loss.backward()
    # The embedding's gradient includes the output layer's: rows of bytes never seen as input still get one.
    unseen = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    unseen[x.unique()] = False
    assert unseen.any()
    assert model.wte.weight.grad[unseen].abs().sum() > 0


def test_causality_future_bytes_do_not_change_past_logits() -> None:
    model = init_gpt(GPTConfig(), seed=0)
    x, _ = _random_batch(4, batch=2, seq_len=32)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % VOCAB_SIZE
    a, _ = model(x)
    b, _ = model(x2)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_too_long_input_is_rejected() -> None:
    model = init_gpt(GPTConfig(seq_len=16), seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_generate_length_and_determinism() -> None:
    model = init_gpt(GPTConfig(seq_len=16), seed=0)
    prompt = torch.tensor([list(b"def ")], dtype=torch.int64)  # (1, 4)
    # 30 new bytes runs past seq_len=16, exercising the context crop.
    a = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 34) and a.dtype == torch.int64
    assert torch.equal(a[:, :4], prompt)
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB_SIZE
    greedy = model.generate(prompt.repeat(2, 1), 5, temperature=0.0, top_k=None)
    assert greedy.shape == (2, 9) and torch.equal(greedy[0], greedy[1])


def test_generate_restores_training_mode() -> None:
    model = init_gpt(GPTConfig(dropout=0.1), seed=0)
    model.train()
    model.generate(torch.zeros(1, 1, dtype=torch.int64), 2, generator=torch.Generator().manual_seed(0))
    assert model.training


def test_a_few_adamw_steps_on_one_batch_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = init_gpt(GPTConfig(), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 2), dtype=torch.int64)
    x, y = text[:-1].view(1, -1), text[1:].view(1, -1)
    losses = []
    for _ in range(10):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"d_model": 130, "n_head": 4},
        {"n_layer": 0},
        {"n_head": -1},
        {"d_model": 0},
        {"seq_len": 0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"n_layer": 2.5},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="model\\."):
        GPTConfig(**kwargs)


def test_config_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        GPTConfig(2)  # type: ignore[misc]


def test_plain_constructor_uses_global_rng() -> None:
    torch.manual_seed(0)
    a = GPT(GPTConfig())
    torch.manual_seed(0)
    b = GPT(GPTConfig())
    assert torch.equal(a.wte.weight, b.wte.weight)
