"""Pretrained GPT-2: OpenAI's released weights, to and from the Hugging Face layout (chapter 8).

Hugging Face stores GPT-2 as a directory with ``config.json`` and ``model.safetensors``. Its
parameter names are the ones ``minigpt.GPT`` uses (``transformer.h.0.attn.c_attn.weight``, ...),
with two differences that this module undoes:

* GPT-2's linear layers are ``Conv1D`` modules whose weight is stored as (in, out), the
  transpose of ``nn.Linear``'s (out, in); so the four matrices per block (``attn.c_attn``,
  ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``) are transposed on the way in and out;
* the released files name parameters without the ``transformer.`` prefix (``h.0.ln_1.weight``),
  include the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` (not parameters: we
  ignore them) and leave out ``lm_head.weight`` (tied to the token embedding ``wte``).

Design choices:

* this module converts layouts only; reading a model directory (files present, hashes when
  a manifest records them, JSON) is ``minigpt.checkpoint.read_model_dir``, the one reader;
* ``from_pretrained`` is the public entry point for "give me a GPT": a GPT-2 size or hub id
  (downloaded through ``huggingface_hub``: its cache, ``HF_ENDPOINT`` for a mirror,
  ``HF_HUB_OFFLINE``), a Hugging Face directory, or one of minigpt's own model directories
  (``export_model``, loaded by ``minigpt.checkpoint.load_model``);
* ``load_hf`` builds the model on the ``meta`` device and assigns the loaded tensors (no
  random initialisation, no second copy), after checking the config's block count against
  the file's header, so a config claiming a billion layers allocates nothing;
* ``save_hf`` writes what ``transformers.GPT2LMHeadModel.from_pretrained`` loads, with
  end-of-text ids that exist in the model's vocabulary, plus the tokenizer files
  (``vocab.json``, ``merges.txt``) when the tokenizer is a byte-level BPE; ``load_tokenizer``
  reads those files back, so an exported model of ours and GPT-2 from the hub load through the
  same two calls (``from_pretrained``, ``load_tokenizer``). ``download`` fetches the tokenizer
  files too when the hub has them (GPT-2's are optional: the weights load without them).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from minigpt.atomic import atomic_write, atomic_write_text
from minigpt.checkpoint import (
    CheckpointError,
    check_block_count,
    is_minigpt_dir,
    load_model,
    read_model_dir,
    weight_shapes,
)
from minigpt.model import GPT, GPTConfig
from minigpt.registry import path as data_path
from minigpt.tokenizer import Tokenizer

HUB_REPOS = {  # the released sizes, as hosted on the Hugging Face Hub
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored (in, out)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
_FILES = ("config.json", "model.safetensors")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")  # GPT-2's byte-level BPE, as on the hub
GPT2_EOT = 50256  # GPT-2's <|endoftext|>, its only special token
# transformers' activation_function -> GPTConfig.gelu_approx ("gelu_new" is GPT-2's tanh form)
_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


class PretrainedError(CheckpointError):
    """Weights or a config that do not fit ``minigpt.GPT``, or a model that cannot be fetched."""


def config_from_hf(hf: Mapping) -> GPTConfig:
    """The ``GPTConfig`` of a Hugging Face GPT-2 ``config.json`` (a dict); checks what we assume."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"config.json: model_type must be 'gpt2', got {hf['model_type']!r}")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELUS:
        raise PretrainedError(
            f"config.json has activation_function={activation!r}; minigpt's GPT computes "
            f"with one of {sorted(_GELUS)}, so this checkpoint cannot be loaded exactly")
    checks = {  # key: (value minigpt computes with, default in transformers' GPT2Config)
        "layer_norm_epsilon": (1e-5, 1e-5),  # torch's nn.LayerNorm default, which GPT uses
        "scale_attn_weights": (True, True),
        "scale_attn_by_inverse_layer_idx": (False, False),
        "reorder_and_upcast_attn": (False, False),
        "tie_word_embeddings": (True, True),
    }
    for key, (ours, default) in checks.items():
        if hf.get(key, default) != ours:
            raise PretrainedError(
                f"config.json has {key}={hf[key]!r}, but minigpt's GPT computes with {ours!r}; "
                "this checkpoint is not a standard GPT-2 and cannot be loaded exactly"
            )
    sizes = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_layer": "n_layer",
             "n_head": "n_head", "n_embd": "n_embd"}
    missing = [hf_key for hf_key in sizes.values() if hf_key not in hf]
    if missing:
        raise PretrainedError(f"config.json lacks {missing[0]!r}: not a GPT-2 config")
    try:
        config = GPTConfig(**{ours: hf[key] for ours, key in sizes.items()}, dropout=0.0,
                           gelu_approx=_GELUS[activation])
    except ValueError as e:  # ConfigError: a size of the wrong type or range
        raise PretrainedError(f"config.json: {e}") from None
    if hf.get("n_inner") not in (None, 4 * config.n_embd):
        raise PretrainedError(f"n_inner={hf['n_inner']} is not 4 * n_embd={4 * config.n_embd}")
    return config


