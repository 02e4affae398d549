"""Causal attention forward + backward on the CPU in bfloat16: torch's fused kernel on bf16
inputs against the same kernel in fp32 on inputs cast up (``minigpt.attention.torch_attention``
takes the fp32 route below ``CPU_BF16_FP32_BELOW`` keys).

    python bench/attention_bf16.py            # writes data/bench/attention_bf16.json

Shapes (batch, heads, tokens, head size): the char model's (4 heads of 32), GPT-2 small's
(12 heads of 64) and lengths from 64 to 1,024 tokens at a fixed number of tokens per call.
Each figure is the median of ``--repeats`` runs of ``--calls`` calls, in milliseconds per call,
after a warm-up; both routes alternate so that a drift in the machine's speed hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine, summary

from minigpt.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(12, 4, 64, 32), (32, 4, 64, 32), (4, 4, 128, 32), (2, 4, 256, 32), (1, 4, 512, 32),
          (16, 12, 64, 64), (8, 12, 128, 64), (4, 12, 256, 64), (2, 12, 512, 64),
          (1, 12, 1024, 64)]


def bf16_kernel(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fp32_kernel(q, k, v):
    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    return y.bfloat16()


def ms_per_call(fn, shape: tuple[int, ...], calls: int) -> float:
    q, k, v = (torch.randn(shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=torch.bfloat16)
    t = time.perf_counter()
    for _ in range(calls):
        fn(q, k, v).backward(grad)
    return (time.perf_counter() - t) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per route")
    parser.add_argument("--out", type=Path, default=ROOT / "data/bench/attention_bf16.json")
    args = parser.parse_args()
    result = {"command": "python bench/attention_bf16.py", "machine": machine(), "rows": []}
    for shape in SHAPES:
        for fn in (bf16_kernel, fp32_kernel):
            ms_per_call(fn, shape, 3)  # warm-up
        runs = {"bf16_kernel": [], "fp32_kernel": []}
        for _ in range(args.repeats):
            for fn in (bf16_kernel, fp32_kernel):
                runs[fn.__name__].append(ms_per_call(fn, shape, args.calls))
        row = {"shape_b_h_t_d": list(shape), **{k: summary(v, 3) for k, v in runs.items()}}
        row["fp32_over_bf16"] = round(statistics.median(
            f / b for f, b in zip(runs["fp32_kernel"], runs["bf16_kernel"], strict=True)), 3)
        result["rows"].append(row)
        print(shape, row["bf16_kernel"]["median"], row["fp32_kernel"]["median"],
              row["fp32_over_bf16"], flush=True)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
