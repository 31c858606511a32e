"""Hugging Face causal language models as geotrain workloads: build, tokenize, train, export.

``model.arch = "hf:TYPE"`` builds a ``transformers`` causal LM of that ``model_type`` (llama, qwen2, gpt2, ...)
from the ``[model]`` sizes, with no download: ``AutoConfig.for_model`` plus ``AutoModelForCausalLM.from_config``,
initialised from ``run.seed`` so that every site starts from the same parameters. ``model.arch = "hf:PATH"``
loads a local directory with ``from_pretrained`` (or, when it holds only a ``config.json``, initialises that
architecture from the seed). ``[model.hf]`` writes any other transformers config value over the mapped ones.

How the ``[model]`` sizes map onto a transformers config (each only where the model type has that setting;
``attribute_map`` translates names such as GPT-2's ``n_embd``):

=================  ==============================================================================
``d_model``        ``hidden_size`` (and OPT's ``word_embed_proj_dim``)
``n_layer``        ``num_hidden_layers``
``n_head``         ``num_attention_heads``, ``num_key_value_heads`` (no grouped-query attention),
                   ``head_dim = d_model / n_head``
``4 * d_model``    the MLP width: ``intermediate_size``, ``n_inner``, ``ffn_dim`` or ``ffn_hidden_size``
``seq_len``        ``max_position_embeddings``
``dropout``        ``attention_dropout``, ``hidden_dropout``, ``resid_pdrop``, ``embd_pdrop``,
                   ``attn_pdrop``, ``dropout``
the tokenizer      ``vocab_size`` (256 for bytes) and the bos, eos and pad token ids
=================  ==============================================================================

Tokenization: byte-level by default (token id = byte value, the same prepared corpus and windows as the demo
GPT). ``data.tokenizer = DIR`` (or the tokenizer inside an ``hf:PATH`` directory) tokenizes the prepared corpus
once into ``OUT/data/tokens/`` (``uint16`` or ``uint32`` ids, memory-mapped); batches are then windows of
``seq_len`` tokens, drawn by the same sampler, and the eval batches are fixed windows of the held-out tokens.

The loss is the mean cross-entropy of every position's next token (the logits of the model against the
window shifted by one), the same measure as the demo GPT's; the eval loss of a run is its mean over the eval
batches. At the end the run writes ``OUT/hf/``: the global model through ``save_pretrained`` (config.json and
safetensors; tied embeddings stored as transformers stores them) and its tokenizer (the given one, or a
byte-level one whose ids are the byte values), so ``AutoModelForCausalLM.from_pretrained(OUT/hf)`` and
``AutoTokenizer.from_pretrained(OUT/hf)`` load it with no geotrain code.

``import geotrain`` never imports transformers; this module imports it on first use, and says how to install
it when it is missing.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geotrain.config import Config, load_config
from geotrain.errors import ConfigError
from geotrain.files import atomic_write

__all__ = [
    "BYTE_VOCAB",
    "build_model",
    "byte_tokenizer",
    "causal_lm_loss",
    "export_hf",
    "hf_config",
    "hf_layout",
    "hf_workload",
    "load_tokenizer",
    "prepare_tokens",
    "run_eval_batches",
    "token_corpus",
    "tokenizer_dir",
]

BYTE_VOCAB = 256
"""Token ids of the byte-level default: one per byte value."""
EXPORT_DIR = "hf"
"""The export's directory inside the run's output directory."""
TOKENS_DIR = "tokens"
"""Where a tokenized corpus is kept, inside the prepared corpus directory."""

_INSTALL = "pip install 'geotrain[hf]'"
_WIDTH = ("hidden_size", "word_embed_proj_dim")
_MLP = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
_DROPOUT = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout")
_SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENS_FORMAT = 1


# -- transformers, imported on first use -----------------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"needs the transformers package, which is not installed; install it with {_INSTALL}",
                          field="model.arch") from None
    return transformers


def _quiet() -> None:
    """In a site's worker process: no progress bars (a tqdm lock is a semaphore that a worker, which ends with
    os._exit, would leave behind) and only transformers' errors in its log."""
    transformers = _transformers()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _causal_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# -- where the model and the tokenizer come from ---------------------------------------------------------------


def model_path(config: Config) -> Path | None:
    """The local directory of ``model.arch = "hf:PATH"`` (a name with a "/" or starting with "." or "~"), or
    None for ``hf:TYPE``."""
    rest = config.model.arch.removeprefix("hf:").strip()
    if "/" in rest or os.sep in rest or rest.startswith((".", "~")):
        return Path(rest).expanduser()
    return None


