"""The registry: named public files, fetched once, verified, and kept in a cache.

``path(name)`` returns a local, verified copy of a registered file. It looks in three places:

1. the cache directory (env ``MINIGPT_CACHE_DIR``; default: the platform's user cache dir,
   e.g. ``~/.cache/minigpt``); a cached file is re-verified on every call;
2. a local mirror directory (env ``MINIGPT_DATA_MIRROR``) laid out like the cache, e.g.
   ``$MINIGPT_DATA_MIRROR/tinyshakespeare/input.txt``; the file is copied into the cache, so
   the mirror is only read once and may be read-only;
3. the file's canonical URL (standard-library ``urllib``), with a progress bar.

``gpt2_tokenizer()`` and ``tiktoken_gpt2()`` build GPT-2's tokenizer from those files, and
``load_tokenizer(d)`` rebuilds any tokenizer from its ``to_dict()`` description. Token bins
and training batches are ``minigpt.data``'s.

Design choices:

- Verify what lands, not what was read. Every copy (download, mirror file, zip member) is
  hashed while it is written into a temporary file; that temporary file is checked and only
  then renamed to its final name. A source swapped after a check cannot slip through.
- Bounded downloads. Each registry entry knows its exact size (or an upper bound): a body
  longer than that stops the transfer at once. A transfer must also end within
  ``DOWNLOAD_GRACE_S + limit / MIN_BYTES_PER_S`` seconds in total, so an endless body or a
  server that drips one byte at a time ends in a ``DownloadError``, not a full disk or a hang.
- Every write goes through ``minigpt.atomic.atomic_writer`` (fsync, atomic rename, mode
  0644); it also removes temporaries of writers that were killed, at the next write there.
- One error family: every failure is a ``DataError`` (bad arguments also a ``ValueError``)
  whose message is one line that says what to do; ``minigpt.data`` raises the same family.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import tiktoken

from minigpt import tokenizer as tokenizers
from minigpt.atomic import atomic_writer

MIRROR_ENV = "MINIGPT_DATA_MIRROR"
CACHE_ENV = "MINIGPT_CACHE_DIR"
DEFAULT_MAX_BYTES = 256 << 20  # cap for an Entry that states neither size= nor max_bytes=
READ_TIMEOUT_S = 30.0  # longest wait for any single network read
DOWNLOAD_GRACE_S = 60.0  # a download may take this long plus limit / MIN_BYTES_PER_S
MIN_BYTES_PER_S = 20_000
_CHUNK = 1 << 16  # bytes per read when hashing a file


class DataError(RuntimeError):
    """Base class of the errors of ``minigpt.registry`` and ``minigpt.data``."""


class DownloadError(DataError):
    """A file could not be fetched (offline, HTTP error, truncated, too long or too slow)."""


class VerificationError(DataError):
    """A file's content does not match its registry entry."""


class CacheError(DataError):
    """A file could not be written into the cache."""


class DataInputError(DataError, ValueError):
    """A bad argument: an unknown name, a bad fraction or size, an unusable corpus."""


