"""Checkpoints: the full training state to resume a run, and the model directory to ship one.

Design choices:

* *Training checkpoint* (``save_checkpoint`` / ``load_checkpoint``): one ``torch.save`` file
  with the model and optimiser state, the iteration, every random-number-generator state
  (torch, numpy, python) and whatever the trainer adds (config, tokenizer, batch-sampler state).
  It holds only tensors, numbers, strings, lists and dicts, so it loads with
  ``torch.load(weights_only=True)``: loading never runs code from the file.
* *Model directory* (``export_model`` / ``load_model``): ``model.safetensors`` (weights only,
  no pickle), ``config.json`` (``{"model": GPTConfig, "tokenizer": ..., "train": ...}``),
  ``log.jsonl`` (the training metrics) and ``manifest.json`` (SHA-256 and size of the two
  files a load reads). ``read_model_dir`` is the one reader of such a directory; it also reads
  Hugging Face's layout for ``minigpt.pretrained``, which only converts names.
* Every file is written through ``minigpt.atomic`` (temporary file, fsync, rename, mode 0644):
  a crash during a save leaves the previous file intact.
* A load checks before it trusts: the files' hashes when a manifest records them (inside the
  directory, or ``manifest.json`` beside it listing the directory by name, as
  ``data/checkpoints`` does), the config's types (``GPTConfig.from_dict``), its sizes against
  the tensor shapes in the file's header (read without loading: a config that claims a billion
  layers is refused before anything is allocated) and the tokenizer's vocabulary against the
  model's. Hashing costs one read of the files (about 3 MB for the shipped models, a few
  milliseconds); a mismatch is an error, never a silently different model.
* Tokenizers are (de)serialised in one place, ``minigpt.registry.load_tokenizer`` (character,
  own BPE and GPT-2's).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from minigpt.atomic import atomic_write, atomic_write_text
from minigpt.model import GPT, GPTConfig, param_count
from minigpt.registry import DataError, load_tokenizer

FORMAT = "minigpt-checkpoint-v1"
MODEL_FILES = ("config.json", "model.safetensors")  # what a load reads from a model directory
MANIFEST = "manifest.json"
PathOrFile = str | os.PathLike | IO[bytes]
_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")  # transformer.h.3.attn... or h.3.attn... (GPT-2)


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be read, is corrupt, or does not match."""


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, numpy, python) as tensors, loadable with weights_only."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in py_state.tolist()), py_gauss))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: PathOrFile,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write model + optimiser state, ``iteration``, RNG states and ``extra`` to ``out``.

    ``out`` is a path (written atomically) or a binary file object. ``extra`` must hold only
    tensors, numbers, strings, lists and dicts (JSON-like), so the file stays code-free.
    """
    model = _unwrap(model)
    state = {
        "format": FORMAT,
        "iteration": int(iteration),
        "model_config": json.dumps(model.config.to_dict()) if hasattr(model, "config") else None,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    if isinstance(out, (str, os.PathLike)):
        atomic_write(out, lambda tmp: torch.save(state, tmp))
    else:
        torch.save(state, out)


def read_checkpoint(src: PathOrFile) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) and check it is a minigpt one."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<file>")
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise CheckpointError(f"checkpoint {name} does not exist (or is not a file)")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, disallowed pickle content, ...
        raise CheckpointError(
            f"cannot read checkpoint {name}: the file is corrupt, truncated or not a minigpt "
            f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{name} is not a minigpt checkpoint (expected format {FORMAT!r}); "
            "was it written by minigpt.checkpoint.save_checkpoint?"
        )
    return state


def _check_state_dict(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming every missing, unexpected or differently shaped tensor."""
    own = model.state_dict()
    problems = []
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing:
        problems.append(f"missing in the checkpoint: {missing}")
    if unexpected:
        problems.append(f"not in the model: {unexpected}")
    for k in sorted(set(own) & set(saved)):
        if own[k].shape != saved[k].shape:
            problems.append(
                f"{k} has shape {tuple(saved[k].shape)} in the checkpoint but "
                f"{tuple(own[k].shape)} in the model"
            )
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))


