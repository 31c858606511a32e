"""How Streaming DiLoCo splits a model into fragments."""

from __future__ import annotations

import pytest

from geotrain.algorithms.streaming import split_fragments
from geotrain.models.gpt import GPT, GPTConfig


def _named(n_layer: int) -> tuple[list[str], list[int]]:
    model = GPT(GPTConfig(n_layer=n_layer))
    named = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [k for _, k in named]


def _check_partition(groups, n):
    assert sorted(i for g in groups for i in g) == list(range(n))


def test_layers_are_strided_when_there_are_enough():
    names, sizes = _named(8)
    groups = split_fragments(names, 4, sizes)
    _check_partition(groups, len(names))
    for k, g in enumerate(groups):
        layers = {int(names[i].split(".")[1]) for i in g if names[i].startswith("blocks.")}
        assert layers == {k, k + 4}  # layer i in fragment i mod P
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) / min(loads) < 1.1  # embeddings went to the lightest fragments


def test_fewer_layers_than_fragments_balances_tensors():
    names, sizes = _named(2)
    groups = split_fragments(names, 4, sizes)
    _check_partition(groups, len(names))
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) / min(loads) < 1.2
    assert max(loads) < 0.27 * sum(sizes)  # the peak payload is about a quarter of the model's


def test_too_many_fragments_is_refused():
    with pytest.raises(ValueError, match="fewer than 5 fragments"):
        split_fragments(["a", "b", "c", "d"], 5)
