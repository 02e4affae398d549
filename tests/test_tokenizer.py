"""Tokenizers: characters, BPE training (naive == fast), encoding equal to tiktoken's GPT-2."""

import itertools
import json
import random
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt import registry
from minigpt.bpe import (
    apply_merges,
    apply_merges_heap,
    pretokenize,
    train_bpe,
    train_bpe_from_text,
    train_bpe_naive,
)
from minigpt.tokenizer import CharTokenizer, Tokenizer, bytes_to_unicode

EOT = "<|endoftext|>"
# Any Unicode text except lone surrogates (which are not valid in UTF-8 at all).
unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
SAMPLE = (
    "Hello 👋🏽 wörld! 你好，世界。 'tis   naïve\t\n\n  <|endoftext|>x's I'll  ٣٤ 🇫🇷 e\u0301 "
    "don't WE'RE 1234567 $$$!! \r\n  \n end   "
)


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return registry.path("tinyshakespeare").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.from_gpt2_files(registry.path("gpt2-encoder"), registry.path("gpt2-vocab"))


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    return registry.tiktoken_gpt2()


@pytest.fixture(scope="module")
def small_bpe(shakespeare) -> Tokenizer:
    vocab, merges = train_bpe_from_text(shakespeare[:130_000], 500, [EOT])
    return Tokenizer(vocab, merges, [EOT])


@pytest.fixture(scope="module")
def small_tiktoken(small_bpe):
    return small_bpe.to_tiktoken("shakespeare-500")


@pytest.fixture(scope="module")
def two_specials(small_bpe) -> Tokenizer:
    return Tokenizer(small_bpe.vocab, small_bpe.merges, [EOT, EOT + EOT])


# -- characters ---------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8
    assert tok.decode(tok.encode("low hole")) == "low hole"
    assert CharTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).chars == tok.chars
    with pytest.raises(ValueError, match="not in this tokenizer"):
        tok.encode("hex")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([8])


# -- training -----------------------------------------------------------------------------------


def test_pretokenize_gpt2_regex_and_specials():
    assert pretokenize("Hello, world! It's 2024  ok") == [
        "Hello", ",", " world", "!", " It", "'s", " 2024", " ", " ok",
    ]  # fmt: skip
    assert pretokenize(f"a{EOT}b", [EOT]) == ["a", "b"]


def test_train_by_hand_with_tie_breaking():
    # pre-tokens: "low" x1, " low" x2, " lower" x1. (l,o) and (o,w) both occur 4 times:
    # the tie goes to the greater pair (o,w). Later (" low", "e") ties with ("e", "r") and
    # b"e" > b" low", so (e, r) wins. Then nothing is left to merge, so training stops early.
    vocab, merges = train_bpe_from_text("low low low lower", 300)
    assert merges == [(b"o", b"w"), (b"l", b"ow"), (b" ", b"low"), (b"e", b"r"), (b" low", b"er")]
    assert len(vocab) == 256 + 5 and vocab[260] == b" lower"
    assert all(vocab[b] == bytes([b]) for b in range(256))


def test_special_tokens_get_last_ids_and_are_never_merged_across():
    text = f"ab{EOT}ab{EOT}" * 50  # without the split, "<|", "endoftext" and "|>" would merge
    vocab, merges = train_bpe_from_text(text, 300, [EOT])
    assert merges == [(b"a", b"b")]  # nothing else is left, so training stops early
    assert vocab[257] == EOT.encode() and len(vocab) == 258


def test_training_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe_from_text("abc", 256, [EOT])
    with pytest.raises(ValueError, match="distinct"):
        train_bpe_from_text("abc", 300, [EOT, EOT])


@pytest.mark.slow
def test_fast_training_equals_naive_on_shakespeare_slice(shakespeare):
    text = shakespeare[:8_000] + EOT + shakespeare[8_000:12_000]
    assert train_bpe_from_text(text, 400, [EOT]) == train_bpe_naive(text, 400, [EOT])


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from("aab b.\n'é🙂"), max_size=60), st.integers(256, 300))
def test_fast_training_equals_naive_property(text, vocab_size):
    assert train_bpe_from_text(text, vocab_size) == train_bpe_naive(text, vocab_size)


