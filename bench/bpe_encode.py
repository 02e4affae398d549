"""Benchmark: encoding one long pre-token (a word without spaces) with GPT-2's tokenizer.

Run by hand (not part of the test suite):

    MINIGPT_DATA_MIRROR=/path/to/mirror python bench/bpe_encode.py [--repeats 3] [--quadratic]

A minified file or a base64 blob is one huge pre-token. ``Tokenizer`` merges pre-tokens of
``Tokenizer.heap_from`` bytes or more with ``apply_merges_heap`` (O(n log n)); this prints the
median wall time (and, in brackets, CPU time) of encoding random letters of 64k and 1M
characters with it and with tiktoken, checking that the ids agree. ``--quadratic`` also times
the O(n²) ``apply_merges`` on the 64k word (about a quarter of a minute).
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time

from minigpt import registry
from minigpt.bpe import apply_merges
from minigpt.tokenizer import Tokenizer


def random_word(n: int, seed: int) -> str:
    return "".join(random.Random(seed).choices(string.ascii_letters, k=n))


def timed(fn, words: list[str]) -> tuple[str, list[list[int]]]:
    """``"wall s [cpu s]"`` medians of ``fn`` over ``words`` (one fresh word per run)."""
    walls, cpus, results = [], [], []
    for word in words:
        wall, cpu = time.perf_counter(), time.process_time()
        results.append(fn(word))
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return f"{statistics.median(walls):7.3f} s [{statistics.median(cpus):7.3f} s]", results


def quadratic_ids(tok: Tokenizer, word: str) -> list[int]:
    """``word`` (one pre-token) encoded by ``apply_merges``, with tables from the merge list."""
    enc = {token: i for i, token in sorted(tok.vocab.items(), reverse=True)}  # lowest id
    pairs = [(enc[a], enc[b]) for a, b in tok.merges]
    ranks = {pair: r for r, pair in reversed(list(enumerate(pairs)))}  # first rank wins
    merged = {pair: enc[a + b] for pair, (a, b) in zip(pairs, tok.merges, strict=True)}
    return list(apply_merges([enc[bytes([b])] for b in word.encode()], ranks, merged))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs (fresh words) per size")
    parser.add_argument("--quadratic", action="store_true", help="also time apply_merges")
    args = parser.parse_args()
    gpt2: Tokenizer = registry.gpt2_tokenizer()
    tk = registry.tiktoken_gpt2()
    print(f"median of {args.repeats} runs, wall [cpu]; random ASCII letters, one pre-token")
    for n in (64_000, 1_000_000):
        words = [random_word(n, seed) for seed in range(args.repeats)]
        t_ours, ours = timed(gpt2.encode, words)
        t_tk, theirs = timed(tk.encode, words)
        assert ours == theirs, "minigpt and tiktoken disagree"
        print(f"{n:>9,} chars  minigpt (heap) {t_ours}   tiktoken {t_tk}   (same ids)")
    if args.quadratic:
        word = random_word(64_000, 0)
        t, (ids,) = timed(lambda w: quadratic_ids(gpt2, w), [word])
        assert ids == tk.encode(word), "apply_merges and tiktoken disagree"
        print(f"   64,000 chars  apply_merges (O(n²)) {t}   (same ids)")


if __name__ == "__main__":
    main()
