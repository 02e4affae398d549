"""Training data: a text tokenised once into token bins, and random batches cut from them.

``prepare_bin`` tokenises a corpus once into ``uint16`` token bins, ``load_bin`` maps them
and ``get_batch`` cuts random training windows out of them. ``prepare_data(spec)`` does all
of it for a ``DataSpec`` (a registered dataset or a local text file, and a tokenizer); the
registered files come from ``minigpt.registry``.

Design choices:

- Token bins carry a record. ``meta.json`` beside the bins says what built them (hashes of
  the source and the tokenizer) and what they are (SHA-256, bytes, tokens, vocabulary size,
  dtype). ``prepare_bin`` rebuilds bins that do not match it; ``load_bin`` refuses them.
- Ids are checked once, at the boundary: ``load_bin`` hashes the file and finds its largest
  id in one sequential read (SHA-256 runs at the order of 1 GB/s on one core: milliseconds
  for Tiny Shakespeare's 2 MB of bins), so ``get_batch`` checks no ids and never waits for
  a device. ``prepare_data`` hashes each bin once: ``prepare_bin`` checks cached bins (or
  hashes the ones it writes) and the bins are then mapped without a second read.
- Errors are ``minigpt.registry``'s ``DataError`` family (``BinError`` for a bad bin,
  ``DataInputError`` for a bad argument), each one line that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from minigpt import tokenizer as tokenizers
from minigpt.atomic import atomic_write_text
from minigpt.bpe import train_bpe_from_text
from minigpt.registry import (
    REGISTRY,
    DataError,
    DataInputError,
    cache_dir,
    cache_writer,
    load_tokenizer,
    path,
    sha256_file,
)

BIN_FILES = ("train.bin", "val.bin")
_CHUNK = 1 << 16  # even: a block of a token file holds whole uint16 ids


class BinError(DataError):
    """A token bin is missing, empty, or does not match the record ``prepare_bin`` wrote."""


class Tokenizer(Protocol):
    """What ``prepare_bin`` needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


def _blocks(source: str | os.PathLike, size: int) -> Iterator[str]:
    """The text of ``source`` (a string, or a path to a UTF-8 file) in blocks of ``size``."""
    if isinstance(source, str):
        for i in range(0, len(source), size):
            yield source[i : i + size]
        return
    with open(source, encoding="utf-8") as f:
        try:
            while block := f.read(size):
                yield block
        except UnicodeDecodeError as err:
            raise DataInputError(
                f"{source} is not UTF-8 text ({err.reason}); convert it to UTF-8"
            ) from None


def _last_cut(buf: str, start: int) -> int:
    """Index after the last newline in ``buf[start:]`` between two non-space characters, or 0."""
    end = len(buf)
    while (i := buf.rfind("\n", max(start, 1), end)) != -1:
        if i + 1 < len(buf) and not buf[i - 1].isspace() and not buf[i + 1].isspace():
            return i + 1
        end = i
    return 0


def _pieces(blocks: Iterator[str]) -> Iterator[str]:
    """Regroup text blocks into pieces that end with a newline between two non-space characters.

    Tokenizers whose pre-tokenizer always splits there (characters, GPT-2's BPE) encode the
    pieces exactly as they would encode the whole text. Text without such a newline stays whole.
    """
    carry = ""
    for block in blocks:
        buf = carry + block
        cut = _last_cut(buf, len(carry) - 1)
        if cut:
            yield buf[:cut]
        carry = buf[cut:]
    if carry:
        yield carry


def _fingerprint(tokenizer: Tokenizer) -> dict:
    """A small description of a tokenizer: its type, size and a hash of ``to_dict()``."""
    desc = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else None
    kind = desc.get("type") if desc else type(tokenizer).__qualname__
    digest = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest() if desc else None
    return {"type": kind, "vocab_size": tokenizer.vocab_size, "sha256": digest}