def test_train_bpe_reads_a_file(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text("the cat sat on the mat " * 20, encoding="utf-8")
    assert train_bpe(file, 270, [EOT]) == train_bpe_from_text(file.read_text(), 270, [EOT])


# -- GPT-2: exactly tiktoken's ids --------------------------------------------------------------


def test_gpt2_layout(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {EOT: 50256}
    assert gpt2.encode(" the") == [262] and gpt2.decode([15496, 995]) == "Hello world"


@pytest.mark.slow
def test_gpt2_equals_tiktoken_on_all_of_shakespeare(gpt2, tiktoken_gpt2, shakespeare):
    ids = gpt2.encode(shakespeare)
    assert ids == tiktoken_gpt2.encode(shakespeare)
    assert gpt2.decode(ids) == shakespeare


def test_gpt2_equals_tiktoken_on_unicode_and_specials(gpt2, tiktoken_gpt2):
    ids = gpt2.encode(SAMPLE)
    assert ids == tiktoken_gpt2.encode(SAMPLE, allowed_special="all")
    assert ids.count(50256) == 1 and gpt2.decode(ids) == SAMPLE


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(unicode_text)
def test_gpt2_property_equals_tiktoken_and_round_trips(gpt2, tiktoken_gpt2, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


# -- encode / decode details --------------------------------------------------------------------


def test_decode_invalid_utf8_and_unknown_ids(small_bpe):
    # ids 0-255 are the raw bytes: a lone continuation byte or a cut-off character is not UTF-8
    assert small_bpe.decode([0xFF]) == "\ufffd"
    assert small_bpe.decode(list("é".encode())[:1] + [ord("x")]) == "\ufffdx"
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        small_bpe.decode([small_bpe.vocab_size])
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        small_bpe.decode([-1])


def test_overlapping_special_tokens_longest_wins(two_specials):
    tok, double = two_specials, EOT + EOT
    eot, eot2 = tok.special_tokens[EOT], tok.special_tokens[double]
    assert eot == 499 and eot2 == 500 and tok.vocab_size == 501  # new special gets a new id
    ids = tok.encode(f"a{EOT}{EOT}{EOT}b{EOT}")
    assert ids == tok.encode("a") + [eot2, eot] + tok.encode("b") + [eot]
    assert tok.decode(ids) == f"a{EOT}{EOT}{EOT}b{EOT}"


def test_small_bpe_compresses_and_round_trips(small_bpe, shakespeare):
    text = shakespeare[200_000:260_000]  # text the tokenizer was not trained on
    ids = small_bpe.encode(text)
    assert small_bpe.decode(ids) == text
    assert len(text.encode()) / len(ids) > 1.7  # bytes per token (1.83 at vocab 500)
    assert max(ids) < small_bpe.vocab_size


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(unicode_text)
def test_small_bpe_property_round_trip_and_tiktoken(small_bpe, small_tiktoken, text):
    ids = small_bpe.encode(text)
    assert small_bpe.decode(ids) == text
    assert ids == small_tiktoken.encode(text, allowed_special="all")


# -- streaming ----------------------------------------------------------------------------------


def test_encode_iterable_equals_encode_on_lines(gpt2, shakespeare):
    text = shakespeare[:100_000]
    lines = text.splitlines(keepends=True)
    assert list(gpt2.encode_iterable(lines)) == gpt2.encode(text)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.sampled_from(["a", " b", "  ", "\n", "'s", "<|", "endoftext", "|>", EOT, "é"]),
             max_size=30),
    st.lists(st.integers(1, 7), min_size=1, max_size=10),
)  # fmt: skip
def test_encode_iterable_any_chunking(two_specials, parts, sizes):
    tok = two_specials
    text = "".join(parts)
    chunks, i = [], 0
    for size in itertools.cycle(sizes):
        if i >= len(text):
            break
        chunks.append(text[i : i + size])
        i += size
    assert list(tok.encode_iterable(chunks)) == tok.encode(text)


def test_encode_iterable_whitespace_depends_on_what_follows(gpt2):
    # " \n\n" alone is one pre-token; followed by "World" it is " \n", "\n" (issue #12)
    chunks = ["Hello \n", "\n", "World"]
    assert gpt2.encode("".join(chunks)) == [15496, 220, 198, 198, 10603]
    assert list(gpt2.encode_iterable(chunks)) == [15496, 220, 198, 198, 10603]
    # a contraction decides on three characters: "'l" + "l" is "'ll", not "'", "ll"
    assert list(gpt2.encode_iterable(["I'l", "l go"])) == gpt2.encode("I'll go")


# Text rich in what makes pre-tokens depend on what follows: whitespace runs, contractions,
# letters, digits, punctuation, special-token fragments, and any other Unicode.
stream_text = st.lists(
    st.one_of(
        st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\r\n", "'", "'s", "'l", "ll", "re",
                         "a", "Wo", "é", "你", "🙂", "1", "23", ".", "!?", "<|", "endoftext", "|>",
                         EOT]),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=5),
    ),
    max_size=40,
).map("".join)  # fmt: skip


