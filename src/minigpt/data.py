"""Data: a registry of named public files, fetched once and verified, plus token bins.

``path(name)`` returns a local, verified copy of a registered file. It looks in three places:

1. the cache directory (env ``MINIGPT_CACHE_DIR``; default: the platform's user cache dir,
   e.g. ``~/.cache/minigpt``); a cached file is re-verified on every call;
2. a local mirror directory (env ``MINIGPT_DATA_MIRROR``) laid out like the cache, e.g.
   ``$MINIGPT_DATA_MIRROR/tinyshakespeare/input.txt``; a verified mirror file is copied into
   the cache, so the mirror is only read once and may be read-only;
3. the file's canonical URL (standard-library ``urllib``), with a progress bar.

A file lands in the cache only after verification, through a temporary file in the same
directory that is fsync'ed and then renamed with ``os.replace`` (atomic), so a failed or
partial download never looks like a good file.

``gpt2_tokenizer()`` and ``tiktoken_gpt2()`` build GPT-2's tokenizer from those files, and
``load_tokenizer(d)`` rebuilds any tokenizer from its ``to_dict()`` description.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import numpy as np
import tiktoken
import torch

from minigpt import tokenizer as tokenizers
from minigpt.atomic import atomic_write_text
from minigpt.bpe import train_bpe_from_text

MIRROR_ENV = "MINIGPT_DATA_MIRROR"
CACHE_ENV = "MINIGPT_CACHE_DIR"
_CHUNK = 1 << 16


class DataError(RuntimeError):
    """Base class for the errors of this module."""


class DownloadError(DataError):
    """A file could not be fetched (offline, HTTP error, truncated transfer)."""


class VerificationError(DataError):
    """A file's content does not match its registry entry."""


@dataclass(frozen=True)
class Entry:
    """One registered file.

    ``path`` is the file's place relative to the cache and mirror roots. A file is verified by
    its ``sha256`` or, when no byte-exact hash can be pinned, by a ``check`` that raises
    ``VerificationError``. If ``member`` is set, ``url`` points to a zip archive and the file is
    the archive member of that name.
    """

    name: str
    url: str
    path: str
    sha256: str | None = None
    check: Callable[[Path], None] | None = None
    member: str | None = None

    def __post_init__(self) -> None:
        if (self.sha256 is None) == (self.check is None):
            raise ValueError(f"entry {self.name!r} needs exactly one of sha256= or check=")

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name

    def verify(self, file: Path) -> None:
        """Raise ``VerificationError`` (naming ``file``) unless ``file`` is this entry's file."""
        if self.check is not None:
            self.check(file)
            return
        actual = sha256_file(file)
        if actual != self.sha256:
            raise VerificationError(
                f"{file} is not the expected {self.name!r} file: "
                f"expected sha256 {self.sha256}, got {actual}"
            )


def sha256_file(file: Path) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _check_sms_spam(file: Path) -> None:
    """SMS Spam Collection v.1: 5,574 lines ``ham|spam<TAB>text`` (4,827 ham, 747 spam)."""
    lines = Path(file).read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    counts = {b"ham": 0, b"spam": 0}
    for i, line in enumerate(lines, 1):
        label, tab, text = line.rstrip(b"\r").partition(b"\t")
        if label not in counts or not tab or not text:
            raise VerificationError(
                f"{file} is not the SMS Spam Collection: line {i} is not 'ham|spam<TAB>text'"
            )
        counts[label] += 1
    got = (len(lines), counts[b"ham"], counts[b"spam"])
    if got != (5574, 4827, 747):
        raise VerificationError(
            f"{file} is not the SMS Spam Collection: expected 5574 lines (4827 ham, 747 spam), "
            f"got {got[0]} lines ({got[1]} ham, {got[2]} spam)"
        )


