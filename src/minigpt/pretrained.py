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

``from_pretrained("gpt2")`` downloads through ``huggingface_hub`` (its cache, ``HF_ENDPOINT``
for a mirror, ``HF_HUB_OFFLINE``) or reads a local directory; ``save_hf`` writes a directory that
``transformers.GPT2LMHeadModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from minigpt.model import GPT, GPTConfig

HUB_REPOS = {  # the released sizes, as hosted on the Hugging Face Hub
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # weights stored (in, out)
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
_FILES = ("config.json", "model.safetensors")


class PretrainedError(ValueError):
    """Weights or a config that do not fit ``minigpt.GPT``, or a model that cannot be fetched."""


def config_from_hf(hf: Mapping) -> GPTConfig:
    """The ``GPTConfig`` of a Hugging Face GPT-2 ``config.json`` (a dict); checks what we assume."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise PretrainedError(f"config.json: model_type must be 'gpt2', got {hf['model_type']!r}")
    checks = {  # key: (value minigpt computes with, default in transformers' GPT2Config)
        "activation_function": ("gelu_new", "gelu_new"),  # the tanh approximation of GELU
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
    n_embd = hf["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise PretrainedError(f"n_inner={hf['n_inner']} is not 4 * n_embd={4 * n_embd}")
    return GPTConfig(
        vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
        n_head=hf["n_head"], n_embd=n_embd, dropout=0.0, bias=True,
    )


def hf_config(config: GPTConfig) -> dict:
    """A Hugging Face ``config.json`` dict for a GPT-2-layout ``GPTConfig`` (the inverse)."""
    gpt2_layout = dict(norm="layernorm", mlp="gelu", pos_emb="learned", bias=True)
    for key, value in gpt2_layout.items():
        if getattr(config, key) != value:
            raise PretrainedError(
                f"the GPT-2 layout needs {key}={value!r}, this model has "
                f"{key}={getattr(config, key)!r}; only GPT-2-style models can be exported"
            )
    if config.kv_heads != config.n_head or config.hidden_dim != 4 * config.n_embd:
        raise PretrainedError("the GPT-2 layout needs n_kv_head == n_head and a 4 * n_embd MLP")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
    }


def is_conv1d(name: str) -> bool:
    """Whether parameter ``name`` is one of the weights GPT-2 stores transposed, as (in, out)."""
    return name.endswith(".weight") and any(f".{m}.weight" in name for m in CONV1D)


def from_hf_state_dict(hf: Mapping[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Rename and transpose a Hugging Face GPT-2 state dict into ``GPT(config)``'s names.

    Accepts names with or without the ``transformer.`` prefix; drops the mask buffers; accepts
    ``lm_head.weight`` only if it equals ``wte`` (GPT-2 ties them). Raises ``PretrainedError``
    naming the first missing, unexpected or mis-shaped key.
    """
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    for name, tensor in hf.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        ours = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if ours == "lm_head.weight":
            continue  # checked against wte below
        if ours not in expected:
            raise PretrainedError(f"unexpected key {name!r}: GPT({config}) has no {ours!r}")
        if is_conv1d(ours):
            tensor = tensor.t()
        if tensor.shape != expected[ours]:
            raise PretrainedError(
                f"shape mismatch for {name!r}: the file has {tuple(tensor.shape)}"
                f"{' (after the Conv1D transpose)' if is_conv1d(ours) else ''}, GPT expects "
                f"{tuple(expected[ours])}; does config.json belong to these weights?"
            )
        out[ours] = tensor.contiguous()
    out["lm_head.weight"] = out.get("transformer.wte.weight")
    missing = sorted(k for k in expected if out.get(k) is None)
    if missing:
        raise PretrainedError(f"missing key {missing[0]!r} (and {len(missing) - 1} more)")
    lm_head = hf.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, out["lm_head.weight"]):
        raise PretrainedError("lm_head.weight differs from wte: GPT ties them, cannot load exactly")
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
    """Load a GPT-2 directory (``config.json`` + ``model.safetensors``) into a ``GPT``."""
    directory = Path(directory)
    missing = [f for f in _FILES if not (directory / f).is_file()]
    if missing:
        raise PretrainedError(
            f"{directory} lacks {', '.join(missing)}; a Hugging Face GPT-2 directory needs "
            "config.json and model.safetensors (save one with save_hf or save_pretrained)"
        )
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    state = from_hf_state_dict(load_file(directory / "model.safetensors"), config)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # re-tie after assign
    return model.eval()


def save_hf(model: GPT, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the Hugging Face GPT-2 layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
    return directory


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
    """Fetch ``config.json`` and ``model.safetensors`` of a hub model; return their directory.

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
    except Exception as err:  # the hub raises many error types (offline, HTTP, not found)
        why = "no network connection to" if offline else "could not download from"
        raise PretrainedError(
            f"cannot load {name!r}: {why} {endpoint} and it is not in the Hugging Face cache "
            f"({type(err).__name__}). Connect to the internet, or set HF_ENDPOINT to a "
            "reachable mirror, or pass a local directory that holds config.json and "
            "model.safetensors (e.g. one written by save_hf or save_pretrained)."
        ) from err
    return Path(paths[0]).parent


def from_pretrained(name_or_dir: str | os.PathLike, **download_kwargs) -> GPT:
    """A ``GPT`` with released GPT-2 weights ("gpt2" ... "gpt2-xl", a hub id, or a directory).

    A path to an existing directory is loaded as is; anything else is fetched with ``download``
    (keyword arguments go there). The model is returned in eval mode, in float32.
    """
    if Path(name_or_dir).is_dir():
        return load_hf(name_or_dir)
    if isinstance(name_or_dir, os.PathLike) or str(name_or_dir).startswith((".", "/", "~")):
        raise PretrainedError(f"{name_or_dir} is not a directory (config.json, model.safetensors)")
    return load_hf(download(str(name_or_dir), **download_kwargs))
