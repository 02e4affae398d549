"""Tokenizers: text to integer ids and back.

``CharTokenizer`` maps each distinct character of a corpus to an id (chapter 1).
``Tokenizer`` is a byte-level BPE (chapter 2): it encodes with the merges learned by
``minigpt.bpe.train_bpe`` or read from GPT-2's files, gives the same ids as tiktoken, and can
hand its vocabulary to tiktoken for fast encoding of whole corpora.

Design choices:

- Ids, not strings: a pre-token becomes the byte ids of its UTF-8 bytes, and merging looks up
  ``(left id, right id)`` pairs in two dicts (rank, merged id); encoded pre-tokens are cached.
- Two merge loops with one result (``minigpt.bpe``): ``apply_merges`` for short pre-tokens
  (readable, quadratic), ``apply_merges_heap`` from ``Tokenizer.heap_from`` bytes on (O(n log
  n), for long pre-tokens such as a megabyte without spaces).
- The standard vocabulary contract: ``vocab`` must hold the 256 single bytes and every merge
  result; other entries (e.g. GPT-2's ``<|endoftext|>`` when not declared special) decode but
  are never produced by ``encode``. Only declared special tokens are matched in the text.
- Streaming: ``encode_iterable`` emits the pre-tokens no continuation of the text can change
  and carries the rest (the last pre-tokens, a partial special token) into the next chunk.
- GPT-2's own files are described by their SHA-256 (``to_dict``), never by a local path.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path

import tiktoken

from minigpt.bpe import (
    GPT2_SPLIT_PATTERN,
    PRETOKENIZER,
    Merges,
    Pair,
    Vocab,
    apply_merges,
    apply_merges_heap,
    special_token_pattern,
)

# SHA-256 of the files OpenAI published for GPT-2's tokenizer. A tokenizer read from exactly
# these files describes itself by them (``to_dict``) instead of by a path on one machine.
GPT2_FILES_SHA256 = {
    "encoder_json_sha256": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab_bpe_sha256": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class CharTokenizer:
    """One id per character, ids assigned in sorted character order."""

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer takes single characters")
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary from every character that occurs in ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Map ``text`` to ids; characters outside the vocabulary raise a ``ValueError``."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.stoi})
            raise ValueError(
                f"characters not in this tokenizer's vocabulary: {unknown!r}; "
                "remove them from the text or build the tokenizer from a corpus that has them"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Map ids back to text; an id outside ``range(vocab_size)`` raises a ``ValueError``."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(self.chars[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"CharTokenizer(kind='char', vocab_size={self.vocab_size})"

    def to_dict(self) -> dict:
        """A JSON-serialisable description, stored beside checkpoints."""
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if d.get("type") != "char":
            raise ValueError(f"not a character tokenizer description: type={d.get('type')!r}")
        return cls(d["chars"])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each of the 256 byte values.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (control bytes, space, ...) get the characters U+0100, U+0101, ...
    in byte order, so a space is 'Ġ' and a newline 'Ċ'. GPT-2's ``encoder.json`` and
    ``vocab.bpe`` spell every token this way, which keeps them readable text files.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + k) for k, b in enumerate(others)})
    return dict(sorted(mapping.items()))


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _printable(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def _unprintable(text: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError as e:
        raise ValueError(
            f"{text!r} is not a token in GPT-2's printable byte spelling ({e.args[0]!r} stands "
            "for no byte); is this file really a GPT-2 style encoder.json / vocab.bpe?"
        ) from None


# GPT-2's regex decides a pre-token from at most this many characters from its start (the
# contractions 'll, 're, 've); pre-tokens that start closer to the end of a text may change
# when more text follows.
_LOOKAHEAD = 3


class Tokenizer:
    """Byte-level BPE: text -> ids by applying ranked merges to each pre-token, ids -> text.

    ``vocab`` maps ids to bytes and must hold the 256 single bytes and the result of every
    merge; ``merges`` lists merged pairs, earliest (highest priority) first. Other vocab
    entries are legal: ``decode`` maps them, ``encode`` never produces them. ``special_tokens``
    are strings that always get their own id when they occur in the text: their id in
    ``vocab`` if it holds them (as GPT-2's ``<|endoftext|>``) and they are not a byte or merge
    result, else new ids after the largest one. Longer special tokens are matched first.
    """

    cache_size = 1 << 17  # encoded pre-tokens kept; the cache is emptied when it is full
    heap_from = 64  # pre-tokens of this many bytes or more are merged by apply_merges_heap

    def __init__(
        self, vocab: Vocab, merges: Merges, special_tokens: Iterable[str] | None = None
    ) -> None:
        self.vocab: Vocab = {int(i): bytes(b) for i, b in vocab.items()}
        self.merges: Merges = [(bytes(a), bytes(b)) for a, b in merges]
        if any(i < 0 for i in self.vocab):
            raise ValueError(f"token ids must be non-negative, got {min(self.vocab)}")
        regular = {bytes([b]) for b in range(256)} | {a + b for a, b in self.merges}
        self.special_tokens = self._assign_specials(special_tokens or (), regular)
        special_ids = set(self.special_tokens.values())
        ids_of: dict[bytes, int] = {}
        for i, token in sorted(self.vocab.items()):
            if i not in special_ids and ids_of.setdefault(token, i) != i:
                raise ValueError(
                    f"vocab ids {ids_of[token]} and {i} are both {token!r}; "
                    "every token except a special one must have exactly one id"
                )
        missing = sorted(regular - ids_of.keys())
        if missing:
            raise ValueError(
                f"{len(missing)} bytes or merge results have no id in vocab, e.g. {missing[0]!r}; "
                "vocab must hold the 256 single bytes and the result of every merge"
            )
        self._encoder = {token: ids_of[token] for token in sorted(regular)}
        self._rank: dict[Pair, int] = {}
        self._merged: dict[Pair, int] = {}
        for rank, (a, b) in enumerate(self.merges):
            pair = (self._encoder[a], self._encoder[b])
            if pair not in self._rank:
                self._rank[pair] = rank
                self._merged[pair] = self._encoder[a + b]
        self._byte_ids = [self._encoder[bytes([b])] for b in range(256)]
        self._special_pattern = special_token_pattern(self.special_tokens)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._is_gpt2 = False  # read from GPT-2's own files (see from_gpt2_files)

    def _assign_specials(
        self, special_tokens: Iterable[str], regular: set[bytes]
    ) -> dict[str, int]:
        """Each special token's id: the first vocab entry spelling it that is not a byte or
        merge result, else a new id after the largest (added to ``vocab``)."""
        specials = list(dict.fromkeys(special_tokens))
        if any(not isinstance(s, str) or not s for s in specials):
            raise ValueError(f"special tokens must be non-empty strings, got {specials!r}")
        wanted = {s.encode("utf-8"): s for s in specials}
        assigned: dict[str, int] = {}
        for i, token in sorted(self.vocab.items()):
            if token in wanted and token not in regular:
                assigned.setdefault(wanted[token], i)
        for token in specials:
            if token not in assigned:
                assigned[token] = i = max(self.vocab, default=-1) + 1
                self.vocab[i] = token.encode("utf-8")
        return {s: assigned[s] for s in specials}

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the size an embedding table needs)."""
        return max(self.vocab) + 1

    def __repr__(self) -> str:
        kind = "gpt2" if self._is_gpt2 else "bpe"
        extra = len(self.vocab) - len(self._encoder) - len(self.special_tokens)
        return (
            f"Tokenizer(kind={kind!r}, vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={len(self.special_tokens)}, other_tokens={extra})"
        )

    # -- encoding ---------------------------------------------------------------------------

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """Encode one pre-token: its bytes' ids, merged by rank."""
        ids = [self._byte_ids[b] for b in piece.encode("utf-8")]
        if len(ids) < self.heap_from:
            return apply_merges(ids, self._rank, self._merged)
        return apply_merges_heap(ids, self._rank, self._merged)

    def _encode_pieces(self, pieces: Iterable[str], out: list[int]) -> None:
        """Append the ids of the pre-tokens ``pieces`` to ``out``."""
        cache = self._cache
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(cache) >= self.cache_size:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)

    def _split(self, text: str) -> list[str]:
        """Ordinary text at even positions, special tokens at odd positions."""
        return self._special_pattern.split(text) if self._special_pattern else [text]

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``; declared special tokens become their own ids."""
        ids: list[int] = []
        for k, segment in enumerate(self._split(text)):
            if k % 2:
                ids.append(self.special_tokens[segment])
            elif segment:
                self._encode_pieces(PRETOKENIZER.findall(segment), ids)
        return ids

    def _special_hold(self, text: str) -> int:
        """Where ``text`` may end inside a special token: it ends with a prefix of one, or
        with a special token that may be the start of a longer one (``<|endoftext|>`` of
        ``<|endoftext|><|endoftext|>``). ``len(text)`` if nowhere."""
        hold = len(text)
        for token in self.special_tokens:
            for k in range(min(len(token) - 1, len(text)), 0, -1):
                if text.endswith(token[:k]):
                    hold = min(hold, len(text) - k)
                    break
        if self._special_pattern and hold < len(text):
            for match in self._special_pattern.finditer(text):
                if match.start() < hold < match.end():
                    hold = match.start()
        return hold

    def _encode_final(self, text: str) -> tuple[list[int], str]:
        r"""The ids of the part of ``text`` no continuation can change, and the rest.

        More text can complete a special token and change the last pre-tokens: the
        last one may grow ("hel" + "lo"), a trailing whitespace run gives its last
        character to a following word (GPT-2's ``\s+(?!\S)``), and a contraction
        decides on up to three characters ("'l" + "l"). The pieces before them are
        final *as cut in this text*, so they are encoded as they are, not re-split.
        """
        hold = self._special_hold(text)
        *done, last = self._split(text[:hold])
        ids = self.encode("".join(done))  # up to the last special token: final
        pieces = PRETOKENIZER.findall(last)
        keep, tail = max(len(pieces) - 1, 0), len(pieces[-1]) if pieces else 0
        while keep > 0 and tail + len(pieces[keep - 1]) < _LOOKAHEAD:
            keep -= 1
            tail += len(pieces[keep])
        self._encode_pieces(pieces[:keep], ids)
        return ids, "".join(pieces[keep:]) + text[hold:]

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of text chunks (e.g. an open file's lines).

        Gives the same ids as ``encode("".join(texts))`` for any chunking, holding
        only an unfinished tail of the text in memory (a few pre-tokens and a partial
        special token).
        """
        rest = ""
        for chunk in texts:
            ids, rest = self._encode_final(rest + chunk)
            yield from ids
        yield from self.encode(rest)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        try:
            data = b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(
                f"id {e.args[0]} is not in this tokenizer's vocabulary "
                f"(ids 0..{self.vocab_size - 1})"
            ) from None
        return data.decode("utf-8", errors="replace")

    # -- files and descriptions ---------------------------------------------------------------

    @classmethod
    def _from_gpt2_format(
        cls, encoder: dict[str, int], merge_lines: Iterable[str], special_tokens: Iterable[str]
    ) -> Tokenizer:
        """Build from GPT-2's spelling: ``{printable token: id}`` and ``"left right"`` lines."""
        specials = list(special_tokens)
        vocab = {
            int(i): s.encode("utf-8") if s in specials else _unprintable(s)
            for s, i in encoder.items()
        }
        merges = []
        for line in merge_lines:
            if not line.strip() or line.startswith("#version"):
                continue
            parts = line.rstrip("\r\n").split(" ")
            if len(parts) != 2:
                raise ValueError(f"a merges line must be two tokens and a space, got {line!r}")
            merges.append((_unprintable(parts[0]), _unprintable(parts[1])))
        return cls(vocab, merges, specials)

    @classmethod
    def from_gpt2_files(
        cls,
        encoder_json_path: str | os.PathLike,
        vocab_bpe_path: str | os.PathLike,
        special_tokens: Iterable[str] = ("<|endoftext|>",),
    ) -> Tokenizer:
        """GPT-2's tokenizer from its ``encoder.json`` (token -> id) and ``vocab.bpe`` (merges).

        Files in the same format with other content (e.g. written by ``save``) work too.
        ``minigpt.registry.gpt2_tokenizer()`` calls this with verified copies of GPT-2's files.
        """
        encoder = Path(encoder_json_path).read_bytes()
        merges = Path(vocab_bpe_path).read_bytes()
        lines = merges.decode("utf-8").splitlines()
        tok = cls._from_gpt2_format(json.loads(encoder), lines, special_tokens)
        tok._is_gpt2 = GPT2_FILES_SHA256 == {
            "encoder_json_sha256": hashlib.sha256(encoder).hexdigest(),
            "vocab_bpe_sha256": hashlib.sha256(merges).hexdigest(),
        }
        return tok

    def _gpt2_format(self) -> tuple[dict[str, int], list[str]]:
        special_ids = set(self.special_tokens.values())
        encoder = {_printable(t): i for i, t in self.vocab.items() if i not in special_ids}
        clash = sorted(encoder.keys() & self.special_tokens.keys())
        if clash:
            raise ValueError(
                f"special token {clash[0]!r} is spelled like a regular token in GPT-2's format, "
                "so the files could not tell them apart; rename the special token"
            )
        encoder.update(self.special_tokens)
        merges = [f"{_printable(a)} {_printable(b)}" for a, b in self.merges]
        return dict(sorted(encoder.items(), key=lambda kv: kv[1])), merges

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.json``, ``merges.txt`` (GPT-2's readable spelling, e.g. ``Ġthe``) and
        ``special_tokens.json`` into ``directory``; ``Tokenizer.load`` reads them back."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        encoder, merges = self._gpt2_format()
        (out / "vocab.json").write_text(
            json.dumps(encoder, ensure_ascii=False, indent=0) + "\n", encoding="utf-8"
        )
        (out / "merges.txt").write_text(
            "\n".join(["#version: minigpt-bpe", *merges]) + "\n", encoding="utf-8"
        )
        (out / "special_tokens.json").write_text(
            json.dumps(list(self.special_tokens), ensure_ascii=False) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by ``save``."""
        d = Path(directory)
        files = ("vocab.json", "merges.txt", "special_tokens.json")
        missing = [name for name in files if not (d / name).is_file()]
        if missing:
            raise ValueError(f"{d} has no {', '.join(missing)}; write the tokenizer with save()")
        specials = json.loads((d / "special_tokens.json").read_text(encoding="utf-8"))
        return cls.from_gpt2_files(d / "vocab.json", d / "merges.txt", specials)

    def to_dict(self) -> dict:
        """A JSON-serialisable description (stored beside checkpoints and token files).

        GPT-2's tokenizer (read from GPT-2's own files) is ``{"type": "gpt2", ...}``: it names
        the files by their SHA-256, so it holds no path and means the same on every machine;
        ``minigpt.registry.load_tokenizer`` rebuilds it. Any other one carries its vocabulary
        (``"type": "bpe"``) and ``from_dict`` rebuilds it.
        """
        if self._is_gpt2:
            specials = list(self.special_tokens)
            return {"type": "gpt2", "special_tokens": specials, **GPT2_FILES_SHA256}
        encoder, merges = self._gpt2_format()
        return {
            "type": "bpe",
            "vocab": encoder,
            "merges": merges,
            "special_tokens": list(self.special_tokens),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """Rebuild a ``"type": "bpe"`` description written by ``to_dict``."""
        kind = d.get("type")
        if kind == "gpt2":
            raise ValueError(
                "a 'gpt2' description names GPT-2's published files, which this module does not "
                "fetch; rebuild it with minigpt.registry.load_tokenizer(d)"
            )
        if kind != "bpe":
            raise ValueError(
                f"not a BPE tokenizer description: type={kind!r}; "
                "minigpt.registry.load_tokenizer(d) rebuilds every kind"
            )
        return cls._from_gpt2_format(d["vocab"], d["merges"], d["special_tokens"])

    # -- the fast path ----------------------------------------------------------------------

    def to_tiktoken(self, name: str = "minigpt-bpe") -> tiktoken.Encoding:
        """The same tokenizer as a ``tiktoken.Encoding`` (encodes corpora much faster).

        tiktoken has no merge list: it ranks each token by its id and repeatedly merges
        the adjacent pair whose *concatenation* has the lowest rank. That agrees with
        our merges only if every byte's id is below every merged token's id and merged
        tokens get increasing ids in merge order (true for ``train_bpe`` and GPT-2):
        checked. Vocab entries that are neither tokens nor special are left out. Like
        any tiktoken encoding it refuses special tokens in the text unless ``encode``
        is given ``allowed_special="all"``.
        """
        made = [self._encoder[a + b] for a, b in self.merges]
        parts = [(self._encoder[a], self._encoder[b]) for a, b in self.merges]
        if (
            any(x >= y for x, y in pairwise(made))
            or (made and max(self._byte_ids) >= made[0])
            or any(max(p) >= m for p, m in zip(parts, made, strict=True))
        ):
            raise ValueError(
                "tiktoken ranks tokens by id, so ids must follow the merge order "
                "(bytes first, then one new id per merge, increasing); "
                "this vocabulary does not"
            )
        ranks = dict(self._encoder)
        return tiktoken.Encoding(
            name=name,
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=dict(self.special_tokens),
        )