_GH = "https://raw.githubusercontent.com/"
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# fmt: off
REGISTRY: dict[str, Entry] = {e.name: e for e in [
    Entry("tinyshakespeare", _GH + "karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
          "tinyshakespeare/input.txt",
          sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    Entry("gpt2-encoder", _GPT2 + "encoder.json", "gpt2/encoder.json",
          sha256=tokenizers.GPT2_FILES_SHA256["encoder_json_sha256"]),
    Entry("gpt2-vocab", _GPT2 + "vocab.bpe", "gpt2/vocab.bpe",
          sha256=tokenizers.GPT2_FILES_SHA256["vocab_bpe_sha256"]),
    # Copies of this file differ in bytes from the one in the UCI zip, so no hash is pinned:
    # the content is checked by its documented format instead.
    Entry("sms-spam", "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
          "sms_spam/SMSSpamCollection", check=_check_sms_spam, member="SMSSpamCollection"),
    Entry("instruction-data",
          _GH + "rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
          "instruction/instruction-data.json",
          sha256="7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"),
]}
# fmt: on


def cache_dir() -> Path:
    """``$MINIGPT_CACHE_DIR``, else the platform's user cache directory plus ``minigpt``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "minigpt"


@contextmanager
def _atomic_writer(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield ``(file, tmp_path)`` of a temporary file beside ``dest``.

    If the block finishes, the file is fsync'ed and renamed onto ``dest``; if it raises, the
    temporary file is removed and ``dest`` is untouched. Verify ``tmp_path`` inside the block.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; cached data is not secret
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(entry: Entry, out: BinaryIO, hint: str) -> None:
    """Stream ``entry.url`` into ``out``; any failure, a short body included, is a DownloadError."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(entry.url, headers={"User-Agent": "minigpt-book"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry.filename) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
    except (OSError, HTTPException) as err:  # URLError, HTTPError, timeouts, resets
        reason = getattr(err, "reason", None) or err
        raise DownloadError(
            f"could not download {entry.name!r} from {entry.url} ({reason}). To use a local "
            f"copy instead, set {MIRROR_ENV} to a directory that holds {entry.path} ({hint})."
        ) from None
    if total is not None and received != total:
        raise DownloadError(
            f"incomplete download of {entry.url}: received {received} of {total} bytes; try again"
        )


def _fetch(entry: Entry, dest: Path, hint: str) -> None:
    """Download ``entry``, verify it and place it at ``dest`` atomically."""
    with _atomic_writer(dest) as (out, tmp):
        if entry.member is None:
            _download(entry, out, hint)
        else:
            with tempfile.TemporaryFile(dir=dest.parent) as archive:
                _download(entry, archive, hint)
                try:
                    with zipfile.ZipFile(archive) as zf, zf.open(entry.member) as src:
                        shutil.copyfileobj(src, out)
                except (zipfile.BadZipFile, KeyError) as err:
                    raise VerificationError(f"{entry.url}: {err}") from None
        out.flush()
        entry.verify(tmp)


def path(name: str | Entry) -> Path:
    """A verified local copy of the registered file ``name`` (or of an ``Entry``).

    Order: cache, then ``$MINIGPT_DATA_MIRROR`` (copied into the cache), then the canonical
    URL. Raises ``DownloadError`` if the file cannot be fetched, ``VerificationError`` if a
    mirror or downloaded file does not match, ``ValueError`` for an unknown name.
    """
    if isinstance(name, Entry):
        entry = name
    elif name in REGISTRY:
        entry = REGISTRY[name]
    else:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"unknown data file {name!r}; known names: {known}")
    dest = cache_dir() / entry.path
    if dest.is_file():
        try:
            entry.verify(dest)
            return dest
        except VerificationError as err:
            warnings.warn(f"re-fetching a corrupted cache file: {err}", stacklevel=2)
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        source = Path(mirror).expanduser() / entry.path
        if source.is_file():
            entry.verify(source)
            with _atomic_writer(dest) as (out, _), open(source, "rb") as src:
                shutil.copyfileobj(src, out)
            return dest
        hint = f"the mirror {mirror} has no such file"
    else:
        hint = f"{MIRROR_ENV} is not set"
    _fetch(entry, dest, hint)
    return dest