def hf_config(config: GPTConfig, eos_token_id: int | None = None) -> dict:
    """A Hugging Face ``config.json`` dict for a GPT-2-layout ``GPTConfig`` (the inverse).

    ``bos_token_id`` and ``eos_token_id`` are ``eos_token_id``; by default GPT-2's 50256 when
    the vocabulary holds it, else None (no end-of-text token: transformers then warns nothing).
    """
    gpt2_layout = dict(norm="layernorm", mlp="gelu", pos_emb="learned", bias=True)
    for key, value in gpt2_layout.items():
        if getattr(config, key) != value:
            raise PretrainedError(
                f"the GPT-2 layout needs {key}={value!r}, this model has "
                f"{key}={getattr(config, key)!r}; only GPT-2-style models can be exported"
            )
    if config.kv_heads != config.n_head or config.hidden_dim != 4 * config.n_embd:
        raise PretrainedError("the GPT-2 layout needs n_kv_head == n_head and a 4 * n_embd MLP")
    if eos_token_id is None and config.vocab_size > GPT2_EOT:
        eos_token_id = GPT2_EOT
    if eos_token_id is not None and not 0 <= eos_token_id < config.vocab_size:
        raise PretrainedError(f"eos_token_id={eos_token_id} is outside the vocabulary")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "n_inner": None, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new" if config.gelu_approx == "tanh" else "gelu",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
    }


def is_conv1d(name: str) -> bool:
    """Whether parameter ``name`` is one of the weights GPT-2 stores transposed, as (in, out)."""
    return name.endswith(".weight") and any(f".{m}.weight" in name for m in CONV1D)


def from_hf_state_dict(
    hf: Mapping[str, Tensor], config: GPTConfig
) -> dict[str, Tensor]:
    """Rename and transpose a Hugging Face GPT-2 state dict into GPT(config)'s names.

    Accepts names with or without the ``transformer.`` prefix; drops the mask buffers;
    accepts ``lm_head.weight`` only if it equals ``wte`` (GPT-2 ties them). Raises
    ``PretrainedError`` naming the first missing, unexpected or mis-shaped key.
    """
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, tensor in hf.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        ours = name
        if not name.startswith(("transformer.", "lm_head.")):
            ours = f"transformer.{name}"
        if ours == "lm_head.weight":
            continue  # checked against wte below
        if ours not in expected:
            raise PretrainedError(f"unexpected key {name!r}: GPT has no {ours!r}")
        if is_conv1d(ours):
            tensor = tensor.t()
        if tensor.shape != expected[ours]:
            how = " (after the Conv1D transpose)" if is_conv1d(ours) else ""
            raise PretrainedError(
                f"shape mismatch for {name!r}: the file has {tuple(tensor.shape)}"
                f"{how}, GPT expects {tuple(expected[ours])}; does config.json fit?"
            )
        out[ours] = tensor.contiguous()
    out["lm_head.weight"] = out.get("transformer.wte.weight")
    missing = sorted(k for k in expected if out.get(k) is None)
    if missing:
        more = len(missing) - 1
        raise PretrainedError(f"missing key {missing[0]!r} (and {more} more)")
    lm_head = hf.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, out["lm_head.weight"]):
        raise PretrainedError("lm_head.weight differs from wte: GPT ties them")
    return out


def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """The model's weights under Hugging Face GPT-2 names (Conv1D weights transposed).

    The tied ``lm_head.weight`` is left out, as ``transformers`` does when it saves GPT-2.
    """
    hf_config(model.config)  # raises unless the model has the GPT-2 layout
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        out[name] = (tensor.t() if is_conv1d(name) else tensor).detach().cpu().contiguous()
    return out


