"""IsoFLOP profile with a learning-rate sweep per model size (chapter 9), written as JSON.

    nice -n 10 python bench/isoflop.py --out data/scaling/isoflop.json   # the shipped study
    python bench/isoflop.py --sizes c2k c3k c6k c12k --lrs 6e-3 1.2e-2 --lr-budget 1e10 \
        --budgets 3e9 1e10 --out /tmp/isoflop-small.json  # a small one, for a try

Two phases, all on Tiny Shakespeare characters (65 symbols, context 64, batch 16, AdamW with
warm-up and cosine decay to lr/10, no dropout, seed 1337, one thread per run):

1. **Learning rates.** Every size of ``--sizes`` is trained at each rate of ``--lrs`` on the
   ``--lr-budget`` compute; the rate with the lowest final validation loss is that size's rate
   for phase 2 (where the runs of that budget at that rate are reused).
2. **IsoFLOPs.** For each budget of ``--budgets`` (FLOPs ``C = 6 N D``, N the non-embedding
   parameters), every size is trained on ``D = C / (6 N)`` tokens (sizes that would get fewer
   than ``--min-steps`` optimiser steps, or more than ``--max-steps``, are left out).

The results depend on the number of steps, not on the time they take, so a loaded machine
gives the same numbers, only later. Each run logs to ``--runs/<tag>/``; a finished run of the
same configuration is read back instead of retrained (so an interrupted sweep resumes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from minigpt.atomic import atomic_write_text
from minigpt.model import GPTConfig
from minigpt.scaling import non_embedding_params
from minigpt.train import TrainConfig, train

# (n_layer, n_head, n_embd): non-embedding parameters from ~2K to ~0.8M, ~2x apart; the
# default study uses c3k to c330k (on 1e11-1e12 FLOPs the optimum lies between them).
SIZES: dict[str, tuple[int, int, int]] = {
    "c2k": (1, 2, 12),
    "c3k": (1, 2, 16),
    "c6k": (1, 2, 24),
    "c12k": (1, 2, 32),
    "c28k": (2, 2, 32),
    "c55k": (2, 4, 48),
    "c150k": (3, 4, 64),
    "c330k": (3, 4, 96),
    "c790k": (4, 4, 128),
}
BATCH, BLOCK, VOCAB = 16, 64, 65
# TrainConfig fields shared by every run (the JSON stores them, so a run can be repeated).
COMMON = dict(dataset="tinyshakespeare", tokenizer="char", block_size=BLOCK, batch_size=BATCH,
              eval_iters=5, progress=False, num_threads=1, seed=1337)


def n_params(shape: tuple[int, int, int]) -> int:
    """Non-embedding parameters of a character model of this shape."""
    n_layer, n_head, n_embd = shape
    return non_embedding_params(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=n_layer,
                                          n_head=n_head, n_embd=n_embd))


def steps_for(budget: float, shape: tuple[int, int, int]) -> int:
    """Optimiser steps that spend ``budget`` FLOPs (6 N D) on this shape."""
    return round(budget / (6 * n_params(shape) * BATCH * BLOCK))


def run(job: tuple[str, str, tuple[int, int, int], float, int, str]) -> dict:
    """Train (or read back) one run; return its row."""
    tag, name, shape, lr, steps, runs = job
    n_layer, n_head, n_embd = shape
    cfg = TrainConfig(**COMMON, n_layer=n_layer, n_head=n_head, n_embd=n_embd, max_iters=steps,
                      lr=lr, min_lr=lr / 10, warmup_iters=max(1, steps // 20),
                      eval_interval=steps, out_dir=str(Path(runs) / tag))
    saved = Path(cfg.out_dir) / "config.json"
    done = json.loads(saved.read_text())["train"] if saved.is_file() else {}
    if done.get("config", {}) | {"progress": False} != cfg.to_dict() | {"progress": False}:
        result = train(cfg)
        done = {"val_loss": result.val_loss, "tokens_per_s": result.tokens_per_s}
    n = n_params(shape)
    return {"name": name, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
            "non_embedding_params": n, "lr": lr, "steps": steps,
            "tokens": steps * BATCH * BLOCK, "flops": 6.0 * n * steps * BATCH * BLOCK,
            "val_loss": round(done["val_loss"], 5),
            "tokens_per_s": round(done["tokens_per_s"])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES)[1:8], choices=SIZES)
    p.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2])
    p.add_argument("--lr-budget", type=float, default=1e11,
                   help="the compute of each learning-rate run (its runs are reused in phase 2)")
    p.add_argument("--budgets", type=float, nargs="+", default=[1e11, 3e11, 1e12])
    p.add_argument("--min-steps", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=25000,
                   help="leave out runs longer than this (the smallest sizes on the largest "
                        "budgets, far from the optimum)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--runs", default="out/isoflop")
    p.add_argument("--out", default="data/scaling/isoflop.json")
    args = p.parse_args(argv)
    start = time.perf_counter()
    sizes = {k: SIZES[k] for k in args.sizes}
    result = {"command": "python bench/isoflop.py "
              + shlex.join(sys.argv[1:] if argv is None else argv),
              "setup": "Tiny Shakespeare characters; AdamW (weight decay 0.1), linear warm-up "
                       "over steps/20, cosine decay to lr/10 at the last step; no dropout; "
                       "flops = 6 * non_embedding_params * tokens",
              "common": COMMON, "lr_budget": args.lr_budget, "budgets": [], "isoflop": []}
    with ProcessPoolExecutor(args.jobs) as pool:
        result["lr_sweep"] = list(pool.map(run, [
            (f"{k}/{args.lr_budget:g}/{lr:g}", k, s, lr, steps_for(args.lr_budget, s), args.runs)
            for k, s in sizes.items() for lr in args.lrs
            if steps_for(args.lr_budget, s) >= args.min_steps]))
        best = {k: min((r for r in result["lr_sweep"] if r["name"] == k),
                       key=lambda r: r["val_loss"])["lr"]
                for k in {r["name"] for r in result["lr_sweep"]}}
        result["best_lr"] = best
        for c in args.budgets:  # the file is rewritten after each budget: a partial study is kept
            jobs = [(f"{k}/{c:g}/{best[k]:g}", k, s, best[k], steps_for(c, s), args.runs)
                    for k, s in sizes.items() if k in best
                    and args.min_steps <= steps_for(c, s) <= (args.max_steps or steps_for(c, s))]
            result["isoflop"] += [{**row, "budget": c} for row in pool.map(run, jobs)]
            result["budgets"].append(c)
            result["wall_seconds"] = round(time.perf_counter() - start)
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
            for r in result["isoflop"][-len(jobs):]:
                print(f"C={c:.0e} {r['name']:>6} N={r['non_embedding_params']:>7,} "
                      f"lr={r['lr']:g} steps={r['steps']:>5} val={r['val_loss']:.4f}",
                      flush=True)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
