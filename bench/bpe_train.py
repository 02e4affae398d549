"""Benchmark: byte-level BPE training and encoding speed on Tiny Shakespeare.

Run by hand (not part of the test suite):

    MINIGPT_DATA_MIRROR=/path/to/mirror python bench/bpe_train.py [--repeats 3]

Prints the median wall time (and, in brackets, CPU time, which a busy machine inflates less)
of a few runs for: naive vs fast training on a small slice (checking that they agree), fast
training to vocab 500 on the first ~130 kB and to vocab 4,096 on the whole file (targets: well
under a second; a few seconds), and encoding the whole file with our encoder vs tiktoken
(checking that the ids agree).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from minigpt import registry
from minigpt.bpe import train_bpe_from_text, train_bpe_naive
from minigpt.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def timed(fn: Callable[[], object], repeats: int) -> tuple[str, object]:
    """``"wall s [cpu s]"`` medians over ``repeats`` calls of ``fn``, and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return f"{statistics.median(walls):6.3f} s [{statistics.median(cpus):6.3f} s]", result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement")
    r = parser.parse_args().repeats
    text = registry.path("tinyshakespeare").read_text(encoding="utf-8")
    print(f"Tiny Shakespeare: {len(text.encode()):,} bytes; median of {r} runs, wall [cpu]")

    small = text[:20_000]
    t_naive, naive = timed(lambda: train_bpe_naive(small, 400, [EOT]), r)
    t_fast, fast = timed(lambda: train_bpe_from_text(small, 400, [EOT]), r)
    assert naive == fast, "naive and fast training disagree"
    print(f"train vocab 400 on 20 kB, naive:        {t_naive}")
    print(f"train vocab 400 on 20 kB, fast:         {t_fast}  (same merges)")

    head = text[:130_000]
    t, _ = timed(lambda: train_bpe_from_text(head, 500, [EOT]), r)
    print(f"{f'train vocab 500 on {len(head.encode()):,} bytes:':40}{t}")
    t, (vocab, merges) = timed(lambda: train_bpe_from_text(text, 4096, [EOT]), r)
    print(f"train vocab 4,096 on all of it:         {t}")

    fast_enc = Tokenizer(vocab, merges, [EOT]).to_tiktoken("shakespeare-4096")
    t_ours, ids = timed(lambda: Tokenizer(vocab, merges, [EOT]).encode(text), r)
    t_tk, tk_ids = timed(lambda: fast_enc.encode(text), r)
    assert ids == tk_ids, "our encoder and tiktoken disagree"
    print(f"encode all, vocab 4,096, ours (cold):   {t_ours}  ({len(ids):,} tokens)")
    print(f"encode all, vocab 4,096, to_tiktoken(): {t_tk}  (same ids)")

    gpt2 = Tokenizer.from_gpt2_files(registry.path("gpt2-encoder"), registry.path("gpt2-vocab"))
    tk_gpt2 = registry.tiktoken_gpt2()
    gpt2.encode(text)  # warm the pre-token cache
    t_ours, ids = timed(lambda: gpt2.encode(text), r)
    t_tk, tk_ids = timed(lambda: tk_gpt2.encode(text), r)
    assert ids == tk_ids, "our GPT-2 encoder and tiktoken disagree"
    print(f"encode all, GPT-2, ours (warm cache):   {t_ours}  ({len(ids):,} tokens)")
    print(f"encode all, GPT-2, tiktoken:            {t_tk}  (same ids)")


if __name__ == "__main__":
    main()
