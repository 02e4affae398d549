"""Checkpoints: the full training state to resume a run, and the shipped-model directory.

*Training checkpoint* (``save_checkpoint`` / ``load_checkpoint``): one ``torch.save`` file with
the model and optimiser state, the iteration, every random-number-generator state (torch,
numpy, python) and whatever the trainer adds (config, tokenizer, batch-sampler state). It holds
only tensors, numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``:
loading never runs code from the file. It is written atomically (temporary file in the same
directory, fsync, ``os.replace``): a crash during a save leaves the previous checkpoint intact.

*Shipped model* (``export_model`` / ``load_model``): a directory with ``model.safetensors``
(weights only, no pickle), ``config.json`` (``{"model": GPTConfig, "tokenizer": ..., "train":
...}``) and ``log.jsonl`` (the training metrics). Later chapters load these.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer, Tokenizer

FORMAT = "minigpt-checkpoint-v1"
PathOrFile = str | os.PathLike | IO[bytes]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not match the model it is loaded into."""


def _atomic_write(dest: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the finished, fsync'ed file onto ``dest`` atomically."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
        _atomic_write(out, lambda tmp: torch.save(state, tmp))
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


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer from its ``to_dict()`` description (character or BPE)."""
    if d.get("type") == "char":
        return CharTokenizer.from_dict(d)
    return Tokenizer.from_dict(d)


def export_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    train: dict | None = None,
    log: str | os.PathLike | None = None,
) -> Path:
    """Write the shipped-model directory: ``model.safetensors``, ``config.json``, ``log.jsonl``.

    ``train`` (the training config and results) goes into config.json; ``log`` is a metrics
    JSONL file copied beside the weights. Returns the directory.
    """
    model = _unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "model.safetensors", lambda tmp: _st_save_model(model, tmp))
    config = {"model": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "train": train}
    text = json.dumps(config, indent=1, ensure_ascii=False) + "\n"
    _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if log is not None and Path(log).resolve() != (out / "log.jsonl").resolve():
        _atomic_write(out / "log.jsonl", lambda tmp: shutil.copyfile(log, tmp))
    return out


def load_model(src: str | os.PathLike, device: str = "cpu") -> tuple[GPT, Any]:
    """Load a model for inference: returns ``(model in eval mode, tokenizer)``.

    ``src`` is a shipped-model directory (``export_model``) or a training checkpoint file
    (``ckpt.pt`` from the trainer, which stores the tokenizer too).
    """
    src = Path(src)
    if src.is_file():
        state = read_checkpoint(src)
        if state["model_config"] is None or "tokenizer" not in state["extra"]:
            raise CheckpointError(f"{src} holds no model config or tokenizer (not a trainer's)")
        model = GPT(GPTConfig.from_dict(json.loads(state["model_config"])))
        tokenizer = tokenizer_from_dict(json.loads(state["extra"]["tokenizer"]))
        load_checkpoint(state, model, restore_rng=False)
        return model.to(device).eval(), tokenizer
    for name in ("config.json", "model.safetensors"):
        if not (src / name).is_file():
            raise CheckpointError(
                f"{src} is not a minigpt model directory: {name} is missing "
                "(expected model.safetensors + config.json, as written by export_model)"
            )
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        model = GPT(GPTConfig.from_dict(config["model"]))
        tokenizer = tokenizer_from_dict(config["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"bad config.json in {src}: {e}") from None
    try:
        _st_load_model(model, src / "model.safetensors", device=device)
    except Exception as e:
        raise CheckpointError(f"cannot load {src / 'model.safetensors'}: {e}") from None
    return model.to(device).eval(), tokenizer