def load_hf(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> GPT:
    """Load a Hugging Face GPT-2 directory (config.json, model.safetensors) as a GPT."""
    weights = Path(directory) / "model.safetensors"
    config = config_from_hf(read_model_dir(directory))  # files present, JSON, hashes
    check_block_count(config, weight_shapes(weights), str(weights))  # before any GPT
    state = from_hf_state_dict(load_file(weights), config)
    with torch.device("meta"):  # no memory, no random initialisation
        model = GPT(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    return model.eval()


def _tokenizer_files(tokenizer: Any, directory: Path, block_size: int) -> int | None:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (GPT-2's format)
    for a byte-level BPE; return the id of ``<|endoftext|>`` (None if it has none).

    A character tokenizer has no Hugging Face equivalent: nothing is written for it.
    """
    d = tokenizer.to_dict()
    if d.get("type") == "gpt2":
        atomic_write(directory / "vocab.json",
                     lambda tmp: tmp.write_bytes(data_path("gpt2-encoder").read_bytes()))
        atomic_write(directory / "merges.txt",
                     lambda tmp: tmp.write_bytes(data_path("gpt2-vocab").read_bytes()))
    elif d.get("type") == "bpe":
        vocab = json.dumps(d["vocab"], ensure_ascii=False, indent=0) + "\n"
        atomic_write_text(directory / "vocab.json", vocab)
        atomic_write_text(directory / "merges.txt", "\n".join(["#version: 0.2", *d["merges"]]))
    else:
        return None
    eot = "<|endoftext|>" if "<|endoftext|>" in tokenizer.special_tokens else None
    settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
                "add_prefix_space": False, "bos_token": eot, "eos_token": eot, "unk_token": eot}
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(settings, indent=2) + "\n")
    return tokenizer.special_tokens.get("<|endoftext|>")


def save_hf(model: GPT, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the Hugging Face GPT-2 layout.

    With a byte-level BPE ``tokenizer`` (own or GPT-2's), also its files, so that
    ``transformers.AutoTokenizer`` loads it; its ``<|endoftext|>`` becomes the bos/eos id.
    """
    directory = Path(directory)
    hf_config(model.config)  # refuse a non-GPT-2 layout before writing anything
    eos = None if tokenizer is None else _tokenizer_files(tokenizer, directory,
                                                         model.config.block_size)
    state = to_hf_state_dict(model)
    atomic_write(directory / "model.safetensors",
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = json.dumps(hf_config(model.config, eos), indent=2) + "\n"
    atomic_write_text(directory / "config.json", config)
    return directory


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The byte-level BPE of a Hugging Face directory (``vocab.json`` + ``merges.txt``).

    Reads what ``save_hf`` writes and what GPT-2's hub repository holds; ``<|endoftext|>``
    is a special token when the vocabulary has it.
    """
    directory = Path(directory)
    missing = [name for name in _TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        raise PretrainedError(
            f"{directory.name} has no {' or '.join(missing)}: no byte-level BPE tokenizer to "
            "load; export the model with save_hf(model, directory, tokenizer)"
        )
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    specials = ["<|endoftext|>"] if "<|endoftext|>" in vocab else []
    try:
        return Tokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt",
                                         specials)
    except ValueError as e:  # merges that the vocabulary does not hold, a malformed line
        raise PretrainedError(f"{directory.name}: not a GPT-2-style tokenizer: {e}") from None


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds.

    ``huggingface_hub`` retries an unreachable host for about 25 s before it gives up; this
    check lets ``from_pretrained`` fall back to the cache at once when there is no network.
    """
    url = urllib.parse.urlsplit(endpoint or _endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download(
    name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    timeout: float = 3.0,
) -> Path:
    """Fetch ``config.json`` and ``model.safetensors`` of a hub model (and its ``vocab.json``
    and ``merges.txt`` when it has them); return their directory.

    ``name`` is a GPT-2 size ("gpt2", ..., "gpt2-xl") or a hub repository id. Files come from the
    Hugging Face cache when present; without a network the cache is the only source, and a
    model that is not cached raises one ``PretrainedError`` that says what to do.
    """
    from huggingface_hub import hf_hub_download

    repo_id = HUB_REPOS.get(name, name)
    endpoint = _endpoint()
    offline = _offline_env() or not hub_reachable(endpoint, timeout)
    paths = []
    try:
        for filename in _FILES:
            paths.append(hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, endpoint=endpoint,
                local_files_only=offline,
            ))
        for filename in _TOKENIZER_FILES:  # optional: the weights load without them
            with contextlib.suppress(Exception):
                hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                endpoint=endpoint, local_files_only=offline)
    except Exception as err:  # the hub raises many error types (offline, HTTP, not found)
        why = "no network connection to" if offline else "could not download from"
        raise PretrainedError(
            f"cannot load {name!r}: {why} {endpoint} and it is not in the Hugging Face cache "
            f"({type(err).__name__}). Connect to the internet, or set HF_ENDPOINT to a "
            "reachable mirror, or pass a local directory that holds config.json and "
            "model.safetensors (e.g. one written by save_hf or save_pretrained)."
        ) from err
    return Path(paths[0]).parent


def from_pretrained(name_or_dir: str | os.PathLike, **download_kwargs: Any) -> GPT:
    """A ``GPT`` in eval mode: "gpt2" ... "gpt2-xl", a hub id, or a local directory.

    A directory is loaded as is: minigpt's own (``export_model``, read by
    ``minigpt.checkpoint.load_model``, which also returns its tokenizer) or Hugging Face's
    GPT-2 layout (``load_hf``). Anything else is fetched with ``download`` (keyword
    arguments go there) and loaded in float32.
    """
    if Path(name_or_dir).is_dir():
        if is_minigpt_dir(name_or_dir):
            return load_model(name_or_dir)[0]
        return load_hf(name_or_dir)
    if isinstance(name_or_dir, os.PathLike) or str(name_or_dir).startswith((".", "/", "~")):
        raise PretrainedError(f"{name_or_dir} is not a directory (config.json, model.safetensors)")
    return load_hf(download(str(name_or_dir), **download_kwargs))
