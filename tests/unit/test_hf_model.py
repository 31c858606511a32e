"""Hugging Face causal LMs as a model (``geotrain.models.hf``): the config mapping, the layout the launcher and
the planner read, seeded builds, mistakes as ConfigErrors, tokenization, the workload and its hf/ export.
All in process; the run across site processes is tests/distributed/test_hf_run.py."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from geotrain.config import load_config  # noqa: E402
from geotrain.errors import ConfigError  # noqa: E402
from geotrain.models import hf  # noqa: E402

TINY = {"model.arch": "hf:llama", "model.d_model": 32, "model.n_layer": 1, "model.n_head": 2, "model.seq_len": 32,
        "data.batch_size": 4, "run.eval_batches": 2}


def tiny(**values):
    return load_config(values={**TINY, **values})


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """About 120 KB of Python source: enough for both splits of a corpus, cheap to tokenize."""
    path = tmp_path_factory.mktemp("data") / "source.txt"
    path.write_bytes(Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_bytes()[:120_000])
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, text_file) -> Path:
    """A byte-level BPE of 300 ids with an end-of-text token, trained here (no hub): ids above 255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text_file.read_text()[:20_000]], trainer=trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def test_validating_an_hf_config_does_not_import_transformers():
    code = ("import sys, geotrain, geotrain.cli, geotrain.api; from geotrain.config import load_config; "
            "load_config(values={'model.arch': 'hf:llama', 'model.hf': {'rope_theta': 1e4}}); "
            "print('transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_model_sizes_map_onto_the_transformers_config():
    llama = hf.hf_config(tiny(**{"model.dropout": 0.1}))
    assert (llama.model_type, llama.hidden_size, llama.num_hidden_layers) == ("llama", 32, 1)
    assert llama.num_attention_heads == 2
    assert (llama.num_key_value_heads, llama.head_dim, llama.intermediate_size) == (2, 16, 128)
    assert (llama.max_position_embeddings, llama.vocab_size, llama.attention_dropout) == (32, 256, 0.1)
    gpt2 = hf.hf_config(tiny(**{"model.arch": "hf:gpt2"}))  # GPT-2's own names, through its attribute_map
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_positions, gpt2.n_inner) == (32, 1, 2, 32, 128)
    assert gpt2.bos_token_id is None and gpt2.eos_token_id is None  # its 50256 is no byte
    qwen2 = hf.hf_config(tiny(**{"model.arch": "hf:qwen2"}))
    assert qwen2.num_key_value_heads == 2 and qwen2.vocab_size == 256
    given = hf.hf_config(tiny(**{"model.hf": {"intermediate_size": 48, "tie_word_embeddings": True}}))
    assert given.intermediate_size == 48 and given.tie_word_embeddings is True


@pytest.mark.parametrize("arch, hf_values", [("hf:llama", {}), ("hf:gpt2", {}), ("hf:qwen2", {}),
                                              ("hf:llama", {"tie_word_embeddings": True})])
def test_the_layout_is_the_real_models_trainable_parameters(arch, hf_values):
    config = tiny(**{"model.arch": arch, "model.hf": hf_values})
    model = hf.build_model(config)
    real = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    layout = config.layout()
    assert list(layout.tensors) == real
    assert layout.params == sum(p.numel() for p in model.parameters())  # a tied embedding counted once
    if model.config.tie_word_embeddings:
        assert not any(n.startswith("lm_head") for n, _ in real)