def chunked(text: str, cuts: list[int]) -> list[str]:
    """``text`` cut at the positions ``cuts`` (taken modulo its length), empty chunks kept."""
    points = sorted(c % (len(text) + 1) for c in cuts)
    return [text[a:b] for a, b in pairwise([0, *points, len(text)])]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream_text, st.lists(st.integers(0, 1000), max_size=12))
@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "two_specials"])  # GPT-2's files, a trained BPE
def test_encode_iterable_property(request, name, text, cuts):
    tok = request.getfixturevalue(name)
    assert list(tok.encode_iterable(chunked(text, cuts))) == tok.encode(text)


def test_encode_iterable_is_lazy(small_bpe):
    endless = itertools.cycle(["To be, or not to be", ": that is the question.\n"])
    first = list(itertools.islice(small_bpe.encode_iterable(endless), 1000))
    text = small_bpe.decode(first)
    assert text.startswith("To be, or not to be: that is the question.\nTo be, or not")


# -- files, descriptions, tiktoken --------------------------------------------------------------


def test_save_load_and_dict_round_trip(small_bpe, tmp_path):
    small_bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "merges.txt").read_text().splitlines()[1] == "Ġ t"
    for tok in (
        Tokenizer.load(tmp_path / "tok"),
        Tokenizer.from_dict(json.loads(json.dumps(small_bpe.to_dict()))),
    ):
        assert tok.vocab == small_bpe.vocab and tok.merges == small_bpe.merges
        assert tok.special_tokens == small_bpe.special_tokens
        assert tok.encode(SAMPLE) == small_bpe.encode(SAMPLE)
    with pytest.raises(ValueError, match="not a BPE tokenizer"):
        Tokenizer.from_dict({"type": "char", "chars": "ab"})
    with pytest.raises(ValueError, match="save"):
        Tokenizer.load(tmp_path / "nothing-here")
    (tmp_path / "tok" / "special_tokens.json").unlink()
    with pytest.raises(ValueError, match="special_tokens.json"):
        Tokenizer.load(tmp_path / "tok")


@pytest.mark.slow
def test_gpt2_to_dict_names_the_published_files_by_hash_not_by_path(gpt2, tmp_path):
    d = json.loads(json.dumps(gpt2.to_dict()))
    assert d == {
        "type": "gpt2",
        "special_tokens": [EOT],
        "encoder_json_sha256": registry.REGISTRY["gpt2-encoder"].sha256,
        "vocab_bpe_sha256": registry.REGISTRY["gpt2-vocab"].sha256,
    }
    # the same files anywhere else (another machine, another cache) give the same description
    for name, file in (("gpt2-encoder", "encoder.json"), ("gpt2-vocab", "vocab.bpe")):
        (tmp_path / file).write_bytes(registry.path(name).read_bytes())
    moved = Tokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert moved.to_dict() == d
    with pytest.raises(ValueError, match="minigpt.registry.load_tokenizer"):
        Tokenizer.from_dict(d)


def test_other_files_in_gpt2_format_describe_their_vocabulary(small_bpe, tmp_path):
    small_bpe.save(tmp_path)
    d = Tokenizer.load(tmp_path).to_dict()
    assert d["type"] == "bpe" and str(tmp_path) not in json.dumps(d)
    assert Tokenizer.from_dict(d).encode(SAMPLE) == small_bpe.encode(SAMPLE)


def test_to_tiktoken_equals_our_encoder(
    small_bpe, small_tiktoken, shakespeare, gpt2, tiktoken_gpt2
):
    enc = small_tiktoken
    text = shakespeare[:300_000] + EOT + SAMPLE
    assert enc.encode(text, allowed_special="all") == small_bpe.encode(text)
    assert enc.n_vocab == small_bpe.vocab_size
    # GPT-2 converted by us is tiktoken's own GPT-2
    assert gpt2.to_tiktoken()._mergeable_ranks == tiktoken_gpt2._mergeable_ranks


def test_to_tiktoken_rejects_ids_out_of_merge_order():
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"cd"}
    tok = Tokenizer(vocab, [(b"c", b"d"), (b"a", b"b")])  # merge 0 made id 257: not rank order
    assert tok.encode("abcd") == [256, 257]
    with pytest.raises(ValueError, match="merge order"):
        tok.to_tiktoken()


def test_tokenizer_rejects_inconsistent_vocab():
    base = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="no id in vocab"):
        Tokenizer(base, [(b"a", b"b")])
    with pytest.raises(ValueError, match="are both b'ab'"):
        Tokenizer(base | {256: b"ab", 257: b"ab"}, [(b"a", b"b")])
    with pytest.raises(ValueError, match="non-negative"):
        Tokenizer(base | {-1: b"ab"}, [])


