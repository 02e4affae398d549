"""Training throughput and model FLOP utilisation (MFU) of a config, on this machine.

    python bench/train_throughput.py --config gpt2_small [--set compile=true] [--steps 5]

Runs the trainer's own step (``accumulate_gradients``, gradient clipping, the configured AdamW)
on random token ids, and prints tokens/s and MFU = ``model.flops_per_token(T)`` x tokens/s
divided by a measured peak: the FLOP rate of a large fp32 ``torch.mm`` (with the same number of
threads), i.e. what this CPU does on the operation that dominates a Transformer.

The machine's speed drifts (shared cores, turbo), so each timed step is followed by one timed
matmul, and ``mfu`` is the median over steps of (step FLOP rate / the matmul rate measured
next to it). ``mfu_vs_best`` divides by the best matmul rate seen instead, a stricter figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from minigpt.cli import load_config
from minigpt.model import GPT, GPTConfig
from minigpt.optim import optimizer_step
from minigpt.train import accumulate_gradients, make_optimizer


def matmul_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    """FLOP/s of one fp32 matmul a @ b."""
    t = time.perf_counter()
    torch.mm(a, b)
    return 2 * a.size(0) * a.size(1) * b.size(1) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name or .json path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (as for `python -m minigpt train`)")
    parser.add_argument("--vocab-size", type=int, default=50257,
                        help="vocabulary size (GPT-2: 50257; 50304 pads it to a multiple of 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=args.vocab_size, block_size=cfg.block_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          dropout=cfg.dropout, bias=cfg.bias, **cfg.model))
    optimizer = make_optimizer(model, cfg)
    net = torch.compile(model) if cfg.compile else model
    B, T = cfg.batch_size, cfg.block_size
    x = torch.randint(0, args.vocab_size, (cfg.grad_accum_steps, B, T + 1))
    batches = [(s[:, :-1], s[:, 1:]) for s in x]

    def step() -> None:
        accumulate_gradients(net, batches, cfg.dtype)
        optimizer_step(optimizer, cfg.lr, cfg.grad_clip)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup_s = time.perf_counter() - t0
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    matmul_rate(a, b)  # warm up
    times, peaks = [], []
    for _ in range(args.steps):  # step, matmul, step, matmul, ...
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        peaks.append(matmul_rate(a, b))
    step_s = statistics.median(times)
    tokens = B * T * cfg.grad_accum_steps
    step_flops = model.flops_per_token(T) * tokens
    flops = step_flops / step_s
    mfu = statistics.median(step_flops / s / p for s, p in zip(times, peaks, strict=True))
    print(json.dumps({
        "config": args.config, "overrides": args.set, "params": model.num_params(),
        "threads": torch.get_num_threads(), "tokens_per_step": tokens,
        "step_s_median": round(step_s, 3), "warmup_s": round(warmup_s, 1),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops": round(flops / 1e12, 4),
        "matmul_tflops_median": round(statistics.median(peaks) / 1e12, 4),
        "matmul_tflops_best": round(max(peaks) / 1e12, 4),
        "mfu": round(mfu, 3), "mfu_vs_best": round(flops / max(peaks), 3)}))


if __name__ == "__main__":
    main()
