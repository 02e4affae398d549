"""Int8 dynamic quantization on this CPU: decoding speed of each variant, as JSON (chapter 9).

    python bench/quantize_speed.py --out data/bench/quantize_speed.json
    python bench/quantize_speed.py --threads 2 --batch-sizes 1 4 16 64 --out /tmp/q.json

For the shipped BPE model and GPT-2 small (random weights: its speed is the real model's):
float32, torch's ``quantize_dynamic``, the from-scratch ``Int8Linear`` (``minigpt.quantize``)
and torch's with ``lm_head`` quantized too; greedy KV-cache decoding at batch 1, the median of
``--repeats`` runs (after a warm-up) with their spread. Then batched decoding of the shipped
model, float32 and torch int8: throughput and per-step latency against the batch size. The
JSON records the command, the CPU (``lscpu``), cores, threads, torch and the load average
before and after. Run from the repository root, on a quiet machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch
from machine import machine

from minigpt.atomic import atomic_write_text
from minigpt.checkpoint import load_model
from minigpt.model import GPT, gpt2_config
from minigpt.quantize import decode_speed, quantize_model, state_dict_bytes

VARIANTS = {"float32": None, "int8 (torch)": ("torch", False), "int8 (ours)": ("scratch", False),
            "int8 + lm_head (torch)": ("torch", True)}


def timing(model, batch_size: int, new_tokens: int, repeats: int) -> dict:
    """decode_speed's median and spread, rounded for the JSON file."""
    r = decode_speed(model, batch_size, new_tokens, repeats=repeats)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="data/checkpoints/shakespeare-bpe")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the book: one)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpt2-repeats", type=int, default=3)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--skip-gpt2", action="store_true", help="leave out GPT-2 small (124M)")
    p.add_argument("--out", default="data/bench/quantize_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"command": "python bench/quantize_speed.py "
              + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "new_tokens": args.new_tokens, "decode": [], "batching": []}
    start = time.perf_counter()
    shipped, _ = load_model(args.model_dir)
    models = {"shipped BPE": (shipped, args.repeats)}
    if not args.skip_gpt2:
        models["GPT-2 small"] = (GPT(gpt2_config("gpt2")).eval(), args.gpt2_repeats)
    for name, (model, repeats) in models.items():
        for vname, spec in VARIANTS.items():
            m = model if spec is None else quantize_model(model, spec[0], include_lm_head=spec[1])
            row = {"model": name, "variant": vname, "mb": round(state_dict_bytes(m) / 1e6, 2),
                   **timing(m, 1, args.new_tokens, repeats)}
            result["decode"].append(row)
            print(f"{name:<12} {vname:<23} {row['mb']:8.2f} MB {row['tokens_per_s']:8.1f} tok/s "
                  f"{row['ms_per_token']:8.2f} ms/tok ({row['ms_per_token_min']:.2f}-"
                  f"{row['ms_per_token_max']:.2f})", flush=True)
    q = quantize_model(shipped, "torch")
    for b in args.batch_sizes:
        for vname, m in (("float32", shipped), ("int8 (torch)", q)):
            result["batching"].append({"variant": vname, **timing(m, b, args.new_tokens,
                                                                  args.repeats)})
        print(f"batch {b:>3}: " + " | ".join(f"{r['variant']} {r['tokens_per_s']:8.0f} tok/s"
                                             for r in result["batching"][-2:]), flush=True)
    result["load_average_after"] = machine()["load_average_1_5_15"]
    result["wall_seconds"] = round(time.perf_counter() - start)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