def _has_weights(path: Path) -> bool:
    return any(f.suffix in _WEIGHT_SUFFIXES and f.is_file() for f in path.iterdir())


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def tokenizer_dir(config: Config) -> Path | None:
    """The tokenizer directory a run uses, or None for byte-level ids: ``data.tokenizer``, else the ``hf:PATH``
    directory when it holds a tokenizer. ConfigError if the given directory holds none."""
    given = config.data.tokenizer
    if given == "bytes":
        return None
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_dir() or not _has_tokenizer(path):
            what = "is not a directory" if not path.is_dir() else f"holds none of {', '.join(_TOKENIZER_FILES)}"
            raise ConfigError(f"{given!r} {what}; give a local tokenizer directory (one that "
                              "AutoTokenizer.from_pretrained reads, such as a save_pretrained output), or \"bytes\" "
                              "for byte-level ids", field="data.tokenizer")
        return path
    path = model_path(config)
    if path is not None and path.is_dir() and _has_tokenizer(path):
        return path
    return None


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str) -> Any:
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same bad input
        raise ConfigError(f"cannot load a tokenizer from {path!r} ({type(e).__name__}: {_short(e)})",
                          field="data.tokenizer") from None


def load_tokenizer(config: Config) -> Any:
    """The run's tokenizer (a transformers tokenizer), or None for byte-level ids."""
    path = tokenizer_dir(config)
    return None if path is None else _load_tokenizer(str(path.resolve()))


def byte_tokenizer() -> Any:
    """A transformers tokenizer whose ids are the bytes of the UTF-8 text (what a byte-level run trained on),
    saved with the export so that ``AutoTokenizer.from_pretrained(OUT/hf)`` reads and writes text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    transformers = _transformers()
    # GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer emits), mapped to its value.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(BYTE_VOCAB):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(BYTE_VOCAB + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(BYTE_VOCAB)}, merges=[]))  # no merges: one id a byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


# -- the transformers config -----------------------------------------------------------------------------------


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _vocab(config: Config) -> tuple[int, dict[str, Any]]:
    """The vocabulary size and the special token ids (only those the tokenizer has) of the run's tokenizer."""
    tok = load_tokenizer(config)
    if tok is None:
        return BYTE_VOCAB, {}
    return len(tok), {k: getattr(tok, k) for k in _SPECIAL if getattr(tok, k, None) is not None}


def _in_vocab(value: Any, vocab: int) -> Any:
    """A default special token id, or None (lists: the ids kept) where it falls outside the vocabulary."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < vocab else None
    if isinstance(value, list):
        kept = [v for v in value if isinstance(v, int) and 0 <= v < vocab]
        return kept or None
    return value


def _key(config: Config) -> str:
    """What the model depends on, as one string (a cache key): [model] and the tokenizer's files."""
    tok = tokenizer_dir(config)
    files = []
    if tok is not None:
        for f in sorted(tok.iterdir()):
            if f.is_file():
                st = f.stat()
                files.append([f.name, st.st_size, st.st_mtime_ns])
    model = {k: getattr(config.model, k) for k in ("arch", "n_layer", "n_head", "d_model", "seq_len", "dropout", "hf")}
    return json.dumps({"model": model, "cwd": os.getcwd(), "tokenizer": str(tok.resolve()) if tok else None,
                       "files": files}, sort_keys=True)


def hf_config(config: Config) -> Any:
    """The transformers ``PretrainedConfig`` of the run's model (a fresh copy); ConfigError naming the field
    when the type is unknown, a value is refused or transformers is missing."""
    key = _key(config)
    if key not in _CONFIGS:
        _CONFIGS[key] = _new_hf_config(config)
    return copy.deepcopy(_CONFIGS[key])


_CONFIGS: dict[str, Any] = {}
"""Configs built in this process, by ``_key`` (the launcher asks for the layout more than once)."""