def test_special_token_spelled_like_a_regular_token(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab"}
    tok = Tokenizer(vocab, [(b"a", b"b")], ["ab"])
    assert tok.special_tokens == {"ab": 257}  # its own id, not the merged token's
    assert tok.encode("xab") == [ord("x"), 257] and tok.decode([256, 257]) == "abab"
    with pytest.raises(ValueError, match="spelled like a regular token"):
        tok.save(tmp_path)


@pytest.mark.slow
def test_gpt2_files_with_an_extra_special_token():
    tok = Tokenizer.from_gpt2_files(
        registry.path("gpt2-encoder"), registry.path("gpt2-vocab"), [EOT, "<|pad|>"]
    )
    assert tok.special_tokens == {EOT: 50256, "<|pad|>": 50257} and tok.vocab_size == 50258
    assert tok.encode(f"hi<|pad|>{EOT}") == [5303, 50257, 50256]


# -- long pre-tokens: the heap merge -------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=12),
)
@pytest.mark.slow
def test_apply_merges_heap_equals_apply_merges(ids, pairs):
    # random merges over symbols 0-3 and merged symbols 10, 11, ... in any rank order,
    # including pairs that repeat one symbol ("aaa"), whose overlaps merge left to right
    ranks, merged = {}, {}
    for rank, pair in enumerate(pairs):
        if pair not in ranks:
            ranks[pair], merged[pair] = rank, 10 + rank
    assert apply_merges_heap(ids, ranks, merged) == apply_merges(ids, ranks, merged)


@pytest.fixture(scope="module")
def long_words() -> list[str]:
    rng = random.Random(0)
    return [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=20_000)),
        "".join(rng.choices("etaoinshrdlu", k=20_000)),
        "".join(rng.choices("ab", k=5_000)),
        "a" * 5_001,
        "1" * 3_000 + " " * 3_000 + "!" * 3_000 + "é" * 3_000,
    ]


def test_long_words_equal_tiktoken(gpt2, tiktoken_gpt2, small_bpe, small_tiktoken, long_words):
    for word in long_words:
        assert gpt2.encode(word) == tiktoken_gpt2.encode(word)
        assert small_bpe.encode(word) == small_tiktoken.encode(word)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(unicode_text)
def test_heap_path_equals_short_path(small_bpe, text):
    heap_only = Tokenizer(small_bpe.vocab, small_bpe.merges, list(small_bpe.special_tokens))
    heap_only.heap_from = 0  # every pre-token goes through apply_merges_heap
    assert heap_only.encode(text) == small_bpe.encode(text)


# -- the standard vocabulary contract -------------------------------------------------------------


def test_vocab_may_hold_other_tokens_that_only_decode(small_bpe, tmp_path):
    top = small_bpe.vocab_size
    vocab = small_bpe.vocab | {top: b"<pad>", top + 1: b"\xff\xfe"}
    tok = Tokenizer(vocab, small_bpe.merges, [EOT])
    assert tok.decode([top, ord("a"), top]) == "<pad>a<pad>"
    assert tok.decode([top + 1]) == "\ufffd\ufffd"
    ids = tok.encode("<pad>\xff" + SAMPLE)
    assert ids == small_bpe.encode("<pad>\xff" + SAMPLE) and max(ids) < top
    assert tok.vocab_size == top + 2
    for again in (Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))), None):
        if again is None:
            tok.save(tmp_path)
            again = Tokenizer.load(tmp_path)
        assert again.vocab == tok.vocab and again.special_tokens == tok.special_tokens


@pytest.mark.slow
def test_gpt2_without_declared_special_token_treats_it_as_text(tiktoken_gpt2):
    plain = registry.gpt2_tokenizer(special_tokens=())
    assert plain.special_tokens == {} and plain.vocab_size == 50257
    text = f"Hello{EOT}world {EOT}"
    ids = plain.encode(text)
    assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
    assert 50256 not in ids and plain.decode(ids) == text
    assert plain.decode([50256]) == EOT  # the id still decodes
    assert list(plain.encode_iterable([text[:7], text[7:]])) == ids
    assert registry.load_tokenizer(plain.to_dict()).encode(text) == ids


@pytest.mark.slow
def test_repr_names_kind_size_and_counts(gpt2, small_bpe, two_specials):
    assert repr(gpt2) == (
        "Tokenizer(kind='gpt2', vocab_size=50257, merges=50000, special_tokens=1, other_tokens=0)"
    )
    assert repr(two_specials) == (
        "Tokenizer(kind='bpe', vocab_size=501, merges=243, special_tokens=2, other_tokens=0)"
    )
    plain = registry.gpt2_tokenizer(special_tokens=())
    assert "special_tokens=0, other_tokens=1" in repr(plain)
    assert repr(CharTokenizer.from_text("hello")) == "CharTokenizer(kind='char', vocab_size=4)"
