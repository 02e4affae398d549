"""Tests for minigpt.data: registry, verified fetch (cache, mirror, local HTTP), token bins."""

import ast
import hashlib
import http.server
import inspect
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

from minigpt import data
from minigpt.bpe import train_bpe_from_text
from minigpt.tokenizer import CharTokenizer
from minigpt.tokenizer import Tokenizer as BPETokenizer

MIRROR = os.environ.get(data.MIRROR_ENV)  # the real mirror, read before tests change the env
needs_mirror = pytest.mark.skipif(
    not MIRROR, reason=f"set {data.MIRROR_ENV} to a mirror of the data files to run this test"
)
BODY = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50


def _zip(member: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, content)
        zf.writestr("readme", b"not this one")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves BODY at /good, wrong bytes at /wrong, a truncated body at /short, a zip at /zip;
    a body without end at /endless (bounded at 4 MiB so that a test without a cap ends), a
    body announced as 1 TB at /huge, and 100 bytes at one per 50 ms at /drip."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        try:
            self._serve()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should

    def _serve(self) -> None:
        if self.path in ("/endless", "/drip", "/huge"):
            self.send_response(200)
            if self.path != "/endless":
                self.send_header("Content-Length", "100" if self.path == "/drip" else "10" * 6)
            self.end_headers()
            if self.path == "/drip":
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                for _ in range(64):
                    self.wfile.write(b"y" * (1 << 16))
            return
        body = {"/good": BODY, "/wrong": BODY[::-1], "/short": BODY, "/zip": _zip("a.txt", BODY)}
        if self.path not in body:
            self.send_error(404)
            return
        claimed = len(body[self.path]) + (1000 if self.path == "/short" else 0)
        self.send_response(200)
        self.send_header("Content-Length", str(claimed))
        self.end_headers()
        self.wfile.write(body[self.path])  # HTTP/1.0: the connection closes after this

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    return tmp_path / "cache"


def _entry(url: str, **kw) -> data.Entry:
    kw.setdefault("sha256", hashlib.sha256(BODY).hexdigest())
    return data.Entry("tiny", url, "tiny/input.txt", **kw)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_registry_matches_the_mirror_readme():
    assert set(data.REGISTRY) == {
        "tinyshakespeare",
        "gpt2-encoder",
        "gpt2-vocab",
        "sms-spam",
        "instruction-data",
    }
    assert data.REGISTRY["gpt2-vocab"].sha256.startswith("1ce1664773c5")
    assert data.REGISTRY["sms-spam"].sha256 is None and data.REGISTRY["sms-spam"].member
    with pytest.raises(ValueError, match="exactly one"):
        data.Entry("x", "http://x", "x/y")


def test_unknown_name_lists_known_names(cache):
    with pytest.raises(ValueError, match="tinyshakespeare"):
        data.path("shakespeare")


