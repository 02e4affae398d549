"""Byte-level BPE: learn merges from a corpus, and apply them to one word (chapter 2).

Text is cut into *pre-tokens* by GPT-2's regular expression (after removing special tokens,
which are never merged across), every pre-token becomes a sequence of byte ids, and the most
frequent adjacent pair is merged into a new token, again and again. Encoding replays the
learned merges on a pre-token, lowest rank first (``minigpt.tokenizer`` uses these loops).

Design choices:

- GPT-2's id layout: ids 0-255 are the single bytes (id == byte value), ids 256, 257, ... the
  merged tokens in the order they were learned, the special tokens last. So any prefix of the
  merge list is a smaller tokenizer, and ``Tokenizer.to_tiktoken`` can rank tokens by id.
- Reproducible ties: between equally frequent pairs the lexicographically greater pair of
  byte strings wins.
- Distinct pre-tokens are counted once, weighted by how often they occur.
- Two trainers with one result (tested equal): ``train_bpe_naive`` recounts every pair after
  each merge (easy to read, slow); ``train_bpe_from_text`` keeps the counts up to date
  incrementally and finds the best pair with a lazily invalidated heap (fast).
- Two merge loops with one result (tested equal): ``apply_merges`` rescans the word for the
  lowest-ranked pair (readable, O(n²)); ``apply_merges_heap`` keeps the pairs in a heap over a
  linked list of symbols (O(n log n), for a megabyte-long pre-token without spaces).
- Arguments are checked once, at the public entry points, before any work.
"""

from __future__ import annotations

import heapq
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise

import regex

GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
PRETOKENIZER = regex.compile(GPT2_SPLIT_PATTERN)

Vocab = dict[int, bytes]
Merges = list[tuple[bytes, bytes]]
Pair = tuple[int, int]


def special_token_pattern(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A pattern that finds special tokens in text, longest first (so overlaps pick the longest).

    The pattern has one capturing group, so ``pattern.split(text)`` keeps the special tokens at
    the odd positions of the result.
    """
    specials = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not specials:
        return None
    if any(not s for s in specials):
        raise ValueError("special tokens must be non-empty strings")
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")


def pretokenize(text: str, special_tokens: Iterable[str] = ()) -> list[str]:
    """The pre-tokens of ``text``: GPT-2's regex applied to the text between special tokens."""
    pattern = special_token_pattern(special_tokens)
    segments = pattern.split(text)[::2] if pattern else [text]
    return [piece for segment in segments for piece in PRETOKENIZER.findall(segment)]


def _word_counts(text: str, special_tokens: Iterable[str]) -> Counter[bytes]:
    """How often each distinct pre-token occurs, as UTF-8 bytes."""
    counts = Counter(pretokenize(text, special_tokens))
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def _check_sizes(vocab_size: int, special_tokens: list[str]) -> None:
    if len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special tokens must be distinct, got {special_tokens!r}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must hold the 256 bytes and "
            f"{len(special_tokens)} special token(s), so use at least {256 + len(special_tokens)}"
        )


def merge_word(word: tuple[int, ...], pair: Pair, new_id: int) -> tuple[int, ...]:
    """Replace each occurrence of ``pair`` in ``word`` by ``new_id``, left to right."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def apply_merges(
    ids: Sequence[int], ranks: dict[Pair, int], merged: dict[Pair, int]
) -> tuple[int, ...]:
    """Merge the lowest-ranked adjacent pair of ``ids`` until no pair is a merge.

    Each round rescans the whole word: O(n²) for n symbols, fine for words, too slow
    for a megabyte without spaces (``apply_merges_heap``: same result, O(n log n)).
    """
    ids = tuple(ids)
    while len(ids) > 1:
        pair = min(pairwise(ids), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        ids = merge_word(ids, pair, merged[pair])
    return ids


def apply_merges_heap(
    ids: Sequence[int], ranks: dict[Pair, int], merged: dict[Pair, int]
) -> tuple[int, ...]:
    """``apply_merges`` in O(n log n): a heap of pairs over a linked list of symbols.

    ``nxt[i]``/``prv[i]`` are the positions of symbol i's neighbours; a symbol merged
    into its left neighbour gets id -1. The heap holds ``(rank, position, pair)``; all
    entries of the lowest rank are popped together and merged left to right, exactly
    like ``merge_word``. An entry whose symbols changed since its push is skipped.
    """
    ids, n = list(ids), len(ids)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(ranks[p], i, p) for i, p in enumerate(pairwise(ids)) if p in ranks]
    heapq.heapify(heap)

    def push(i: int) -> None:  # the pair that starts at symbol i, if it is a merge
        if i >= 0 and nxt[i] < n and (pair := (ids[i], ids[nxt[i]])) in ranks:
            heapq.heappush(heap, (ranks[pair], i, pair))

    while heap:
        rank, batch = heap[0][0], []
        while heap and heap[0][0] == rank:
            batch.append(heapq.heappop(heap))
        for _, i, pair in batch:  # positions in increasing order: left to right
            j = nxt[i]
            if ids[i] != pair[0] or j >= n or ids[j] != pair[1]:
                continue  # stale: one of the two symbols was merged since
            ids[i], ids[j] = merged[pair], -1
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            push(prv[i])
            push(i)
    return tuple(i for i in ids if i >= 0)


def _finish(vocab: Vocab, merges: Merges, special_tokens: list[str]) -> tuple[Vocab, Merges]:
    for token in special_tokens:
        vocab[len(vocab)] = token.encode("utf-8")
    return vocab, merges


def train_bpe_naive(
    text: str, vocab_size: int, special_tokens: Iterable[str] = ()
) -> tuple[Vocab, Merges]:
    """Reference BPE training: count all pairs from scratch before every merge."""
    special_tokens = list(special_tokens)
    _check_sizes(vocab_size, special_tokens)
    vocab: Vocab = {i: bytes([i]) for i in range(256)}
    merges: Merges = []
    words = {tuple(w): n for w, n in _word_counts(text, special_tokens).items()}
    while len(vocab) < vocab_size - len(special_tokens):
        counts: Counter[Pair] = Counter()
        for word, n in words.items():
            for pair in pairwise(word):
                counts[pair] += n
        if not counts:  # every pre-token is a single token: nothing left to merge
            break
        best = max(counts, key=lambda p: (counts[p], vocab[p[0]], vocab[p[1]]))
        new_id = len(vocab)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merges.append((vocab[best[0]], vocab[best[1]]))
        merged: Counter[tuple[int, ...]] = Counter()
        for word, n in words.items():
            merged[merge_word(word, best, new_id)] += n
        words = merged
    return _finish(vocab, merges, special_tokens)


class _Descending:
    """Wraps a pair's byte strings so that a min-heap pops the *greatest* pair first."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[bytes, bytes]) -> None:
        self.key = key

    def __lt__(self, other: _Descending) -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.key == other.key


