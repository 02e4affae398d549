"""Time a GPT-2-small training step (forward + backward) on CPU and report the FLOP rate.

Run by hand:  python bench/model_forward.py [--batch 1] [--seq 1024] [--steps 3] [--impl sdpa]
Also times a bare fp32 matmul of GPT-2's MLP shape, as a rough peak to compare against.
"""

from __future__ import annotations

import argparse
import time

import torch

from minigpt.model import GPT, gpt2_config


def matmul_peak(n: int = 1024, k: int = 768, m: int = 3072, reps: int = 10) -> float:
    """FLOP/s of an fp32 (n x k) @ (k x m) matmul, best of ``reps``."""
    a, b = torch.randn(n, k), torch.randn(k, m)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n * k * m / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--impl", choices=("sdpa", "scratch"), default="sdpa")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(gpt2_config("gpt2", attn_impl=args.impl))
    idx = torch.randint(0, 50257, (args.batch, args.seq))
    times = []
    for step in range(args.steps + 1):
        t = time.perf_counter()
        _, loss = model(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - t)
    step_time = min(times)
    flops = model.flops_per_token(args.seq) * args.batch * args.seq
    peak = matmul_peak()
    print(f"threads {torch.get_num_threads()}, step {step_time:.2f} s, "
          f"{flops / step_time / 1e9:.1f} GFLOP/s model, matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"fraction {flops / step_time / peak:.2f}")


if __name__ == "__main__":
    main()