def test_cache_dir_default_is_per_user(monkeypatch):
    monkeypatch.delenv(data.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-xdg")
    assert data.cache_dir().name == "minigpt"


def test_cache_hit_needs_no_mirror_or_network(cache, closed_url):
    entry = _entry(closed_url)
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny/input.txt").write_bytes(BODY)
    assert data.path(entry) == cache / "tiny/input.txt"


def test_corrupted_cache_file_is_fetched_again(cache, server):
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny/input.txt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupted"):
        assert data.path(_entry(server + "/good")).read_bytes() == BODY


def test_mirror_hit_is_copied_into_the_cache(cache, tmp_path, monkeypatch, closed_url):
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny/input.txt").write_bytes(BODY)
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    got = data.path(_entry(closed_url))
    assert got == cache / "tiny/input.txt" and got.read_bytes() == BODY


def test_corrupted_mirror_file_is_an_error_and_never_cached(cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny/input.txt").write_bytes(BODY + b"!")
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    expected = hashlib.sha256(BODY).hexdigest()
    actual = hashlib.sha256(BODY + b"!").hexdigest()
    with pytest.raises(data.VerificationError) as err:
        data.path(_entry("http://127.0.0.1:9/never"))
    assert str(mirror / "tiny/input.txt") in str(err.value)
    assert expected in str(err.value) and actual in str(err.value)
    assert _files(cache) == []


def test_download_lands_verified_then_hits_the_cache(cache, server):
    entry = _entry(server + "/good")
    got = data.path(entry)
    assert got.read_bytes() == BODY and _files(cache) == [got]
    offline = _entry("http://127.0.0.1:9/never")
    assert data.path(offline) == got


def test_download_from_a_zip_member(cache, server):
    got = data.path(_entry(server + "/zip", member="a.txt"))
    assert got.read_bytes() == BODY
    with pytest.raises(data.VerificationError, match="no item named"):
        data.path(data.Entry("z", server + "/zip", "z/b.txt", sha256="0" * 64, member="b.txt"))
    assert _files(cache) == [got]


@pytest.mark.parametrize(
    ("route", "error", "message"),
    [
        ("/short", data.DownloadError, "incomplete download"),
        ("/wrong", data.VerificationError, "expected sha256"),
        ("/missing", data.DownloadError, "Not Found"),
    ],
)
def test_bad_download_never_lands_in_the_cache(cache, server, route, error, message):
    with pytest.raises(error, match=message):
        data.path(_entry(server + route))
    assert _files(cache) == []


def test_offline_without_mirror_names_the_url_and_the_env_var(cache, closed_url):
    with pytest.raises(data.DownloadError) as err:
        data.path(_entry(closed_url))
    assert isinstance(err.value, RuntimeError)
    assert closed_url in str(err.value) and data.MIRROR_ENV in str(err.value)
    assert "tiny/input.txt" in str(err.value)
    assert _files(cache) == []


def _dead_pid() -> int:
    """The id of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize(
    "cap",
    [{"max_bytes": 100_000}, {"size": len(BODY)}, {}],
    ids=["max_bytes", "size", "default"],
)
def test_an_endless_body_stops_at_the_entry_limit(cache, server, monkeypatch, cap):
    monkeypatch.setattr(data, "DEFAULT_MAX_BYTES", 200_000, raising=False)
    entry = _entry(server + "/endless", **cap)
    with pytest.raises(data.DownloadError, match=f"more than the {entry.limit} bytes"):
        data.path(entry)
    assert entry.limit == cap.get("max_bytes", cap.get("size", 200_000))
    assert _files(cache) == []


def test_a_body_announced_too_long_is_refused_before_reading(cache, server):
    with pytest.raises(data.DownloadError, match="announces 101010101010 bytes"):
        data.path(_entry(server + "/huge", max_bytes=100_000))
    assert _files(cache) == []


@pytest.mark.slow
def test_a_dripping_server_hits_the_overall_deadline(cache, server, monkeypatch):
    monkeypatch.setattr(data, "DOWNLOAD_GRACE_S", 1.0, raising=False)
    monkeypatch.setattr(data, "MIN_BYTES_PER_S", 1e12, raising=False)  # deadline: 1 s
    start = time.monotonic()
    with pytest.raises(data.DownloadError, match=r"too slow: \d+ bytes in \d+\.\d s"):
        data.path(_entry(server + "/drip"))  # 100 bytes, one per 50 ms: 5 s in all
    assert time.monotonic() - start < 4
    assert _files(cache) == []


def test_every_registry_entry_bounds_its_download():
    for entry in data.REGISTRY.values():
        assert entry.size is not None or entry.max_bytes is not None, entry.name
        assert entry.limit <= 2 << 20


def test_the_mirror_copy_is_what_gets_verified(cache, tmp_path, monkeypatch, closed_url):
    """A mirror file swapped right after it was checked must not land in the cache."""
    source = tmp_path / "mirror/tiny/input.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(BODY)
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "mirror"))
    real_sha256_file = data.sha256_file

    def check_then_swap(file: Path) -> str:
        digest = real_sha256_file(file)
        if Path(file) == source:
            source.write_bytes(BODY.upper())  # same size, other bytes
        return digest

    monkeypatch.setattr(data, "sha256_file", check_then_swap)
    try:
        landed = data.path(_entry(closed_url)).read_bytes()
    except data.VerificationError:
        landed = None
    assert landed in (BODY, None)  # the verified bytes, or nothing
    assert [f.read_bytes() for f in _files(cache)] == ([landed] if landed else [])


def test_a_mirror_file_too_long_is_refused(cache, tmp_path, monkeypatch, closed_url):
    source = tmp_path / "mirror/tiny/input.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(BODY * 100)
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "mirror"))
    with pytest.raises(data.VerificationError, match="longer than the 1000 bytes"):
        data.path(_entry(closed_url, max_bytes=1000))
    assert _files(cache) == []


def test_orphans_of_dead_writers_are_swept_on_the_next_write(cache, tmp_path, monkeypatch):
    (tmp_path / "mirror/tiny").mkdir(parents=True)
    (tmp_path / "mirror/tiny/input.txt").write_bytes(BODY)
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "mirror"))
    pid = _dead_pid()
    orphans = [cache / f"tiny/.input.txt.{pid}.k9x2.tmp", tmp_path / f"bins/.train.bin.{pid}.a.tmp"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"half a file")
    assert data.path(_entry("http://127.0.0.1:9/never")).read_bytes() == BODY
    data.prepare_bin(TEXT, CharTokenizer.from_text(TEXT), tmp_path / "bins")
    assert not any(orphan.exists() for orphan in orphans)
    assert _files(cache) == [cache / "tiny/input.txt"]


def test_sms_spam_is_checked_by_format(tmp_path):
    bad = tmp_path / "SMSSpamCollection"
    bad.write_text("ham\thello\nspam\tbuy now\n")
    with pytest.raises(data.VerificationError, match="expected 5574 lines"):
        data.REGISTRY["sms-spam"].verify(bad)
    bad.write_text("ham hello\n")
    with pytest.raises(data.VerificationError, match="line 1"):
        data.REGISTRY["sms-spam"].verify(bad)


@needs_mirror
def test_every_registered_file_verifies_from_the_mirror(cache, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, MIRROR)
    for name, entry in data.REGISTRY.items():
        got = data.path(name)
        assert got.is_relative_to(cache)
        assert entry.size in (None, got.stat().st_size) and got.stat().st_size <= entry.limit


@needs_mirror
def test_tiktoken_gpt2_works_offline_from_the_mirror(cache, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, MIRROR)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/the/users/own/setting")

    def no_network(url: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # force a fresh load from disk
    enc = data.tiktoken_gpt2()
    assert enc.name == "gpt2" and enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/the/users/own/setting"


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


class _Counting(CharTokenizer):
    calls = 0

    def encode(self, text: str) -> list[int]:
        type(self).calls += 1
        return super().encode(text)


def test_prepare_bin_splits_and_round_trips(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    meta = data.prepare_bin(TEXT, tok, tmp_path, val_fraction=0.25, chunk_chars=100)
    train, val = data.load_bin(tmp_path / "train.bin"), data.load_bin(tmp_path / "val.bin")
    assert train.dtype == np.uint16 and (meta["train_tokens"], meta["val_tokens"]) == (
        len(train),
        len(val),
    )
    assert len(val) == len(TEXT) // 4
    assert tok.decode(np.concatenate([train, val])) == TEXT
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert meta["source_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()


@needs_mirror
def test_prepare_bin_chunks_like_the_whole_text_for_gpt2_bpe(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, MIRROR)
    enc = data.tiktoken_gpt2()

    class Gpt2:
        vocab_size = enc.n_vocab

        def encode(self, text: str) -> list[int]:
            return enc.encode_ordinary(text)

    source = tmp_path / "corpus.txt"
    source.write_text(TEXT + "  \n\n  end")
    data.prepare_bin(source, Gpt2(), tmp_path / "bin", val_fraction=0.0, chunk_chars=37)
    got = np.fromfile(tmp_path / "bin/train.bin", dtype=np.uint16)
    assert got.tolist() == enc.encode_ordinary(source.read_text())


def test_prepare_bin_is_cached_and_rebuilds_on_change(tmp_path):
    tok = _Counting.from_text(TEXT)
    source = tmp_path / "corpus.txt"
    source.write_text(TEXT)
    first = data.prepare_bin(source, tok, tmp_path / "bin")
    calls = _Counting.calls
    assert data.prepare_bin(source, tok, tmp_path / "bin") == first
    assert _Counting.calls == calls  # no re-tokenising
    source.write_text(TEXT[::-1])
    changed = data.prepare_bin(source, tok, tmp_path / "bin")
    assert changed["source_sha256"] != first["source_sha256"] and _Counting.calls > calls
    other_tok = _Counting.from_text(TEXT + "#")
    assert data.prepare_bin(source, other_tok, tmp_path / "bin")["tokenizer"] != first["tokenizer"]


def test_load_bin_rejects_an_empty_split(tmp_path):
    data.prepare_bin(TEXT, CharTokenizer.from_text(TEXT), tmp_path, val_fraction=0.0)
    assert len(data.load_bin(tmp_path / "train.bin")) == len(TEXT)
    with pytest.raises(data.BinError, match="val_fraction > 0"):
        data.load_bin(tmp_path / "val.bin")


def test_prepare_bin_rejects_bad_input(tmp_path):
    class Huge(CharTokenizer):
        vocab_size = 70_000

    with pytest.raises(ValueError, match="uint16"):
        data.prepare_bin(TEXT, Huge.from_text(TEXT), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        data.prepare_bin("", CharTokenizer("a"), tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        data.prepare_bin(TEXT, CharTokenizer.from_text(TEXT), tmp_path, val_fraction=1.0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    with pytest.raises(ValueError, match=r"pathlib\.Path"):  # a str is the text, not a path
        data.prepare_bin(str(corpus), CharTokenizer.from_text(TEXT + str(corpus)), tmp_path)
    assert not (tmp_path / "train.bin").exists() and not (tmp_path / "meta.json").exists()


def test_meta_records_what_each_bin_is(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    meta = data.prepare_bin(TEXT, tok, tmp_path)
    for name in ("train.bin", "val.bin"):
        raw = (tmp_path / name).read_bytes()
        record = {"bytes": len(raw), "tokens": len(raw) // 2}
        assert meta["files"][name] == {**record, "sha256": hashlib.sha256(raw).hexdigest()}
    assert (meta["vocab_size"], meta["dtype"]) == (tok.vocab_size, "uint16")


def test_a_tampered_bin_is_refused_by_load_bin_and_rebuilt_by_prepare_bin(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    meta = data.prepare_bin(TEXT, tok, tmp_path)
    train = tmp_path / "train.bin"
    good = train.read_bytes()
    tampered = bytearray(good)
    tampered[10] ^= 1  # same size, one id changed
    train.write_bytes(tampered)
    with pytest.raises(data.BinError, match=re.escape(f"{train} changed after it was written")):
        data.load_bin(train)
    with pytest.warns(UserWarning, match="rebuilding token bins"):
        assert data.prepare_bin(TEXT, tok, tmp_path) == meta
    assert train.read_bytes() == good
    assert len(data.load_bin(train)) == meta["train_tokens"]
    train.write_bytes(good[:-2])
    with pytest.raises(data.BinError, match=re.escape(f"{train} has {len(good) - 2} bytes")):
        data.load_bin(train)


def test_load_bin_checks_the_id_range_once_at_the_boundary(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    data.prepare_bin(TEXT, tok, tmp_path)
    train = tmp_path / "train.bin"
    top = int(np.fromfile(train, dtype=np.uint16).max())
    assert len(data.load_bin(train, vocab_size=top + 1)) == train.stat().st_size // 2
    with pytest.raises(data.BinError, match=f"token id {top}, not below the vocabulary size {top}"):
        data.load_bin(train, vocab_size=top)  # e.g. a model with a smaller vocabulary
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "vocab_size": 3}))
    with pytest.raises(data.BinError, match="not below the vocabulary size 3"):
        data.load_bin(train)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(data.BinError, match="no record in"):
        data.load_bin(train)  # a bin without its record is not trusted


def test_every_failure_is_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("café\n".encode("latin-1"))
    tok = CharTokenizer.from_text(TEXT)
    cases = [
        (lambda: data.path("shakespeare"), data.DataInputError, "use one of"),
        (lambda: data.Entry("x", "http://x", "x/y"), data.DataInputError, "give one"),
        (lambda: data.prepare_bin(TEXT, tok, tmp_path, 1.0), data.DataInputError, "e.g. 0.1"),
        (lambda: data.prepare_bin(tmp_path / "nope.txt", tok, tmp_path), data.DataInputError,
         "check the path"),
        (lambda: data.prepare_bin(not_utf8, tok, tmp_path), data.DataInputError,
         "convert it to UTF-8"),
        (lambda: data.load_bin(tmp_path / "nope.bin"), data.BinError, "build it again"),
        (lambda: data.get_batch(np.arange(9), 0, 4), data.DataInputError, "positive sizes"),
        (lambda: data.get_batch(np.arange(3), 1, 4), data.DataInputError, "shorter context"),
        (lambda: data.load_tokenizer({"type": "x"}), data.DataInputError, "to_dict()"),
    ]  # fmt: skip
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "file" / "cache"))
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path / "mirror"))
    (tmp_path / "mirror/tiny").mkdir(parents=True)
    (tmp_path / "mirror/tiny/input.txt").write_bytes(BODY)
    cases.append((lambda: data.path(_entry("http://127.0.0.1:9/never")), data.CacheError,
                  f"set {data.CACHE_ENV} to another folder"))  # fmt: skip
    for call, error, todo in cases:
        with pytest.raises(error) as err:
            call()
        assert isinstance(err.value, data.DataError)
        assert "\n" not in str(err.value) and todo in str(err.value)


def test_data_functions_fit_on_a_screen():
    tree = ast.parse(inspect.getsource(data))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            body = node.body[1:] if ast.get_docstring(node) else node.body
            assert body[-1].end_lineno - body[0].lineno + 1 <= 60, node.name
    shown = inspect.getsource(data.get_batch).splitlines()  # chapter 5 displays it
    assert len(shown) <= 60 and max(map(len, shown)) <= 88


def test_get_batch_shapes_shift_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(tokens, 4, 16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y, x + 1)  # consecutive tokens: each target is the next token
    x2, y2 = data.get_batch(tokens, 4, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = data.get_batch(tokens, 4, 16, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_get_batch_uses_every_window_and_rejects_short_data():
    tokens = np.arange(5, dtype=np.uint16)
    x, y = data.get_batch(tokens, 64, 4, generator=torch.Generator().manual_seed(0))
    assert x[:, 0].unique().tolist() == [0] and y[:, -1].unique().tolist() == [4]
    with pytest.raises(ValueError, match="at least 6"):
        data.get_batch(tokens, 1, 5)


@needs_mirror
@pytest.mark.slow
def test_load_tokenizer_rebuilds_every_kind_of_description(cache, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, MIRROR)
    gpt2 = data.gpt2_tokenizer()
    d = json.loads(json.dumps(gpt2.to_dict()))
    assert d["type"] == "gpt2" and str(cache) not in json.dumps(d)
    text = "Hello world<|endoftext|> again"
    assert data.load_tokenizer(d).encode(text) == gpt2.encode(text) == [
        15496, 995, 50256, 757,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="sha256"):
        data.load_tokenizer({**d, "vocab_bpe_sha256": "0" * 64})
    char = CharTokenizer.from_text(TEXT)
    assert data.load_tokenizer(char.to_dict()).chars == char.chars
    vocab, merges = train_bpe_from_text(TEXT, 270, ["<|endoftext|>"])
    bpe = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    assert data.load_tokenizer(json.loads(json.dumps(bpe.to_dict()))).vocab == bpe.vocab
    with pytest.raises(ValueError, match="wordpiece"):
        data.load_tokenizer({"type": "wordpiece"})


@needs_mirror
@pytest.mark.slow
def test_prepare_bin_identifies_gpt2_by_content_not_by_path(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(data.MIRROR_ENV, MIRROR)
    here = data.gpt2_tokenizer()
    for name, file in (("gpt2-encoder", "encoder.json"), ("gpt2-vocab", "vocab.bpe")):
        (tmp_path / file).write_bytes(data.path(name).read_bytes())
    elsewhere = BPETokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    first = data.prepare_bin(TEXT, here, tmp_path / "bin")
    assert data.prepare_bin(TEXT, elsewhere, tmp_path / "bin") == first


def test_prepare_data_hashes_each_bin_once_per_call(cache, tmp_path, monkeypatch):
    """Building or reusing bins reads each one once: no second SHA-256 to map it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    real, digests = hashlib.sha256, []

    class CountingSha256:
        def __init__(self, *args: bytes) -> None:
            self.h = real(*args)

        def update(self, block: bytes) -> None:
            self.h.update(block)

        def hexdigest(self) -> str:
            digests.append(self.h.hexdigest())
            return digests[-1]

    monkeypatch.setattr(hashlib, "sha256", CountingSha256)
    spec = data.DataSpec(dataset=str(corpus))
    for _ in range(2):  # the first call writes the bins, the second checks the cached ones
        digests.clear()
        tok, train, val = data.prepare_data(spec)
        meta = json.loads((data.bins_dir(spec) / "meta.json").read_text())
        for name in data.BIN_FILES:
            assert digests.count(meta["files"][name]["sha256"]) == 1, name
        assert len(train) + len(val) == len(TEXT) * 20 and tok.vocab_size == len(set(TEXT))
