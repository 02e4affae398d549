"""Tests for minigpt.registry: registered files fetched and verified (cache, mirror, a
local HTTP server), GPT-2's tokenizer files, and tokenizer descriptions."""

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from minigpt import data, registry
from minigpt.bpe import train_bpe_from_text
from minigpt.tokenizer import CharTokenizer
from minigpt.tokenizer import Tokenizer as BPETokenizer

MIRROR = os.environ.get(registry.MIRROR_ENV)  # the real mirror, read before tests change the env
needs_mirror = pytest.mark.skipif(
    not MIRROR, reason=f"set {registry.MIRROR_ENV} to a mirror of the data files to run this test"
)
BODY = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
TEXT = BODY.decode()


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


def _entry(url: str, **kw) -> registry.Entry:
    kw.setdefault("sha256", hashlib.sha256(BODY).hexdigest())
    return registry.Entry("tiny", url, "tiny/input.txt", **kw)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_registry_matches_the_mirror_readme():
    assert set(registry.REGISTRY) == {
        "tinyshakespeare",
        "gpt2-encoder",
        "gpt2-vocab",
        "sms-spam",
        "instruction-data",
    }
    assert registry.REGISTRY["gpt2-vocab"].sha256.startswith("1ce1664773c5")
    assert registry.REGISTRY["sms-spam"].sha256 is None and registry.REGISTRY["sms-spam"].member
    with pytest.raises(ValueError, match="exactly one"):
        registry.Entry("x", "http://x", "x/y")


def test_unknown_name_lists_known_names(cache):
    with pytest.raises(ValueError, match="tinyshakespeare"):
        registry.path("shakespeare")


