"""Sweep training recipes for character-level Tiny Shakespeare; write the results to a JSON file.

Each variant is a shipped config (``src/minigpt/configs/NAME.json``, named by ``--config NAME``)
plus overrides, trained in its own process with ``python -m minigpt train`` so that runs share
no state. Recorded per run: the exact
command, parameters, steps, training tokens, torch threads, the 1-minute load average before the
run (a busy machine inflates wall times; loss does not depend on load), wall time (data
preparation to the end of the final evaluation), throughput and the loss on the whole
validation split. With ``--repeat N`` each variant runs N times and the median wall time is
recorded (the loss is the same every time: training is deterministic on a CPU).

    python bench/sweep_char.py                       # every variant
    python bench/sweep_char.py --only "lr 6e-3" --threads 1 --repeat 2
    python bench/sweep_char.py --collect out/sweep   # record runs made with --keep out/sweep

Compare wall times only between rows measured on an idle machine (load average < 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from sweep import Variants, add_options, run, run_variants

# the long recipe's model with 6 layers and 128 characters of context, in bf16 with its
# 16 windows per step as 2 micro-batches in 2 threads (fast on a CPU with AMX)
AMX6 = {"n_layer": 6, "block_size": 128, "batch_size": 8, "grad_accum_steps": 2,
        "micro_batch_threads": 2, "dtype": "bfloat16"}
AMX6_NANO = "long recipe, 6 layers, ctx 128, bf16, RoPE, no biases, exact GELU"


def amx6_nano(steps: int, **changes: float) -> dict:
    """AMX6 with nanoGPT's model (no biases, exact GELU) and RoPE, for ``steps`` steps."""
    return {**AMX6, "max_iters": steps, **changes, "bias": False,
            "model": {"pos_emb": "rope", "gelu_approx": "none"}}


# name -> (config, overrides). The nanoGPT CPU recipe first, then one change at a time.
VARIANTS: Variants = {
    "nanogpt-cpu (baseline)": ("nanogpt_cpu", {}),
    "lr 3e-3": ("nanogpt_cpu", {"lr": 3e-3, "min_lr": 3e-4}),
    "lr 3e-3, no biases, exact GELU": ("nanogpt_cpu", {
        "lr": 3e-3, "min_lr": 3e-4, "bias": False, "model": {"gelu_approx": "none"}}),
    "+ RoPE": ("nanogpt_cpu", {
        "lr": 3e-3, "min_lr": 3e-4, "bias": False,
        "model": {"gelu_approx": "none", "pos_emb": "rope"}}),
    "+ 2 micro-batches in 2 threads (= shakespeare_char)": ("shakespeare_char", {}),
    "lr 6e-3": ("nanogpt_cpu", {"lr": 6e-3, "min_lr": 6e-4}),
    "ctx 128, batch 6, lr 4e-3": ("nanogpt_cpu", {"block_size": 128, "batch_size": 6,
                                                 "lr": 4e-3, "min_lr": 4e-4}),
    "ctx 128, lr 3e-3, 1000 steps": ("nanogpt_cpu", {
        "block_size": 128, "lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 50, "max_iters": 1000,
        "lr_decay_iters": 1000}),
    "ctx 128, lr 6e-3, 1000 steps": ("nanogpt_cpu", {
        "block_size": 128, "lr": 6e-3, "min_lr": 6e-4, "warmup_iters": 50, "max_iters": 1000,
        "lr_decay_iters": 1000}),
    "long recipe, 3,200 steps, 1 thread": ("shakespeare_char_long", {"max_iters": 3200,
                                                                     "num_threads": 1}),
    "shakespeare_char_long": ("shakespeare_char_long", {}),
    "long recipe, 4,800 steps": ("shakespeare_char_long", {"max_iters": 4800}),
    "long recipe + dropout 0.1": ("shakespeare_char_long", {"dropout": 0.1}),
    "long recipe + RoPE": ("shakespeare_char_long", {"model": {"pos_emb": "rope"}}),
    # on a CPU with AMX: bf16 and micro-batch threads buy a deeper model and longer context
    "long recipe, 6 layers, ctx 128, bf16": ("shakespeare_char_long", {
        **AMX6, "max_iters": 4000}),
    "long recipe, 6 layers, ctx 128, bf16, RoPE": ("shakespeare_char_long", {
        **AMX6, "max_iters": 4000, "model": {"pos_emb": "rope"}}),
    **{f"{AMX6_NANO}, {n:,} steps": ("shakespeare_char_long", amx6_nano(n))
       for n in (4500, 5400, 5700)},
    f"{AMX6_NANO}, 5,400 steps, cosine to 0": ("shakespeare_char_long",
                                               amx6_nano(5400, min_lr=0.0)),
    f"{AMX6_NANO}, 4,800 steps, weight decay 0.2": ("shakespeare_char_long",
                                                    amx6_nano(4800, weight_decay=0.2)),
    **{f"shakespeare_char_amx, seed {n}": ("shakespeare_char_amx", {"seed": n})
       for n in (1, 2)},
}



def repeated(name: str, config: str, overrides: dict, keep: str | None, repeat: int) -> dict:
    """Train a variant ``repeat`` times: its row, with every wall time, and the medians of
    the wall times and of the tokens/s."""
    rows = [run(name, config, overrides, keep) for _ in range(repeat)]
    row = rows[0]
    if any(r["val_loss"] != row["val_loss"] for r in rows):
        print(f"warning: {name}: val loss differs between repeats", file=sys.stderr)
    row["wall_times_s"] = [r["wall_time_s"] for r in rows]
    row["wall_time_s"] = round(statistics.median(row["wall_times_s"]), 1)
    row["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in rows))
    # a repeat starts right after the previous one, whose own load the average still holds
    row["load_avg"] = min(r["load_avg"] for r in rows)
    return row


def main() -> None:
    parser = add_options(argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter),
        out="data/sweeps/shakespeare_char.json")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (median time)")
    args = parser.parse_args()
    run_variants(VARIANTS, args, lambda name, config, overrides: repeated(
        name, config, overrides, args.keep, args.repeat))


if __name__ == "__main__":
    main()