def check_model_config(saved: dict, current: dict) -> None:
    """Raise a CheckpointError naming each GPTConfig field that differs."""
    diffs = [
        f"{k}={saved.get(k)!r} in the checkpoint but {current.get(k)!r} now"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(
            "checkpoint was made with a different model config: " + ", ".join(diffs)
        )


def load_checkpoint(
    src: PathOrFile | dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> int:
    """Load a checkpoint (path, file object, or ``read_checkpoint`` output) into ``model`` and
    ``optimizer``, restore the RNG states, and return the iteration to continue from."""
    state = src if isinstance(src, dict) else read_checkpoint(src)
    plain = _unwrap(model)
    if state["model_config"] is not None and hasattr(plain, "config"):
        check_model_config(json.loads(state["model_config"]), plain.config.to_dict())
    _check_state_dict(plain, state["model"])
    plain.load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError("the checkpoint holds no optimiser state (saved without one)")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimiser state does not match this optimiser: {e}") from None
    if restore_rng:
        set_rng_state(state["rng"])
    return state["iteration"]


# -- the model directory ---------------------------------------------------------------------


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of a file, as manifests record it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def recorded_files(directory: str | os.PathLike) -> list[tuple[Path, dict]]:
    """The manifests that record hashes for ``directory``: ``(manifest, {file: record})``.

    Its own ``manifest.json`` (written by ``export_model``), and a ``manifest.json`` beside it
    whose entry named like the directory has ``"files"`` (``data/checkpoints/manifest.json``).
    """
    directory = Path(directory).resolve()
    found = []
    places = ((directory / MANIFEST, None), (directory.parent / MANIFEST, directory.name))
    for manifest, key in places:
        if not manifest.is_file():
            continue
        entry = _json_file(manifest)
        entry = entry.get(key) if key is not None and isinstance(entry, dict) else entry
        if isinstance(entry, dict) and isinstance(entry.get("files"), dict):
            found.append((manifest, entry["files"]))
    return found


def verify_files(directory: str | os.PathLike) -> None:
    """Check the files a load reads against every manifest that records them.

    Raises ``CheckpointError`` naming the file whose SHA-256 or size differs.
    """
    for manifest, files in recorded_files(directory):
        for name in MODEL_FILES:
            if name not in files:
                continue
            got = file_record(Path(directory) / name)
            want = files[name]
            if not isinstance(want, dict) or got != {k: want.get(k) for k in got}:
                raise CheckpointError(
                    f"{Path(directory) / name} does not match {manifest}: sha256 {got['sha256']}"
                    f" ({got['bytes']} bytes) instead of {want}; the file is corrupt or was "
                    "changed; restore it (e.g. git checkout, or export the model again)"
                )


def read_model_dir(directory: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model directory, after checking its files.

    The one reader of a directory holding ``config.json`` + ``model.safetensors``: minigpt's
    own (``export_model``) and Hugging Face's (``minigpt.pretrained``). Verifies the hashes
    when a manifest records them (``verify_files``).
    """
    directory = Path(directory)
    missing = [f for f in MODEL_FILES if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} is not a model directory: "
            + "; ".join(f"{name} is missing" for name in missing)
            + " (it needs config.json and model.safetensors, as written by export_model, "
            "save_hf or transformers' save_pretrained)"
        )
    verify_files(directory)
    config = _json_file(directory / "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory / 'config.json'} must hold a JSON object")
    return config


def is_minigpt_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like ``export_model`` output (config.json has ``"model"``)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only.

    Tensors that ``save_model`` stored once for two tied names (``wte`` and ``lm_head``) are
    listed under both names.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            aliases = f.metadata() or {}
    except Exception as e:  # a truncated or foreign file: safetensors raises several types
        raise CheckpointError(f"cannot read {path}: not a safetensors file ({e})") from None
    for name, kept in aliases.items():
        if kept in shapes and name not in shapes:
            shapes[name] = shapes[kept]
    return shapes


def check_block_count(config: GPTConfig, names: Any, source: str) -> None:
    """Raise if ``config`` claims more blocks than the weights ``names`` hold.

    Cheap (names only), so it runs before any model is built, even on the meta device.
    """
    blocks = {int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if config.n_layer > len(blocks):
        raise CheckpointError(
            f"{source}: the config says n_layer={config.n_layer} but the weights hold "
            f"{len(blocks)} blocks; does the config belong to these weights?"
        )


def build_model(config: GPTConfig, shapes: dict[str, tuple[int, ...]], source: str) -> GPT:
    """``GPT(config)``, built only once the weights' shapes prove the config's sizes.

    A config that claims more than the file holds (``n_layer=10**9``) is refused before
    anything is allocated: the block count and the parameter count (``param_count``, a formula)
    must match the file; then every tensor's shape is compared. Raises ``CheckpointError``.
    """
    check_block_count(config, shapes, source)
    in_file = sum(math.prod(s) for k, s in shapes.items() if k != "lm_head.weight")  # tied
    if param_count(config, non_embedding=False) != in_file:
        raise CheckpointError(
            f"{source}: its config describes {param_count(config, non_embedding=False):,} "
            f"parameters but the weights hold {in_file:,}; does the config belong to them?"
        )
    model = GPT(config)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    if set(own) - set(shapes):
        problems.append(f"missing in the file: {sorted(set(own) - set(shapes))}")
    if set(shapes) - set(own):
        problems.append(f"not in the model: {sorted(set(shapes) - set(own))}")
    problems += [
        f"{k} has shape {shapes[k]} in the file but {own[k]} in the model"
        for k in sorted(set(own) & set(shapes)) if own[k] != shapes[k]
    ]
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))
    return model


def check_vocab(tokenizer: Any, config: GPTConfig, source: str) -> None:
    """Raise unless the tokenizer's ids are the model's: equal vocabulary sizes.

    GPT-2's tokenizer (fixed ids) may be smaller than a padded model vocabulary (50304).
    """
    n_tok, n_model = tokenizer.vocab_size, config.vocab_size
    padded = tokenizer.to_dict().get("type") == "gpt2" and n_tok < n_model
    if n_tok != n_model and not padded:
        raise CheckpointError(
            f"{source}: the tokenizer has {n_tok} ids but the model's vocabulary has {n_model}; "
            "they were not saved together (ids would map to the wrong tokens)"
        )


def _model_and_tokenizer(config: dict, tokenizer: dict, source: str) -> tuple[GPTConfig, Any]:
    """Build ``GPTConfig`` and the tokenizer from their descriptions; errors name ``source``."""
    try:
        model_config = GPTConfig.from_dict(config)
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, dict) else None
    except (ValueError, KeyError, TypeError, DataError) as e:
        raise CheckpointError(f"bad {source}: {e}") from None
    if tok is None:
        raise CheckpointError(f"bad {source}: the tokenizer entry must be a JSON object")
    check_vocab(tok, model_config, source)
    return model_config, tok


def export_model(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    train: dict | None = None,
    log: str | os.PathLike | None = None,
) -> Path:
    """Write a model directory: ``model.safetensors``, ``config.json``, ``manifest.json``
    (their SHA-256s, checked by ``load_model``) and ``log.jsonl`` when ``log`` is given.

    ``train`` (the training config and results) goes into config.json; ``log`` is a metrics
    JSONL file copied beside the weights. Returns the directory.
    """
    model = _unwrap(model)
    out = Path(out_dir)
    check_vocab(tokenizer, model.config, "export_model")
    atomic_write(out / "model.safetensors", lambda tmp: _st_save_model(model, str(tmp)))
    config = {"model": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "train": train}
    atomic_write_text(out / "config.json", json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    files = {name: file_record(out / name) for name in MODEL_FILES}
    atomic_write_text(out / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")
    if log is not None and Path(log).resolve() != (out / "log.jsonl").resolve():
        atomic_write(out / "log.jsonl", lambda tmp: tmp.write_bytes(Path(log).read_bytes()))
    return out


def _load_checkpoint_file(src: Path) -> tuple[GPT, Any]:
    """``load_model`` of a trainer's ``ckpt.pt`` (it stores the config and tokenizer too)."""
    state = read_checkpoint(src)
    if state["model_config"] is None or "tokenizer" not in state["extra"]:
        raise CheckpointError(f"{src} holds no model config or tokenizer (not a trainer's)")
    config, tokenizer = _model_and_tokenizer(
        json.loads(state["model_config"]), json.loads(state["extra"]["tokenizer"]), str(src)
    )
    model = build_model(config, {k: tuple(v.shape) for k, v in state["model"].items()}, str(src))
    load_checkpoint(state, model, restore_rng=False)
    return model, tokenizer


def load_model(src: str | os.PathLike, device: str = "cpu") -> tuple[GPT, Any]:
    """Load a model for inference: returns ``(model in eval mode, tokenizer)``.

    ``src`` is a model directory (``export_model``; its files are verified against the
    manifests that record them) or a training checkpoint file (``ckpt.pt``). Anything
    inconsistent raises one ``CheckpointError`` naming the file and what is wrong.
    """
    src = Path(src)
    if src.is_file():
        model, tokenizer = _load_checkpoint_file(src)
        return model.to(device).eval(), tokenizer
    config = read_model_dir(src)
    if "model" not in config:
        raise CheckpointError(
            f"{src / 'config.json'} has no 'model' entry: not a minigpt model directory "
            "(for a Hugging Face GPT-2 directory use minigpt.pretrained.from_pretrained)"
        )
    weights = src / "model.safetensors"
    model_config, tokenizer = _model_and_tokenizer(
        config["model"], config.get("tokenizer"), str(src / "config.json")
    )
    model = build_model(model_config, weight_shapes(weights), str(weights))
    try:
        _st_load_model(model, weights)
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"cannot load {weights}: {e}") from None
    return model.to(device).eval(), tokenizer