@dataclass(frozen=True)
class Entry:
    """One registered file.

    ``path`` is the file's place relative to the cache and mirror roots. A file is verified by
    its ``sha256`` or, when no byte-exact hash can be pinned, by a ``check`` that raises
    ``VerificationError`` describing the problem. If ``member`` is set, ``url`` points to a
    zip archive and the file is the archive member of that name. ``size`` is the file's exact
    size in bytes, if known; ``max_bytes`` bounds the download (the archive, for a member)
    and the file; without either, ``DEFAULT_MAX_BYTES`` does.
    """

    name: str
    url: str
    path: str
    sha256: str | None = None
    check: Callable[[Path], None] | None = None
    member: str | None = None
    size: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.sha256 is None) == (self.check is None):
            raise DataInputError(
                f"entry {self.name!r} needs exactly one of sha256= or check=; give one"
            )

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def limit(self) -> int:
        """The most bytes a download of this entry, or the file itself, may have."""
        return self.max_bytes or self.size or DEFAULT_MAX_BYTES

    def problem(self, file: Path, sha256: str | None = None) -> str | None:
        """What is wrong with ``file`` as this entry's file, or ``None``.

        ``sha256`` is the file's digest if the caller computed it while writing the file.
        """
        size = Path(file).stat().st_size
        if self.size is not None and size != self.size:
            return f"it has {size} bytes, expected {self.size}"
        if size > self.limit:
            return f"it is longer than the {self.limit} bytes this file can have"
        if self.check is not None:
            try:
                self.check(Path(file))
            except VerificationError as err:
                return str(err)
            return None
        actual = sha256 or sha256_file(file)
        if actual != self.sha256:
            return f"expected sha256 {self.sha256}, got {actual}"
        return None

    def verify(
        self,
        file: Path,
        *,
        sha256: str | None = None,
        shown: str | os.PathLike | None = None,
        todo: str = "delete it and call minigpt.registry.path again",
    ) -> None:
        """Raise ``VerificationError`` (naming ``shown``, default ``file``) unless ``file`` is
        this entry's file; the message ends with ``todo``."""
        problem = self.problem(file, sha256)
        if problem is not None:
            raise VerificationError(
                f"{shown or file} is not the expected {self.name!r} file: {problem}; {todo}"
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
                f"not the SMS Spam Collection: line {i} is not 'ham|spam<TAB>text'"
            )
        counts[label] += 1
    got = (len(lines), counts[b"ham"], counts[b"spam"])
    if got != (5574, 4827, 747):
        raise VerificationError(
            f"not the SMS Spam Collection: expected 5574 lines (4827 ham, 747 spam), "
            f"got {got[0]} lines ({got[1]} ham, {got[2]} spam)"
        )