def _new_hf_config(config: Config) -> Any:
    transformers = _transformers()
    vocab, special = _vocab(config)
    path = model_path(config)
    m = config.model
    if path is not None:
        if not (path / "config.json").is_file():
            raise ConfigError(f"{str(path)!r} holds no config.json; give a directory written by save_pretrained, or "
                              "hf:TYPE (such as hf:llama) to build a model from the [model] sizes",
                              field="model.arch")
        try:
            hf = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, **m.hf)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"cannot read the model config in {str(path)!r} ({type(e).__name__}: {_short(e)})",
                              field="model.arch") from None
        return _fits(hf, config, vocab)
    model_type = m.arch.removeprefix("hf:").strip()
    types = _causal_types()
    if model_type not in types:
        close = difflib.get_close_matches(model_type.lower(), types, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(f'hf:{c}' for c in close)}? " if close else ""
        raise ConfigError(f"transformers {transformers.__version__} knows no causal language model of type "
                          f"{model_type!r}; {hint}for example hf:llama, hf:qwen2, hf:gpt2 or hf:mistral "
                          "(a local directory is hf:./DIR)", field="model.arch")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    names = {n for n, p in inspect.signature(cls.__init__).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    aliases = dict(getattr(cls, "attribute_map", None) or {})
    defaults = cls()
    d = m.d_model
    wanted: dict[str, Any] = {"vocab_size": vocab, "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
                              "num_key_value_heads": m.n_head, "head_dim": d // m.n_head,
                              "max_position_embeddings": m.seq_len}
    wanted |= {k: d for k in _WIDTH} | {k: 4 * d for k in _MLP} | {k: float(m.dropout) for k in _DROPOUT}
    for k in _SPECIAL:
        wanted[k] = special.get(k) if special else _in_vocab(getattr(defaults, k, None), vocab)
    kwargs: dict[str, Any] = {}
    for k, v in wanted.items():
        name = aliases.get(k, k)
        if name in names and name not in kwargs:
            kwargs[name] = v
    for k, v in m.hf.items():
        name = aliases.get(k, k)
        if name not in names and not hasattr(defaults, k) and not _consumed(model_type, k, v):
            close = difflib.get_close_matches(k, sorted(names | set(aliases)), n=1)
            hint = f"did you mean model.hf.{close[0]}? " if close else ""
            raise ConfigError(f"is no setting of transformers' {cls.__name__}; {hint}see its documentation for the "
                              "settings of this model type", field=f"model.hf.{k}")
        kwargs[name] = v
    try:
        hf = transformers.AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:  # noqa: BLE001 - a value transformers refuses
        raise ConfigError(f"transformers refused the {model_type} config ({type(e).__name__}: {_short(e)}); check "
                          "the [model] sizes and [model.hf]", field="model.hf" if m.hf else "model.arch") from None
    return _fits(hf, config, vocab)


def _fits(hf: Any, config: Config, vocab: int) -> Any:
    """``hf``, once its vocabulary holds every id of the run's data and its positions a whole window."""
    where = f"the model in {str(model_path(config))!r}" if model_path(config) else "the model"
    model_vocab = getattr(hf, "vocab_size", None)
    if isinstance(model_vocab, int) and model_vocab < vocab:
        tok = tokenizer_dir(config)
        what = "byte-level ids (256)" if tok is None else f"the {vocab} ids of the tokenizer in {str(tok)!r}"
        raise ConfigError(f"{where} has a vocabulary of {model_vocab}, too small for {what}; give the model's own "
                          "tokenizer with data.tokenizer (or a larger model.hf.vocab_size)", field="data.tokenizer")
    limit = getattr(hf, "max_position_embeddings", None)
    if isinstance(limit, int) and config.model.seq_len > limit:
        raise ConfigError(f"is {config.model.seq_len}, longer than the {limit} positions of {where}; lower it to "
                          f"{limit} or less", field="model.seq_len")
    return hf


def _consumed(model_type: str, key: str, value: Any) -> bool:
    """Whether the config's constructor takes ``key`` although it is no field of it (a former name it
    converts, such as rope_theta into rope_parameters); a key it only stores as an extra attribute is a typo."""
    from transformers import AutoConfig

    try:
        return not hasattr(AutoConfig.for_model(model_type, **{key: value}), key)
    except Exception:  # noqa: BLE001 - refused outright: not a setting it takes
        return False


# -- the model -------------------------------------------------------------------------------------------------


def build_model(config: Config, *, seed: int | None = None, device: str = "cpu") -> nn.Module:
    """The run's transformers model in float32 on ``device``, in training mode: loaded from an ``hf:PATH``
    directory that holds weights, else initialised from ``seed`` (default ``run.seed``) without touching the
    caller's random state, so every site builds the same model."""
    transformers = _transformers()
    cfg = hf_config(config)
    path = model_path(config)
    # Seeded even when loading: tensors a checkpoint lacks are initialised, and must be the same on every site.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed if seed is None else seed)
        if path is not None and _has_weights(path):
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(str(path), config=cfg,
                                                                          local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"cannot load the model in {str(path)!r} ({type(e).__name__}: {_short(e)})",
                                  field="model.arch") from None
        else:
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    return model.float().to(device).train()


def hf_layout(config: Config) -> list[tuple[str, int]]:
    """(name, numel) of every trainable parameter of the run's model, in ``named_parameters`` order (a tied
    embedding once), read from the model built on the meta device: no memory, no weights read."""
    key = _key(config)
    if key not in _LAYOUTS:
        transformers = _transformers()
        cfg = hf_config(config)
        try:
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(cfg)
        except Exception as e:  # noqa: BLE001 - sizes the config took but the model cannot be built with
            raise ConfigError(f"transformers cannot build this {cfg.model_type} model ({type(e).__name__}: "
                              f"{_short(e)}); check the [model] sizes and [model.hf]",
                              field="model.hf" if config.model.hf else "model.arch") from None
        _LAYOUTS[key] = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return list(_LAYOUTS[key])


_LAYOUTS: dict[str, list[tuple[str, int]]] = {}


def causal_lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean cross-entropy of the next token at every position: ``x`` (B, T) ids, ``y`` (B, T) the ids one
    further (the demo GPT's measure, so the two compare)."""
    x, y = batch
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def export_hf(config: Config, directory: Path, params: list[Tensor]) -> Path:
    """Write ``directory/hf``: the model with ``params`` (its trainable parameters in ``named_parameters``
    order) through ``save_pretrained``, and its tokenizer. Written beside and then moved into place, so a
    reader never sees half an export."""
    model = build_model(config, device="cpu")
    named = [p for p in model.parameters() if p.requires_grad]
    if len(named) != len(params):
        raise ValueError(f"the export got {len(params)} tensors for a model of {len(named)} parameters")
    with torch.no_grad():
        for p, t in zip(named, params):
            p.copy_(t.detach().to("cpu", torch.float32))
    model.eval()
    target = Path(directory) / EXPORT_DIR
    tmp = Path(directory) / f".{EXPORT_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok = load_tokenizer(config)
    (byte_tokenizer() if tok is None else tok).save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


# -- data ------------------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tokens_origin(tok_dir: Path, data_dir: Path) -> dict[str, Any]:
    """What a tokenized corpus was made from: the prepared bytes (their sha256, from corpus.json) and the
    tokenizer's files (names and sha256)."""
    meta = json.loads((data_dir / "corpus.json").read_text())
    files = {f.name: _file_digest(f) for f in sorted(tok_dir.iterdir()) if f.is_file()}
    return {"train": meta.get("train_sha256"), "val": meta.get("val_sha256"), "tokenizer": files}


def _encode(tokenizer: Any, data: np.ndarray, *, chunk: int = 1 << 20) -> np.ndarray:
    """Token ids of the UTF-8 text ``data`` (bytes), encoded in pieces of about ``chunk`` bytes cut after a
    newline (a token never spans a cut: the text is cut where a tokenizer splits words anyway)."""
    raw = bytes(data)
    pieces, start = [], 0
    while start < len(raw):
        end = min(len(raw), start + chunk)
        if end < len(raw):
            nl = raw.rfind(b"\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(raw[start:end].decode("utf-8", errors="replace"))
        start = end
    parts = [np.zeros(0, dtype=np.int64)]
    for i in range(0, len(pieces), 16):  # a few MB of text at a time: the ids as Python ints stay small
        rows = tokenizer(pieces[i:i + 16], add_special_tokens=False)["input_ids"]
        parts += [np.asarray(row, dtype=np.int64) for row in rows]
    return np.concatenate(parts)


def prepare_tokens(config: Config, data_dir: Path) -> Path | None:
    """Tokenize the prepared byte corpus in ``data_dir`` with the run's tokenizer into ``data_dir/tokens``
    (reused while the bytes and the tokenizer's files are unchanged); None for byte-level ids."""
    tok_dir = tokenizer_dir(config)
    if tok_dir is None:
        return None
    out = Path(data_dir) / TOKENS_DIR
    origin = _tokens_origin(tok_dir, Path(data_dir))
    try:
        meta = json.loads((out / "tokens.json").read_text())
        if meta.get("format") == _TOKENS_FORMAT and meta.get("origin") == origin and all(
                (out / f"{s}.bin").stat().st_size == meta[f"{s}_tokens"] * np.dtype(meta["dtype"]).itemsize
                for s in ("train", "val")):
            return out
    except (OSError, ValueError, KeyError, TypeError):
        pass
    from geotrain.data.corpus import open_corpus

    tokenizer = load_tokenizer(config)
    corpus = open_corpus(Path(data_dir))
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": _TOKENS_FORMAT, "origin": origin, "dtype": dtype.name, "vocab": vocab,
            "tokenizer": str(tok_dir), "source": f"{corpus.source}, tokenized by {tok_dir.name}"}
    for split, arr in (("train", corpus.train), ("val", corpus.val)):
        ids = _encode(tokenizer, arr)
        buf = ids.astype(dtype).tobytes()
        atomic_write(out / f"{split}.bin", lambda f, buf=buf: f.write(buf))
        meta[f"{split}_tokens"] = int(ids.size)
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(out / "tokens.json", lambda f: f.write(text.encode()))  # last: the commit marker
    return out


def token_corpus(config: Config, data_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(train ids, held-out ids, a description): the prepared bytes themselves, or their tokens."""
    from geotrain.data.corpus import open_corpus

    tokens = prepare_tokens(config, data_dir)
    if tokens is None:
        corpus = open_corpus(Path(data_dir))
        return corpus.train, corpus.val, f"{corpus.source} (byte-level)"
    meta = json.loads((tokens / "tokens.json").read_text())
    arrays = []
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        arrays.append(np.memmap(tokens / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,)) if n
                      else np.zeros(0, dtype=meta["dtype"]))
    return arrays[0], arrays[1], meta["source"]


def _eval_batches(config: Config, val: np.ndarray) -> list[tuple[Tensor, Tensor]]:
    from geotrain.data.corpus import eval_batches

    try:
        return eval_batches(val, batch_size=config.data.batch_size, seq_len=config.model.seq_len,
                            n_batches=config.run.eval_batches)
    except ValueError as e:
        raise ConfigError(f"the held-out split is too small for one eval batch ({e})", field="data.path") from None


def run_eval_batches(run_dir: str | Path) -> list[tuple[Tensor, Tensor]]:
    """The eval batches of the finished run in ``run_dir`` (its config.json and prepared corpus): the windows
    its eval loss was measured on, to score the export against."""
    run_dir = Path(run_dir)
    tree = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    config = load_config(values=tree)
    _, val, _ = token_corpus(config, run_dir / "data")
    return _eval_batches(config, val)


# -- the workload ----------------------------------------------------------------------------------------------


def hf_workload(config: Config, *, worker: int, device: str = "cpu", data_dir: Path | None = None) -> Any:
    """The run's transformers model on the prepared corpus (bytes or tokens): a ``Workload`` with the demo's
    sampler and eval windows, and an export to ``OUT/hf``. ``worker`` is the worker's index in the whole run."""
    from geotrain.data.corpus import BatchSampler
    from geotrain.train.workload import Workload, prepare_corpus

    _quiet()
    if data_dir is None:  # under torchrun each site prepares its own copy
        data_dir = prepare_corpus(config, Path(config.run.out) / "data")
    if worker == 0:  # an export of an earlier run in this directory must not outlive this run's start
        shutil.rmtree(Path(config.run.out) / EXPORT_DIR, ignore_errors=True)
    model = build_model(config, device=device)
    train, val, source = token_corpus(config, Path(data_dir))
    seq_len, batch_size = config.model.seq_len, config.data.batch_size
    if len(train) < seq_len + 1:
        raise ConfigError(f"the training split holds {len(train)} tokens, fewer than one window of seq_len + 1 = "
                          f"{seq_len + 1}; give more text or lower model.seq_len", field="data.path")
    sampler = BatchSampler(train, batch_size=batch_size, seq_len=seq_len, seed=config.run.seed * 1_000_003 + worker)

    def stream() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            x, y = sampler.next()
            yield x.to(device), y.to(device)

    return Workload(
        model=model,
        loss=causal_lm_loss,
        batches=stream(),
        tokens_per_batch=batch_size * seq_len,
        eval_batches=[(x.to(device), y.to(device)) for x, y in _eval_batches(config, val)],
        meta={"data": source, "model": config.model.arch, "model_type": getattr(model.config, "model_type", None),
              "model_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "tokenizer": str(tokenizer_dir(config) or "bytes")},
        data_state=sampler.state_dict,
        load_data_state=sampler.load_state_dict,
        export=functools.partial(export_hf, config),
    )