def test_every_site_builds_the_same_model_without_touching_the_callers_random_state():
    config = tiny()
    before = torch.get_rng_state()
    a, b = hf.build_model(config), hf.build_model(config)
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = hf.build_model(config, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("values, field, words", [
    ({"model.arch": "hf:lama"}, "model.arch", ["hf:llama"]),
    ({"model.arch": "llama"}, "model.arch", ["did you mean 'hf:llama'"]),
    ({"model.arch": "hf:./no-such-model"}, "model.arch", ["config.json"]),
    ({"model.hf": {"intermediate_sise": 8}}, "model.hf.intermediate_sise", ["intermediate_size"]),
    ({"model.hf": {"num_attention_heads": 3}}, "model.hf", ["attention heads"]),
    ({"model.hf": {"hidden_act": "no-such-activation"}}, "model.hf", ["no-such-activation"]),
    ({"model.hf": {"x": float("nan")}}, "model.hf.x", ["finite"]),
    ({"model.arch": "gpt", "model.hf": {"rope_theta": 1e4}}, "model.hf", ["hf:llama"]),
    ({"model.arch": "gpt", "data.tokenizer": "tok"}, "data.tokenizer", ["Hugging Face"]),
    ({"data.tokenizer": "no/such/tokenizer"}, "data.tokenizer", ["not a directory"]),
])
def test_mistakes_are_config_errors_naming_the_field(values, field, words):
    with pytest.raises(ConfigError) as e:
        tiny(**values).layout()
    assert e.value.field == field
    for w in words:
        assert w in str(e.value)


def test_without_transformers_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'geotrain\[hf\]'") as e:
        tiny(**{"model.d_model": 48}).layout()  # a size no other test built: nothing cached
    assert e.value.field == "model.arch"


def test_the_cli_takes_model_and_refuses_an_unknown_type_in_one_line(tmp_path, monkeypatch, capsys):
    from geotrain.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--model", "hf:lama", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.arch:") and "hf:llama" in err and "\n" not in err
    assert main(["run", "--model", "hf:llama", "--set", "model.d_model=32", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["arch"] == "hf:llama"


def test_the_byte_tokenizer_ids_are_the_bytes(tmp_path):
    text = "def café():\n\treturn '🙂'\x00"
    tok = hf.byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode()) and len(tok) == 256
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.decode(ids) == text


def test_a_tokenizer_directory_tokenizes_the_corpus_once(tmp_path, text_file, tokenizer_dir):
    from geotrain.train.workload import prepare_corpus

    config = tiny(**{"data.path": str(text_file), "data.tokenizer": str(tokenizer_dir)})
    data = prepare_corpus(config, tmp_path / "data")
    marker = data / "tokens" / "tokens.json"
    written = marker.stat().st_mtime_ns
    train, val, source = hf.token_corpus(config, data)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert train.dtype == "uint16" and int(train.max()) < len(tok) == 300 and int(train.max()) > 255
    assert tok.decode(train[:300].tolist()) == text_file.read_text()[:len(tok.decode(train[:300].tolist()))]
    assert val.size > 0 and "tokenized" in source
    prepare_corpus(config, data)
    assert marker.stat().st_mtime_ns == written  # reused: same bytes, same tokenizer
    cfg = hf.hf_config(config)
    assert cfg.vocab_size == 300 and cfg.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("arch, tokenized", [("hf:llama", True), ("hf:gpt2", False)])
def test_the_workload_trains_and_its_export_reloads_with_from_pretrained(tmp_path, text_file, tokenizer_dir,
                                                                          arch, tokenized):
    from geotrain.train.workload import demo_workload, prepare_corpus

    values = {"model.arch": arch, "data.path": str(text_file), "run.out": str(tmp_path)}
    if tokenized:
        values["data.tokenizer"] = str(tokenizer_dir)
    config = tiny(**values)
    w = demo_workload(config, worker=0, data_dir=prepare_corpus(config, tmp_path / "data"))  # dispatches on arch
    assert w.tokens_per_batch == 4 * 32 and w.meta["model_params"] == config.layout().params
    x, y = next(w.batches)
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    optimizer = torch.optim.AdamW(w.model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        w.loss(w.model, next(w.batches)).backward()
        optimizer.step()
    w.model.eval()
    with torch.no_grad():
        mine = sum(float(w.loss(w.model, b)) for b in w.eval_batches) / len(w.eval_batches)
    w.export(tmp_path, [p.detach() for p in w.model.parameters()])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        theirs = sum(float(hf.causal_lm_loss(model, b)) for b in w.eval_batches) / len(w.eval_batches)
    assert abs(mine - theirs) < 1e-6
    assert model.config.tie_word_embeddings == (arch == "hf:gpt2")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert len(tok) == (300 if tokenized else 256)
    assert not list(tmp_path.glob(".hf-*"))  # the export was moved into place


def test_an_hf_path_directory_is_loaded_with_its_weights_and_tokenizer(tmp_path, tokenizer_dir):
    source = hf.build_model(tiny(**{"data.tokenizer": str(tokenizer_dir)}), seed=5)
    source.save_pretrained(tmp_path / "m")
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "m")
    config = tiny(**{"model.arch": f"hf:{tmp_path / 'm'}"})
    assert hf.tokenizer_dir(config) == tmp_path / "m"  # its own tokenizer, unless data.tokenizer says otherwise
    loaded = hf.build_model(config, seed=0)  # the weights, not the seed
    assert all(torch.equal(p, q) for p, q in zip(source.parameters(), loaded.parameters()))
    assert list(config.layout().tensors) == [(n, p.numel()) for n, p in loaded.named_parameters()]
    with pytest.raises(ConfigError) as e:
        tiny(**{"model.arch": f"hf:{tmp_path / 'm'}", "model.seq_len": 64}).layout()
    assert e.value.field == "model.seq_len"
    byte_model = tmp_path / "bytes"
    hf.build_model(tiny()).config.save_pretrained(byte_model)  # a config only: initialised from the seed
    config = tiny(**{"model.arch": f"hf:{byte_model}"})
    assert all(torch.equal(p, q) for p, q in zip(hf.build_model(config).parameters(),
                                                  hf.build_model(tiny()).parameters()))
    with pytest.raises(ConfigError) as e:  # 256 ids cannot take a tokenizer of 300
        tiny(**{"model.arch": f"hf:{byte_model}", "data.tokenizer": str(tokenizer_dir)}).layout()
    assert e.value.field == "data.tokenizer" and "300" in str(e.value)


def test_sample_points_an_hf_run_at_its_export(tmp_path, capsys):
    from geotrain.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model": {"arch": "hf:llama", "n_layer": 1}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["sample", str(tmp_path), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert "AutoModelForCausalLM.from_pretrained" in err and str(tmp_path / "hf") in err