_GH = "https://raw.githubusercontent.com/"
_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# fmt: off
REGISTRY: dict[str, Entry] = {e.name: e for e in [
    Entry("tinyshakespeare", _GH + "karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
          "tinyshakespeare/input.txt", size=1_115_394,
          sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    Entry("gpt2-encoder", _GPT2 + "encoder.json", "gpt2/encoder.json", size=1_042_301,
          sha256=tokenizers.GPT2_FILES_SHA256["encoder_json_sha256"]),
    Entry("gpt2-vocab", _GPT2 + "vocab.bpe", "gpt2/vocab.bpe", size=456_318,
          sha256=tokenizers.GPT2_FILES_SHA256["vocab_bpe_sha256"]),
    # Copies of this file differ in bytes from the one in the UCI zip, so no hash is pinned:
    # the content is checked by its documented format instead. The zip is about 200 kB and
    # the file 478 kB; 1 MiB bounds both.
    Entry("sms-spam", "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
          "sms_spam/SMSSpamCollection", check=_check_sms_spam, member="SMSSpamCollection",
          max_bytes=1 << 20),
    Entry("instruction-data",
          _GH + "rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json",
          "instruction/instruction-data.json", size=203_524,
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
def cache_writer(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """``atomic_writer(dest)``, with a failure of the file system as a one-line CacheError."""
    try:
        with atomic_writer(dest) as pair:
            yield pair
    except OSError as err:
        raise CacheError(
            f"could not write {dest} ({err.strerror or err}); make {dest.parent} writable "
            f"and free some space, or set {CACHE_ENV} to another folder"
        ) from None


def _copy(
    read: Callable[[], bytes],
    out: BinaryIO,
    limit: int,
    on_block: Callable[[int], None] | None = None,
) -> tuple[str, int]:
    """Copy blocks from ``read()`` into ``out`` until it returns ``b""`` or more than ``limit``
    bytes have come; return the SHA-256 of the bytes written and their count."""
    h, n = hashlib.sha256(), 0
    while n <= limit and (block := read()):
        out.write(block)
        h.update(block)
        n += len(block)
        if on_block is not None:
            on_block(len(block))
    return h.hexdigest(), n


def _content_length(response: object, entry: Entry) -> int | None:
    """The announced body size, refused at once if it is more than ``entry`` can have."""
    length = response.headers.get("Content-Length")
    total = int(length) if length is not None and length.isdigit() else None
    if total is not None and total > entry.limit:
        raise DownloadError(
            f"{entry.url} announces {total} bytes, more than the {entry.limit} that "
            f"{entry.name!r} can have; it is not serving that file: use a mirror ({MIRROR_ENV})"
        )
    return total


def _download(entry: Entry, out: BinaryIO, hint: str) -> str:
    """Stream ``entry.url`` into ``out``; return the SHA-256 of what was written.

    The body may not exceed ``entry.limit`` bytes nor take longer than
    ``DOWNLOAD_GRACE_S + entry.limit / MIN_BYTES_PER_S`` seconds in total; any failure, a
    short body included, is a ``DownloadError``.
    """
    from tqdm.auto import tqdm

    seconds = DOWNLOAD_GRACE_S + entry.limit / MIN_BYTES_PER_S
    start = time.monotonic()
    request = urllib.request.Request(entry.url, headers={"User-Agent": "minigpt-book"})

    def tick(n: int) -> None:
        bar.update(n)
        elapsed = time.monotonic() - start
        if elapsed > seconds:
            raise DownloadError(
                f"download of {entry.url} too slow: {bar.n} bytes in {elapsed:.1f} s "
                f"({bar.n / elapsed:.0f} bytes/s, deadline {seconds:.1f} s); try again later, "
                f"or set {MIRROR_ENV} to a directory that holds {entry.path} ({hint})"
            )

    try:
        with urllib.request.urlopen(request, timeout=READ_TIMEOUT_S) as response:
            total = _content_length(response, entry)
            with tqdm(total=total, unit="B", unit_scale=True, desc=entry.filename) as bar:
                digest, n = _copy(lambda: response.read1(_CHUNK), out, entry.limit, tick)
    except (OSError, HTTPException) as err:  # URLError, HTTPError, timeouts, resets
        reason = getattr(err, "reason", None) or err
        raise DownloadError(
            f"could not download {entry.name!r} from {entry.url} ({reason}). To use a local "
            f"copy instead, set {MIRROR_ENV} to a directory that holds {entry.path} ({hint})."
        ) from None
    if n > entry.limit:
        raise DownloadError(
            f"{entry.url} sent more than the {entry.limit} bytes that {entry.name!r} can "
            f"have; it is not serving that file: use a mirror ({MIRROR_ENV})"
        )
    if total is not None and n != total:
        raise DownloadError(
            f"incomplete download of {entry.url}: received {n} of {total} bytes; try again"
        )
    return digest


def _extract(entry: Entry, archive: BinaryIO, out: BinaryIO) -> str:
    """Copy the zip member ``entry.member`` into ``out``; return its SHA-256."""
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(entry.member) as src:
            return _copy(lambda: src.read(_CHUNK), out, entry.limit)[0]
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as err:
        raise VerificationError(
            f"{entry.url} is not a zip archive holding {entry.member!r} ({err}); "
            f"try again later, or use a mirror ({MIRROR_ENV})"
        ) from None


def _fetch(entry: Entry, dest: Path, hint: str) -> None:
    """Download ``entry``, verify the temporary copy and only then place it at ``dest``."""
    with cache_writer(dest) as (out, tmp):
        if entry.member is None:
            digest = _download(entry, out, hint)
        else:
            with tempfile.TemporaryFile(dir=dest.parent) as archive:
                _download(entry, archive, hint)
                digest = _extract(entry, archive, out)
        out.flush()
        entry.verify(
            tmp, sha256=digest, shown=entry.url,
            todo=f"try again later, or use a mirror ({MIRROR_ENV})",
        )  # fmt: skip


def _copy_verified(entry: Entry, source: Path, dest: Path, todo: str) -> None:
    """Copy ``source`` to ``dest``, hashing while copying; verify the copy before placing it."""
    try:
        with open(source, "rb") as src, cache_writer(dest) as (out, tmp):
            digest, _ = _copy(lambda: src.read(_CHUNK), out, entry.limit)
            out.flush()
            entry.verify(tmp, sha256=digest, shown=source, todo=todo)
    except OSError as err:  # reading the source: writing errors are CacheErrors
        raise VerificationError(f"cannot read {source} ({err.strerror}); {todo}") from None


def _entry(name: str | Entry) -> Entry:
    if isinstance(name, Entry):
        return name
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise DataInputError(f"unknown data file {name!r}; use one of: {known}")
    return REGISTRY[name]


def path(name: str | Entry) -> Path:
    """A verified local copy of the registered file ``name`` (or of an ``Entry``).

    Order: cache, then ``$MINIGPT_DATA_MIRROR`` (copied into the cache), then the canonical
    URL. Raises ``DownloadError`` if the file cannot be fetched, ``VerificationError`` if a
    mirror or downloaded file does not match, ``DataInputError`` for an unknown name.
    """
    entry = _entry(name)
    dest = cache_dir() / entry.path
    if dest.is_file():
        problem = entry.problem(dest)
        if problem is None:
            return dest
        warnings.warn(f"re-fetching a corrupted cache file: {dest}: {problem}", stacklevel=2)
    mirror = os.environ.get(MIRROR_ENV)
    source = Path(mirror).expanduser() / entry.path if mirror else None
    if source is not None and source.is_file():
        todo = f"replace it with the original file, or unset {MIRROR_ENV} to download it"
        _copy_verified(entry, source, dest, todo)
    elif mirror:
        _fetch(entry, dest, f"the mirror {mirror} has no such file")
    else:
        _fetch(entry, dest, f"{MIRROR_ENV} is not set")
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
        if not (target.is_file() and entry.problem(target) is None):
            _copy_verified(entry, path(name), target, f"delete {cache_dir()} and try again")
    with _env("TIKTOKEN_CACHE_DIR", str(tk_dir)):
        return tiktoken.get_encoding("gpt2")


def gpt2_tokenizer(special_tokens: Iterable[str] = ("<|endoftext|>",)) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE (``minigpt.tokenizer.Tokenizer``) from its verified files."""
    return tokenizers.Tokenizer.from_gpt2_files(
        path("gpt2-encoder"), path("gpt2-vocab"), special_tokens
    )


def load_tokenizer(d: dict) -> tokenizers.CharTokenizer | tokenizers.Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` description (as kept in checkpoints).

    ``"char"`` and ``"bpe"`` descriptions hold their vocabulary; ``"gpt2"`` names GPT-2's
    published files by their SHA-256, and is rebuilt from this registry's copies of them.
    """
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "char":
        return tokenizers.CharTokenizer.from_dict(d)
    if kind == "bpe":
        return tokenizers.Tokenizer.from_dict(d)
    if kind == "gpt2":
        wanted = {k: d.get(k) for k in tokenizers.GPT2_FILES_SHA256}
        if wanted != tokenizers.GPT2_FILES_SHA256:
            raise DataInputError(
                f"this 'gpt2' description names files with sha256 {wanted}, but GPT-2's files "
                f"are {tokenizers.GPT2_FILES_SHA256}; describe the tokenizer with its to_dict()"
            )
        return gpt2_tokenizer(d.get("special_tokens", ("<|endoftext|>",)))
    raise DataInputError(
        f"unknown tokenizer type {kind!r}; expected 'char', 'bpe' or 'gpt2' "
        "(pass a description written by a tokenizer's to_dict())"
    )