def _bin_key(text_or_path: str | os.PathLike, tokenizer: Tokenizer, val_fraction: float) -> dict:
    """Check ``prepare_bin``'s arguments; return what identifies the bins they build."""
    if not 0 <= val_fraction < 1:
        raise DataInputError(f"val_fraction must be in [0, 1), got {val_fraction}; use e.g. 0.1")
    if isinstance(text_or_path, str) and "\n" not in text_or_path and os.path.isfile(text_or_path):
        raise DataInputError(
            f"{text_or_path!r} names a file, but a str is taken as the text itself; "
            f"pass pathlib.Path({text_or_path!r}) to tokenise the file"
        )
    if not isinstance(text_or_path, str) and not Path(text_or_path).is_file():
        raise DataInputError(f"corpus file {text_or_path} does not exist; check the path")
    if tokenizer.vocab_size > 1 << 16:
        raise DataInputError(
            f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token files (ids must "
            "be < 65536); use a tokenizer with at most 65,536 tokens"
        )
    if isinstance(text_or_path, str):
        source_sha256 = hashlib.sha256(text_or_path.encode("utf-8")).hexdigest()
    else:
        source_sha256 = sha256_file(Path(text_or_path))
    return {
        "format": "minigpt-bin-2",
        "dtype": "uint16",
        "source_sha256": source_sha256,
        "tokenizer": _fingerprint(tokenizer),
        "val_fraction": val_fraction,
    }


def _scan(file: Path) -> tuple[str, int]:
    """One pass over a token file: its SHA-256 and its largest id (-1 if empty)."""
    h, top = hashlib.sha256(), -1
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
            if len(block) >= 2:
                ids = np.frombuffer(block, dtype=np.uint16, count=len(block) // 2)
                top = max(top, int(ids.max()))
    return h.hexdigest(), top


def _read_meta(file: Path) -> dict | None:
    """The record in a bins folder's ``meta.json``, or ``None`` if it is missing or unreadable."""
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _bin_problem(file: Path, meta: dict | None, vocab_size: int | None = None) -> str | None:
    """What is wrong with the token file ``file`` given its folder's record, or ``None``.

    Checks, in order of cost: the record exists, the size, then one pass for the SHA-256 and
    the largest id (which must be below the recorded vocabulary size and ``vocab_size``).
    """
    files = meta.get("files") if meta else None
    record = files.get(file.name) if isinstance(files, dict) else None
    if not isinstance(record, dict):
        return f"{file} has no record in {file.parent / 'meta.json'}"
    if not file.is_file():
        return f"{file} does not exist"
    size = file.stat().st_size
    if size != record.get("bytes"):
        return f"{file} has {size} bytes, its record says {record.get('bytes')}"
    digest, top = _scan(file)
    if digest != record.get("sha256"):
        recorded = record.get("sha256")
        return f"{file} changed after it was written (sha256 {digest}, recorded {recorded})"
    recorded = meta.get("vocab_size")
    limit = min(recorded, vocab_size or recorded) if isinstance(recorded, int) else 0
    if top >= limit:
        return f"{file} holds token id {top}, not below the vocabulary size {limit}"
    return None


def _cached_bins(out: Path, key: dict) -> dict | None:
    """The record of bins in ``out`` built from ``key``'s inputs and intact, else ``None``."""
    meta = _read_meta(out / "meta.json")
    if meta is None or key["tokenizer"]["sha256"] is None:
        return None
    if {k: meta.get(k) for k in key} != key:
        return None
    for name in BIN_FILES:
        problem = _bin_problem(out / name, meta)
        if problem is not None:
            warnings.warn(f"rebuilding token bins: {problem}", stacklevel=3)
            return None
    return meta


def _write_bins(
    text_or_path: str | os.PathLike,
    tokenizer: Tokenizer,
    out: Path,
    val_fraction: float,
    chunk_chars: int,
) -> tuple[int, int]:
    """Tokenise into ``out/train.bin`` and ``out/val.bin``; return their token counts."""
    with cache_writer(out / "train.bin") as (f, tmp):
        n = 0
        for piece in _pieces(_blocks(text_or_path, chunk_chars)):
            ids = np.asarray(tokenizer.encode(piece), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise DataInputError(
                    f"tokenizer produced ids outside 0..{tokenizer.vocab_size - 1}: "
                    f"min {ids.min()}, max {ids.max()}; fix the tokenizer's vocab_size"
                )
            f.write(ids.astype(np.uint16).tobytes())
            n += ids.size
        if n == 0:
            raise DataInputError("the corpus is empty: nothing to tokenise; give it some text")
        n_val = int(n * val_fraction)
        f.flush()
        with cache_writer(out / "val.bin") as (g, _):
            g.write(np.fromfile(tmp, dtype=np.uint16, offset=2 * (n - n_val)).tobytes())
        f.truncate(2 * (n - n_val))
    return n - n_val, n_val


def prepare_bin(
    text_or_path: str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.1,
    *,
    chunk_chars: int = 1 << 20,
) -> dict:
    """Tokenise a corpus once into ``out_dir/train.bin`` and ``val.bin`` (``uint16`` ids).

    A ``str`` is the text itself; a ``Path`` (or other ``os.PathLike``) names a UTF-8 file.
    The last ``val_fraction`` of the tokens go to ``val.bin``. ``meta.json`` records the
    source's SHA-256, the tokenizer (via its ``to_dict()``), the counts, and each bin's
    SHA-256, size and token count. Calling again with the same inputs returns that record
    without re-tokenising, after checking the bins against it (one read of each; bins that
    do not match are rebuilt, with a warning). Tokenizers without ``to_dict()`` cannot be
    identified, so their bins are always rebuilt. Returns the ``meta.json`` content.
    """
    key = _bin_key(text_or_path, tokenizer, val_fraction)
    out = Path(out_dir)
    meta = _cached_bins(out, key)
    if meta is not None:
        return meta
    (out / "meta.json").unlink(missing_ok=True)  # a crash below must not leave a stale record
    n_train, n_val = _write_bins(text_or_path, tokenizer, out, val_fraction, chunk_chars)
    files = {}
    for name, tokens in zip(BIN_FILES, (n_train, n_val), strict=True):
        files[name] = {"bytes": 2 * tokens, "tokens": tokens, "sha256": _scan(out / name)[0]}
    meta = {**key, "vocab_size": tokenizer.vocab_size, "train_tokens": n_train,
            "val_tokens": n_val, "files": files}  # fmt: skip
    with cache_writer(out / "meta.json") as (f, _):
        f.write(json.dumps(meta, indent=1).encode())
    return meta


def load_bin(file: str | os.PathLike, *, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a token file written by ``prepare_bin`` (read-only, ``uint16``), checked.

    The file must match its record in the ``meta.json`` beside it (size and SHA-256) and
    hold only ids below the recorded vocabulary size and ``vocab_size`` (e.g. the model's),
    so nothing downstream checks ids again. Cost: one read and SHA-256 of the whole file.
    """
    file = Path(file)
    problem = _bin_problem(file, _read_meta(file.parent / "meta.json"), vocab_size)
    if problem is not None:
        raise BinError(f"{problem}; delete {file.parent} and build it again with prepare_bin")
    return _map_bin(file)


def _map_bin(file: Path) -> np.memmap:
    """Memory-map a token file that was just checked or written (no second read).

    An empty file cannot be mapped: an empty split is a ``BinError``.
    """
    if file.stat().st_size == 0:
        raise BinError(
            f"{file} is an empty token file; build it with prepare_bin with val_fraction > 0"
        )
    return np.memmap(file, dtype=np.uint16, mode="r")


def _check_batch_shape(n_tokens: int, batch_size: int, context_length: int) -> None:
    """``get_batch``'s argument checks: positive sizes and enough tokens for one window."""
    if batch_size < 1 or context_length < 1:
        raise DataInputError(
            f"need batch_size >= 1 and context_length >= 1, got {batch_size} and "
            f"{context_length}; pass positive sizes"
        )
    if n_tokens < context_length + 1:
        raise DataInputError(
            f"data has {n_tokens} tokens, too few for context_length={context_length} "
            f"(need at least {context_length + 1}); use a shorter context or more data"
        )


def get_batch(
    data: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``data``: inputs ``x``, targets ``y``.

    ``y[b, t] == x[b, t + 1]``: each position's target is the next token. Both are
    ``int64`` tensors of shape ``(batch_size, context_length)``. Window starts are
    drawn with ``generator`` (the global torch RNG if ``None``), so a seeded generator
    repeats batches. ``load_bin`` checked the ids once: no check here waits for a GPU.
    """
    _check_batch_shape(len(data), batch_size, context_length)
    n_starts = len(data) - context_length  # windows of context_length + 1 tokens
    starts = torch.randint(n_starts, (batch_size,), generator=generator)
    index = starts.numpy()[:, None] + np.arange(context_length + 1)
    windows = torch.from_numpy(np.asarray(data)[index].astype(np.int64))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    return x.to(device), y.to(device)


# ------------------------------------------------------------- training data preparation
# (below: the trainer's side of this module. It takes a small DataSpec, not the trainer's
# config, so data never imports train.)


@dataclass(frozen=True)
class DataSpec:
    """Which text to tokenise, and how: what ``prepare_data`` needs to build token bins.

    ``dataset`` is a name in ``REGISTRY`` or a UTF-8 text file; ``tokenizer`` is ``"char"``
    (one id per character) or ``"bpe"`` (a byte-level BPE of ``bpe_vocab_size`` tokens trained
    on the training split); the last ``val_fraction`` of the tokens are the validation split.
    """

    dataset: str = "tinyshakespeare"
    tokenizer: str = "char"
    bpe_vocab_size: int = 1024
    val_fraction: float = 0.1


def is_local_file(dataset: str) -> bool:
    """Whether ``dataset`` names a local text file rather than a registered dataset."""
    if dataset in REGISTRY:
        return False
    return dataset.endswith((".txt", ".md")) or os.sep in dataset or Path(dataset).is_file()


def bins_dir(spec: DataSpec) -> Path:
    """Where the token bins of this dataset + tokenizer live (in the minigpt cache)."""
    name = Path(spec.dataset).stem if is_local_file(spec.dataset) else spec.dataset
    tok = "char" if spec.tokenizer == "char" else f"bpe{spec.bpe_vocab_size}"
    return cache_dir() / "bins" / f"{name}-{tok}-val{spec.val_fraction:g}"


def prepare_data(spec: DataSpec, tokenizer: Tokenizer | None = None) -> tuple:
    """``(tokenizer, train_ids, val_ids)``: memory-mapped token bins, built once and cached.

    ``tokenizer`` (e.g. a shipped model's) replaces the one ``spec`` describes. A local file
    is read only when the caller names it in ``spec.dataset``: callers that take a dataset
    from a file they did not write (a model's ``config.json``) must check it first
    (``is_local_file``).
    """
    source = Path(spec.dataset) if is_local_file(spec.dataset) else path(spec.dataset)
    if not source.is_file():
        raise ValueError(f"dataset file {source} does not exist; pass a registered name "
                         f"({', '.join(sorted(REGISTRY))}) or a UTF-8 text file")
    out = bins_dir(spec)
    if tokenizer is None:
        text = source.read_text(encoding="utf-8")
        if spec.tokenizer == "char":
            tokenizer = tokenizers.CharTokenizer.from_text(text)
        else:
            train_text = text[: int(len(text) * (1 - spec.val_fraction))]
            tokenizer = _cached_bpe(train_text, spec.bpe_vocab_size, out / "tokenizer.json")
    # prepare_bin checks cached bins (hash and id range) or writes and hashes new ones:
    # each bin is read once per call, and its ids are not checked again per batch
    prepare_bin(source, tokenizer, out, val_fraction=spec.val_fraction)
    return tokenizer, _map_bin(out / "train.bin"), _map_bin(out / "val.bin")


def _cached_bpe(train_text: str, vocab_size: int, cached: Path) -> Tokenizer:
    """A byte-level BPE trained on ``train_text``, cached as ``cached`` (JSON)."""
    if cached.is_file():
        return load_tokenizer(json.loads(cached.read_text(encoding="utf-8")))
    specials = ["<|endoftext|>"]
    vocab, merges = train_bpe_from_text(train_text, vocab_size, specials)
    tokenizer = tokenizers.Tokenizer(vocab, merges, specials)
    atomic_write_text(cached, json.dumps(tokenizer.to_dict()))
    return tokenizer