def test_cache_dir_default_is_per_user(monkeypatch):
    monkeypatch.delenv(registry.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/nonexistent-xdg")
    assert registry.cache_dir().name == "minigpt"


def test_cache_hit_needs_no_mirror_or_network(cache, closed_url):
    entry = _entry(closed_url)
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny/input.txt").write_bytes(BODY)
    assert registry.path(entry) == cache / "tiny/input.txt"


def test_corrupted_cache_file_is_fetched_again(cache, server):
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny/input.txt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupted"):
        assert registry.path(_entry(server + "/good")).read_bytes() == BODY


def test_mirror_hit_is_copied_into_the_cache(cache, tmp_path, monkeypatch, closed_url):
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny/input.txt").write_bytes(BODY)
    monkeypatch.setenv(registry.MIRROR_ENV, str(mirror))
    got = registry.path(_entry(closed_url))
    assert got == cache / "tiny/input.txt" and got.read_bytes() == BODY


def test_corrupted_mirror_file_is_an_error_and_never_cached(cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "tiny").mkdir(parents=True)
    (mirror / "tiny/input.txt").write_bytes(BODY + b"!")
    monkeypatch.setenv(registry.MIRROR_ENV, str(mirror))
    expected = hashlib.sha256(BODY).hexdigest()
    actual = hashlib.sha256(BODY + b"!").hexdigest()
    with pytest.raises(registry.VerificationError) as err:
        registry.path(_entry("http://127.0.0.1:9/never"))
    assert str(mirror / "tiny/input.txt") in str(err.value)
    assert expected in str(err.value) and actual in str(err.value)
    assert _files(cache) == []


def test_download_lands_verified_then_hits_the_cache(cache, server):
    entry = _entry(server + "/good")
    got = registry.path(entry)
    assert got.read_bytes() == BODY and _files(cache) == [got]
    offline = _entry("http://127.0.0.1:9/never")
    assert registry.path(offline) == got


def test_download_from_a_zip_member(cache, server):
    got = registry.path(_entry(server + "/zip", member="a.txt"))
    assert got.read_bytes() == BODY
    with pytest.raises(registry.VerificationError, match="no item named"):
        registry.path(registry.Entry("z", server + "/zip", "z/b.txt", sha256="0" * 64,
                                     member="b.txt"))
    assert _files(cache) == [got]


@pytest.mark.parametrize(
    ("route", "error", "message"),
    [
        ("/short", registry.DownloadError, "incomplete download"),
        ("/wrong", registry.VerificationError, "expected sha256"),
        ("/missing", registry.DownloadError, "Not Found"),
    ],
)
def test_bad_download_never_lands_in_the_cache(cache, server, route, error, message):
    with pytest.raises(error, match=message):
        registry.path(_entry(server + route))
    assert _files(cache) == []


def test_offline_without_mirror_names_the_url_and_the_env_var(cache, closed_url):
    with pytest.raises(registry.DownloadError) as err:
        registry.path(_entry(closed_url))
    assert isinstance(err.value, RuntimeError)
    assert closed_url in str(err.value) and registry.MIRROR_ENV in str(err.value)
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
    monkeypatch.setattr(registry, "DEFAULT_MAX_BYTES", 200_000, raising=False)
    entry = _entry(server + "/endless", **cap)
    with pytest.raises(registry.DownloadError, match=f"more than the {entry.limit} bytes"):
        registry.path(entry)
    assert entry.limit == cap.get("max_bytes", cap.get("size", 200_000))
    assert _files(cache) == []


def test_a_body_announced_too_long_is_refused_before_reading(cache, server):
    with pytest.raises(registry.DownloadError, match="announces 101010101010 bytes"):
        registry.path(_entry(server + "/huge", max_bytes=100_000))
    assert _files(cache) == []


@pytest.mark.slow
def test_a_dripping_server_hits_the_overall_deadline(cache, server, monkeypatch):
    monkeypatch.setattr(registry, "DOWNLOAD_GRACE_S", 1.0, raising=False)
    monkeypatch.setattr(registry, "MIN_BYTES_PER_S", 1e12, raising=False)  # deadline: 1 s
    start = time.monotonic()
    with pytest.raises(registry.DownloadError, match=r"too slow: \d+ bytes in \d+\.\d s"):
        registry.path(_entry(server + "/drip"))  # 100 bytes, one per 50 ms: 5 s in all
    assert time.monotonic() - start < 4
    assert _files(cache) == []


def test_every_registry_entry_bounds_its_download():
    for entry in registry.REGISTRY.values():
        assert entry.size is not None or entry.max_bytes is not None, entry.name
        assert entry.limit <= 2 << 20


def test_the_mirror_copy_is_what_gets_verified(cache, tmp_path, monkeypatch, closed_url):
    """A mirror file swapped right after it was checked must not land in the cache."""
    source = tmp_path / "mirror/tiny/input.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(BODY)
    monkeypatch.setenv(registry.MIRROR_ENV, str(tmp_path / "mirror"))
    real_sha256_file = registry.sha256_file

    def check_then_swap(file: Path) -> str:
        digest = real_sha256_file(file)
        if Path(file) == source:
            source.write_bytes(BODY.upper())  # same size, other bytes
        return digest

    monkeypatch.setattr(registry, "sha256_file", check_then_swap)
    try:
        landed = registry.path(_entry(closed_url)).read_bytes()
    except registry.VerificationError:
        landed = None
    assert landed in (BODY, None)  # the verified bytes, or nothing
    assert [f.read_bytes() for f in _files(cache)] == ([landed] if landed else [])


def test_a_mirror_file_too_long_is_refused(cache, tmp_path, monkeypatch, closed_url):
    source = tmp_path / "mirror/tiny/input.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(BODY * 100)
    monkeypatch.setenv(registry.MIRROR_ENV, str(tmp_path / "mirror"))
    with pytest.raises(registry.VerificationError, match="longer than the 1000 bytes"):
        registry.path(_entry(closed_url, max_bytes=1000))
    assert _files(cache) == []


def test_orphans_of_dead_writers_are_swept_on_the_next_write(cache, tmp_path, monkeypatch):
    (tmp_path / "mirror/tiny").mkdir(parents=True)
    (tmp_path / "mirror/tiny/input.txt").write_bytes(BODY)
    monkeypatch.setenv(registry.MIRROR_ENV, str(tmp_path / "mirror"))
    pid = _dead_pid()
    orphans = [cache / f"tiny/.input.txt.{pid}.k9x2.tmp", tmp_path / f"bins/.train.bin.{pid}.a.tmp"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"half a file")
    assert registry.path(_entry("http://127.0.0.1:9/never")).read_bytes() == BODY
    data.prepare_bin(TEXT, CharTokenizer.from_text(TEXT), tmp_path / "bins")
    assert not any(orphan.exists() for orphan in orphans)
    assert _files(cache) == [cache / "tiny/input.txt"]


def test_sms_spam_is_checked_by_format(tmp_path):
    bad = tmp_path / "SMSSpamCollection"
    bad.write_text("ham\thello\nspam\tbuy now\n")
    with pytest.raises(registry.VerificationError, match="expected 5574 lines"):
        registry.REGISTRY["sms-spam"].verify(bad)
    bad.write_text("ham hello\n")
    with pytest.raises(registry.VerificationError, match="line 1"):
        registry.REGISTRY["sms-spam"].verify(bad)


@needs_mirror
def test_every_registered_file_verifies_from_the_mirror(cache, monkeypatch):
    monkeypatch.setenv(registry.MIRROR_ENV, MIRROR)
    for name, entry in registry.REGISTRY.items():
        got = registry.path(name)
        assert got.is_relative_to(cache)
        assert entry.size in (None, got.stat().st_size) and got.stat().st_size <= entry.limit


@needs_mirror
def test_tiktoken_gpt2_works_offline_from_the_mirror(cache, monkeypatch):
    monkeypatch.setenv(registry.MIRROR_ENV, MIRROR)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/the/users/own/setting")

    def no_network(url: str) -> bytes:
        raise AssertionError(f"tiktoken tried to fetch {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # force a fresh load from disk
    enc = registry.tiktoken_gpt2()
    assert enc.name == "gpt2" and enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert os.environ["TIKTOKEN_CACHE_DIR"] == "/the/users/own/setting"


@needs_mirror
@pytest.mark.slow
def test_load_tokenizer_rebuilds_every_kind_of_description(cache, monkeypatch):
    monkeypatch.setenv(registry.MIRROR_ENV, MIRROR)
    gpt2 = registry.gpt2_tokenizer()
    d = json.loads(json.dumps(gpt2.to_dict()))
    assert d["type"] == "gpt2" and str(cache) not in json.dumps(d)
    text = "Hello world<|endoftext|> again"
    assert registry.load_tokenizer(d).encode(text) == gpt2.encode(text) == [
        15496, 995, 50256, 757,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="sha256"):
        registry.load_tokenizer({**d, "vocab_bpe_sha256": "0" * 64})
    char = CharTokenizer.from_text(TEXT)
    assert registry.load_tokenizer(char.to_dict()).chars == char.chars
    vocab, merges = train_bpe_from_text(TEXT, 270, ["<|endoftext|>"])
    bpe = BPETokenizer(vocab, merges, ["<|endoftext|>"])
    assert registry.load_tokenizer(json.loads(json.dumps(bpe.to_dict()))).vocab == bpe.vocab
    with pytest.raises(ValueError, match="wordpiece"):
        registry.load_tokenizer({"type": "wordpiece"})
