"""Training speed of system settings: fp32 vs bf16 autocast, eager vs torch.compile, 1 vs 2
threads, one batch vs two micro-batches computed at once (``micro_batch_threads``).

    python bench/train_variants.py                   # writes data/bench/train_variants.json
    python bench/train_variants.py --rounds 5 --steps 20

Each variant runs in its own process (so thread settings and compiled code do not leak
between them) and times the trainer's own step (``accumulate_gradients``, gradient clipping,
the configured AdamW) on random token ids of the ``shakespeare_char_long`` shape:
``--warmup`` untimed steps first (for torch.compile this is where compiling happens: from an
empty cache in the first turn, recorded as ``warmup_s``, from the on-disk cache in later
turns), then ``--repeats`` timed runs of ``--steps`` steps each. The variants take turns,
``--rounds`` times over (a fresh process each turn), so a machine whose speed drifts during
the benchmark slows every variant alike instead of the last ones. Recorded per variant:
tokens/s of every run, their median and spread (max - min over the median), and the model
FLOP utilisation ``minigpt.scaling.mfu`` (6 N tokens/s over the fp32 matmul rate
``minigpt.scaling.matmul_flops_per_s`` measured with the same threads). The "one core busy"
rows run a second process that spins on one core meanwhile (another job on a shared
machine). The file also records the CPU model (lscpu), whether it has bf16 instructions, the
core count, the torch version and the 1-minute load average before and after: times from a
loaded machine (load average above the core count) are provisional.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model

from minigpt import ddp
from minigpt.atomic import atomic_write_text
from minigpt.cli import load_config
from minigpt.model import GPT
from minigpt.optim import optimizer_step
from minigpt.scaling import matmul_flops_per_s, mfu
from minigpt.train import accumulate_gradients, cpu_has_bf16, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG, VOCAB = "shakespeare_char_long", 65  # the shipped character model's shape
# the same 32 sequences per step as 2 micro-batches of 16, computed at once (one per thread)
TWO_MICRO = {"num_threads": 2, "batch_size": 16, "grad_accum_steps": 2, "micro_batch_threads": 2}
# name -> overrides of the config; the first row is the reference
VARIANTS: dict[str, dict] = {
    "fp32, 2 threads": {"num_threads": 2},
    "fp32, 1 thread": {"num_threads": 1},
    "bf16 autocast, 2 threads": {"num_threads": 2, "dtype": "bfloat16"},
    "torch.compile, 2 threads": {"num_threads": 2, "compile": True},
    "fp32, 2 micro-batches in 2 threads": TWO_MICRO,
    "fp32, 2 threads, one core busy": {"num_threads": 2},
    "fp32, 1 thread, one core busy": {"num_threads": 1},
    "fp32, 2 micro-batches in 2 threads, one core busy": TWO_MICRO,
}
SPIN = "while True: pass"  # the other process of the "one core busy" rows


def measure(name: str, steps: int, repeats: int, warmup: int) -> dict:
    """Time one variant in this process (called in a fresh process per variant)."""
    overrides = VARIANTS[name]
    cfg = load_config(CONFIG, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    ddp.set_threads(ddp.Distributed(), cfg.num_threads, cfg.micro_batch_threads)  # as train
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(VOCAB))
    optimizer = make_optimizer(model, cfg)
    net = torch.compile(model) if cfg.compile else model
    x = torch.randint(0, VOCAB, (cfg.grad_accum_steps, cfg.batch_size, cfg.block_size + 1))
    batches = [(s[:, :-1], s[:, 1:]) for s in x]

    def step() -> None:
        accumulate_gradients(net, batches, cfg.dtype, cfg.micro_batch_threads)
        optimizer_step(optimizer, cfg.lr, cfg.grad_clip)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * steps
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(tokens / (time.perf_counter() - t))
    torch.set_num_threads(cfg.num_threads)  # the peak of all the cores the variant used
    peak = matmul_flops_per_s(size=1024, seconds=2.0)
    median = statistics.median(rates)
    return {"name": name, "overrides": overrides, "threads": cfg.num_threads,
            "micro_batch_threads": cfg.micro_batch_threads, "dtype": cfg.dtype,
            "compile": cfg.compile, "params": model.num_params(),
            "tokens_per_step": tokens // steps, "warmup_steps": warmup,
            "warmup_s": round(warmup_s, 2), "timed_steps": steps,
            "tokens_per_s_runs": [round(r) for r in rates],
            "tokens_per_s_median": round(median),
            "spread": round((max(rates) - min(rates)) / median, 3),
            "matmul_gflops": round(peak / 1e9, 1),
            "mfu": round(mfu(model.num_params(), median, peak), 3)}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    """``measure`` in a fresh process (with a spinning process beside it for "busy" rows)."""
    cmd = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if "busy" in name else None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return json.loads(out.splitlines()[-1]) | {"one_core_busy": spinner is not None}


def merge(turns: list[dict]) -> dict:
    """One variant's row from its turns: every run's tokens/s, their median and spread;
    the first turn's warm-up time (the one that compiled from scratch, if any)."""
    rates = [r for turn in turns for r in turn["tokens_per_s_runs"]]
    median = statistics.median(rates)
    peak = statistics.median(turn["matmul_gflops"] for turn in turns) * 1e9
    return turns[0] | {"tokens_per_s_runs": rates, "tokens_per_s_median": round(median),
                       "spread": round((max(rates) - min(rates)) / median, 3),
                       "warmup_s_runs": [turn["warmup_s"] for turn in turns],
                       "matmul_gflops": round(peak / 1e9, 1),
                       "mfu": round(mfu(turns[0]["params"], median, peak), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/bench/train_variants.json")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every variant")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per turn")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.repeats, args.warmup)))
        return
    load_before = round(os.getloadavg()[0], 2)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="train-variants-") as cache:
        # torch.compile's on-disk cache starts empty: the first turn compiles from scratch
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for _ in range(args.rounds):
            for name in VARIANTS:
                runs[name].append(run_variant(name, args))
                print(json.dumps(runs[name][-1]), flush=True)
    rows = [merge(turns) for turns in runs.values()]
    result = {"command": "python bench/train_variants.py" + "".join(
                  f" --{k} {getattr(args, k)}" for k in ("rounds", "steps", "repeats", "warmup")),
              "config": CONFIG, "vocab_size": VOCAB, "cpu": cpu_model(),
              "bf16_instructions": cpu_has_bf16(), "cores": os.cpu_count(),
              "torch": torch.__version__,
              "load_average": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
              "variants": rows}
    atomic_write_text(ROOT / args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
