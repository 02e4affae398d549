"""Tests for minigpt.data: token bins, batches and prepare_data."""

import ast
import hashlib
import inspect
import json
import os
import re

import numpy as np
import pytest
import torch

from minigpt import data, registry
from minigpt.tokenizer import CharTokenizer
from minigpt.tokenizer import Tokenizer as BPETokenizer

MIRROR = os.environ.get(registry.MIRROR_ENV)  # the real mirror, read before tests change the env
needs_mirror = pytest.mark.skipif(
    not MIRROR, reason=f"set {registry.MIRROR_ENV} to a mirror of the data files to run this test"
)
BODY = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50


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
    monkeypatch.setenv(registry.MIRROR_ENV, MIRROR)
    enc = registry.tiktoken_gpt2()

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
        (lambda: registry.path("shakespeare"), registry.DataInputError, "use one of"),
        (lambda: registry.Entry("x", "http://x", "x/y"), registry.DataInputError, "give one"),
        (lambda: data.prepare_bin(TEXT, tok, tmp_path, 1.0), registry.DataInputError, "e.g. 0.1"),
        (lambda: data.prepare_bin(tmp_path / "nope.txt", tok, tmp_path), registry.DataInputError,
         "check the path"),
        (lambda: data.prepare_bin(not_utf8, tok, tmp_path), registry.DataInputError,
         "convert it to UTF-8"),
        (lambda: data.load_bin(tmp_path / "nope.bin"), data.BinError, "build it again"),
        (lambda: data.get_batch(np.arange(9), 0, 4), registry.DataInputError, "positive sizes"),
        (lambda: data.get_batch(np.arange(3), 1, 4), registry.DataInputError, "shorter context"),
        (lambda: registry.load_tokenizer({"type": "x"}), registry.DataInputError, "to_dict()"),
    ]  # fmt: skip
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / "file" / "cache"))
    monkeypatch.setenv(registry.MIRROR_ENV, str(tmp_path / "mirror"))
    (tmp_path / "mirror/tiny").mkdir(parents=True)
    (tmp_path / "mirror/tiny/input.txt").write_bytes(BODY)
    entry = registry.Entry("tiny", "http://127.0.0.1:9/never", "tiny/input.txt",
                           sha256=hashlib.sha256(BODY).hexdigest())
    cases.append((lambda: registry.path(entry), registry.CacheError,
                  f"set {registry.CACHE_ENV} to another folder"))  # fmt: skip
    for call, error, todo in cases:
        with pytest.raises(error) as err:
            call()
        assert isinstance(err.value, registry.DataError)
        assert "\n" not in str(err.value) and todo in str(err.value)


def test_data_functions_fit_on_a_screen():
    for module in (data, registry):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
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
def test_prepare_bin_identifies_gpt2_by_content_not_by_path(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.MIRROR_ENV, MIRROR)
    here = registry.gpt2_tokenizer()
    for name, file in (("gpt2-encoder", "encoder.json"), ("gpt2-vocab", "vocab.bpe")):
        (tmp_path / file).write_bytes(registry.path(name).read_bytes())
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
