"""Sweep training recipes for Tiny Shakespeare with our own BPE; write the results to a JSON file.

Like ``bench/sweep_char.py`` (both run ``bench/sweep.py``'s loop): each variant is a config
file plus overrides, trained in its own process with ``python -m minigpt train``. Each row adds the
loss in nats per character (``minigpt.train.nats_per_char``: the whole-split loss per token
times the validation tokens over the characters they decode to), so variants with different
vocabularies compare, and compare with the character model. Runs have a fixed number of steps
(the cosine schedule ends at the last step), so losses compare at a fixed number of tokens;
the machine was shared while sweeping, so wall times here are not measurements.
``data/sweeps/shakespeare_bpe.json`` holds the variants that were run; the others are listed
for a re-run with ``--only``.

    python bench/sweep_bpe.py --only "vocab 512" --threads 1
    python bench/sweep_bpe.py --collect out/sweep_bpe   # record runs made with --keep
"""

from __future__ import annotations

import argparse
import json

from sweep import ROOT, Variants, add_options, run, run_variants

from minigpt.cli import load_config
from minigpt.data import DataSpec, prepare_data
from minigpt.model import GPT
from minigpt.train import nats_per_char

STEPS = 1000  # short runs: 1,000 steps of 2,048 tokens
BASE = {"max_iters": STEPS, "warmup_iters": 50, "eval_interval": 250, "early_stop_patience": 0,
        "bpe_vocab_size": 512, "block_size": 128, "batch_size": 16, "dropout": 0.0,
        "lr": 3e-3, "min_lr": 3e-4}


def variant(**changes: object) -> tuple[str, dict]:
    return ("shakespeare_bpe", {**BASE, **changes})


# name -> (config, overrides): one change at a time from vocab 512, context 128, 4 x 128
VARIANTS: Variants = {
    "vocab 1024": variant(bpe_vocab_size=1024),
    "vocab 768": variant(bpe_vocab_size=768),
    "vocab 512": variant(),
    "vocab 384": variant(bpe_vocab_size=384),
    "vocab 512, ctx 64, batch 32": variant(block_size=64, batch_size=32),
    "vocab 512, ctx 256, batch 8": variant(block_size=256, batch_size=8),
    "vocab 512, lr 6e-3": variant(lr=6e-3, min_lr=6e-4),
    "vocab 512, RoPE": variant(model={"pos_emb": "rope"}),
    "vocab 512, dropout 0.1": variant(dropout=0.1),
    "shakespeare_bpe": ("shakespeare_bpe", {}),  # the shipped recipe, as the config file says
}


def add_nats_per_char(row: dict, overrides: dict) -> dict:
    vocab = overrides.get("bpe_vocab_size", 1024)
    tokenizer, train, val = prepare_data(DataSpec("tinyshakespeare", "bpe", vocab))
    row["bpe_vocab_size"] = vocab
    row["val_tokens"] = len(val)
    row["val_nats_per_char"] = round(nats_per_char(row["val_loss"], val, tokenizer), 4)
    row["epochs"] = round(row["tokens"] / len(train), 2)  # passes over the training split
    return row


def flops_per_token(config: str, overrides: dict, vocab: int) -> int:
    cfg = load_config(config, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    return GPT(cfg.model_config(vocab)).flops_per_token()


def add_quiet_estimate(row: dict, config: str, overrides: dict) -> dict:
    """Estimated wall time on a quiet machine: the row's training FLOPs at the FLOP rate the
    shipped character model reached in its quiet, timed run (data/checkpoints/manifest.json)."""
    char = json.loads((ROOT / "data/checkpoints/manifest.json").read_text())["shakespeare-char"]
    char_rate = char["tokens_per_s"] * flops_per_token("shakespeare_char_long", {}, 65)
    flops = row["tokens"] * flops_per_token(config, overrides, row["bpe_vocab_size"])
    seconds = flops / char_rate
    row["quiet_time_estimate_s"] = round(seconds)
    row["quiet_time_estimate"] = (
        f"{row['tokens'] / 1e6:.1f}M tokens x {flops / row['tokens'] / 1e6:.2f}M FLOPs per "
        f"token (GPT.flops_per_token) = {flops:.2e} FLOPs; at the "
        f"{char_rate / 1e9:.0f} GFLOP/s the character model reached in its quiet run "
        f"({char['tokens_per_s']:,} tokens/s x {char_rate / char['tokens_per_s'] / 1e6:.2f}M "
        f"FLOPs per token), about {seconds / 60:.0f} minutes plus evaluations")
    return row


def finish(name: str, config: str, overrides: dict, row: dict) -> dict:
    """The BPE sweep's own columns: nats per character, and for the shipped recipe the
    estimated time on a quiet machine."""
    row = add_nats_per_char(row, overrides)
    return add_quiet_estimate(row, config, overrides) if name == "shakespeare_bpe" else row


def main() -> None:
    parser = add_options(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        out="data/sweeps/shakespeare_bpe.json")
    args = parser.parse_args()
    run_variants(VARIANTS, args, lambda name, config, overrides: run(
        name, config, overrides, args.keep), finish)


if __name__ == "__main__":
    main()