@contextmanager
def _env(var: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block, then restore it."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def tiktoken_gpt2() -> tiktoken.Encoding:
    """``tiktoken.get_encoding("gpt2")``, loaded from this module's verified files.

    tiktoken looks for each file it needs in ``$TIKTOKEN_CACHE_DIR`` under the name
    ``sha1(url)``, checks its SHA-256 and only downloads if the copy is missing. We put our
    verified ``gpt2-encoder``/``gpt2-vocab`` files under those names in ``<cache>/tiktoken`` and
    point ``TIKTOKEN_CACHE_DIR`` there *only while loading*; the user's own setting is restored
    afterwards, so other tiktoken encodings keep using it (changing ``os.environ`` is not
    thread-safe: call this before starting threads). tiktoken keeps the loaded encoding in
    memory, so later calls are free.
    """
    tk_dir = cache_dir() / "tiktoken"
    for name in ("gpt2-encoder", "gpt2-vocab"):
        entry = REGISTRY[name]
        target = tk_dir / hashlib.sha1(entry.url.encode()).hexdigest()
        if not (target.is_file() and sha256_file(target) == entry.sha256):
            with _atomic_writer(target) as (out, _), open(path(name), "rb") as src:
                shutil.copyfileobj(src, out)
    with _env("TIKTOKEN_CACHE_DIR", str(tk_dir)):
        return tiktoken.get_encoding("gpt2")


class Tokenizer(Protocol):
    """What ``prepare_bin`` needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


def gpt2_tokenizer(special_tokens: Iterable[str] = ("<|endoftext|>",)) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE (``minigpt.tokenizer.Tokenizer``) from its verified files."""
    return tokenizers.Tokenizer.from_gpt2_files(
        path("gpt2-encoder"), path("gpt2-vocab"), special_tokens
    )


def load_tokenizer(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` description (as kept in checkpoints).

    ``"char"`` and ``"bpe"`` descriptions hold their vocabulary; ``"gpt2"`` names GPT-2's
    published files by their SHA-256, and is rebuilt from this registry's copies of them.
    """
    kind = d.get("type")
    if kind == "char":
        return tokenizers.CharTokenizer.from_dict(d)
    if kind == "bpe":
        return tokenizers.Tokenizer.from_dict(d)
    if kind == "gpt2":
        wanted = {k: d.get(k) for k in tokenizers.GPT2_FILES_SHA256}
        if wanted != tokenizers.GPT2_FILES_SHA256:
            raise ValueError(
                f"this 'gpt2' description names files with sha256 {wanted}, but GPT-2's files "
                f"are {tokenizers.GPT2_FILES_SHA256}; it was not written by minigpt's to_dict()"
            )
        return gpt2_tokenizer(d["special_tokens"])
    raise ValueError(
        f"unknown tokenizer type {kind!r}; expected 'char', 'bpe' or 'gpt2' "
        "(a description written by a tokenizer's to_dict())"
    )


def _blocks(source: str | os.PathLike, size: int) -> Iterator[str]:
    """The text of ``source`` (a string, or a path to a UTF-8 file) in blocks of ``size``."""
    if isinstance(source, str):
        for i in range(0, len(source), size):
            yield source[i : i + size]
    else:
        with open(source, encoding="utf-8") as f:
            while block := f.read(size):
                yield block


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
    source's SHA-256, the tokenizer (via its ``to_dict()``) and the counts; calling again with
    the same inputs returns that record without re-tokenising. Tokenizers without ``to_dict()``
    cannot be identified, so their bins are always rebuilt. Returns the ``meta.json`` content.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(text_or_path, str) and "\n" not in text_or_path and os.path.isfile(text_or_path):
        raise ValueError(
            f"{text_or_path!r} names a file, but a str is taken as the text itself; "
            f"pass pathlib.Path({text_or_path!r}) to tokenise the file"
        )
    if tokenizer.vocab_size > 1 << 16:
        raise ValueError(
            f"vocab_size {tokenizer.vocab_size} does not fit the uint16 token files (ids must "
            "be < 65536); use a tokenizer with at most 65,536 tokens"
        )
    out = Path(out_dir)
    if isinstance(text_or_path, str):
        source_sha256 = hashlib.sha256(text_or_path.encode("utf-8")).hexdigest()
    else:
        source_sha256 = sha256_file(Path(text_or_path))
    key = {
        "format": "minigpt-bin-1",
        "dtype": "uint16",
        "source_sha256": source_sha256,
        "tokenizer": _fingerprint(tokenizer),
        "val_fraction": val_fraction,
    }
    meta_file, train_file, val_file = out / "meta.json", out / "train.bin", out / "val.bin"
    if meta_file.is_file() and key["tokenizer"]["sha256"] is not None:
        meta = json.loads(meta_file.read_text())
        if (
            {k: meta.get(k) for k in key} == key
            and train_file.is_file()
            and val_file.is_file()
            and train_file.stat().st_size == 2 * meta["train_tokens"]
            and val_file.stat().st_size == 2 * meta["val_tokens"]
        ):
            return meta
    meta_file.unlink(missing_ok=True)  # a crash below must not leave a stale record behind
    with _atomic_writer(train_file) as (f, tmp):
        n = 0
        for piece in _pieces(_blocks(text_or_path, chunk_chars)):
            ids = np.asarray(tokenizer.encode(piece), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(
                    f"tokenizer produced ids outside 0..{tokenizer.vocab_size - 1}: "
                    f"min {ids.min()}, max {ids.max()}"
                )
            f.write(ids.astype(np.uint16).tobytes())
            n += ids.size
        if n == 0:
            raise ValueError("the corpus is empty: nothing to tokenise")
        n_val = int(n * val_fraction)
        f.flush()
        with _atomic_writer(val_file) as (g, _):
            g.write(np.fromfile(tmp, dtype=np.uint16, offset=2 * (n - n_val)).tobytes())
        f.truncate(2 * (n - n_val))
    meta = {**key, "train_tokens": n - n_val, "val_tokens": n_val}
    with _atomic_writer(meta_file) as (f, _):
        f.write(json.dumps(meta, indent=1).encode())
    return meta


def load_bin(file: str | os.PathLike) -> np.memmap:
    """Memory-map a token file written by ``prepare_bin`` (read-only, ``uint16``)."""
    size = Path(file).stat().st_size
    if size == 0 or size % 2:
        raise ValueError(
            f"{file} is not a non-empty uint16 token file ({size} bytes); "
            "build it with prepare_bin (with val_fraction > 0 for val.bin)"
        )
    return np.memmap(file, dtype=np.uint16, mode="r")


def get_batch(
    data: np.ndarray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``data``: inputs ``x`` and targets ``y``.

    ``y[b, t] == x[b, t + 1]``: each position's target is the next token. Both are ``int64``
    tensors of shape ``(batch_size, context_length)``. Window starts are drawn with
    ``generator`` (the global torch RNG if ``None``), so a seeded generator repeats batches.
    """
    if batch_size < 1 or context_length < 1:
        raise ValueError(
            f"need batch_size >= 1 and context_length >= 1, got {batch_size} and {context_length}"
        )
    if len(data) < context_length + 1:
        raise ValueError(
            f"data has {len(data)} tokens, too few for context_length={context_length} "
            f"(need at least {context_length + 1}); use a shorter context or more data"
        )
    starts = torch.randint(len(data) - context_length, (batch_size,), generator=generator)
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
    prepare_bin(source, tokenizer, out, val_fraction=spec.val_fraction)
    return tokenizer, load_bin(out / "train.bin"), load_bin(out / "val.bin")


def _cached_bpe(train_text: str, vocab_size: int, cached: Path) -> Tokenizer:
    """A byte-level BPE trained on ``train_text``, cached as ``cached`` (JSON)."""
    if cached.is_file():
        return load_tokenizer(json.loads(cached.read_text(encoding="utf-8")))
    specials = ["<|endoftext|>"]
    vocab, merges = train_bpe_from_text(train_text, vocab_size, specials)
    tokenizer = tokenizers.Tokenizer(vocab, merges, specials)
    atomic_write_text(cached, json.dumps(tokenizer.to_dict()))
    return tokenizer