def _pair_index(
    words: list[tuple[int, ...]], freqs: list[int]
) -> tuple[defaultdict[Pair, int], defaultdict[Pair, set[int]]]:
    """How often each pair occurs (weighted by word frequency), and in which words."""
    counts: defaultdict[Pair, int] = defaultdict(int)
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for index, (word, n) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            counts[pair] += n
            where[pair].add(index)
    return counts, where


def _pop_best(heap: list, counts: dict[Pair, int]) -> Pair | None:
    """Pop heap entries until one is up to date: the best pair (``None`` when none is left)."""
    while heap:
        neg_count, _, pair = heapq.heappop(heap)
        if counts.get(pair, 0) == -neg_count > 0:
            return pair
    return None


def train_bpe_from_text(
    text: str, vocab_size: int, special_tokens: Iterable[str] = ()
) -> tuple[Vocab, Merges]:
    """Fast BPE training with incremental pair counts; same result as the naive one.

    ``counts[pair]`` is how often ``pair`` occurs (weighted by word frequency) and
    ``where[pair]`` the set of distinct words that contain it, so a merge only touches
    the words that contain the merged pair. The best pair comes from a heap of
    ``(-count, pair)`` entries; an entry whose count is out of date is skipped when
    popped (``_pop_best``).
    """
    special_tokens = list(special_tokens)
    _check_sizes(vocab_size, special_tokens)
    vocab: Vocab = {i: bytes([i]) for i in range(256)}
    merges: Merges = []
    word_counts = _word_counts(text, special_tokens)
    words, freqs = [tuple(w) for w in word_counts], list(word_counts.values())
    counts, where = _pair_index(words, freqs)

    def entry(pair: Pair) -> tuple[int, _Descending, Pair]:
        return (-counts[pair], _Descending((vocab[pair[0]], vocab[pair[1]])), pair)

    heap = [entry(pair) for pair in counts]
    heapq.heapify(heap)
    while len(vocab) < vocab_size - len(special_tokens):
        best = _pop_best(heap, counts)
        if best is None:  # nothing left to merge
            break
        new_id = len(vocab)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merges.append((vocab[best[0]], vocab[best[1]]))
        changed: set[Pair] = set()
        for index in where.pop(best):  # only the words that contain the best pair
            old, n = words[index], freqs[index]
            words[index] = new = merge_word(old, best, new_id)
            for pair in pairwise(old):
                counts[pair] -= n
                changed.add(pair)
            for pair in pairwise(new):
                counts[pair] += n
                changed.add(pair)
            for pair in set(pairwise(old)) - set(pairwise(new)) - {best}:
                where[pair].discard(index)
            for pair in pairwise(new):
                where[pair].add(index)
        for pair in changed:  # push the new counts; drop pairs that are gone
            if counts[pair] > 0:
                heapq.heappush(heap, entry(pair))
            else:
                del counts[pair]
                where.pop(pair, None)
    return _finish(vocab, merges, special_tokens)


def train_bpe(
    input_path: str | os.PathLike, vocab_size: int, special_tokens: Iterable[str] = ()
) -> tuple[Vocab, Merges]:
    """Train a byte-level BPE on the UTF-8 text file ``input_path``.

    Returns ``(vocab, merges)``: ``vocab`` maps every id to its bytes (bytes 0-255, then the
    merged tokens in learning order, then ``special_tokens``), ``merges`` lists the merged pairs
    in the order they were learned. ``vocab_size`` counts all three kinds of token.
    """
    with open(input_path, encoding="utf-8") as f:
        text = f.read()
    return train_bpe_from_text(text, vocab_size, special_tokens)
