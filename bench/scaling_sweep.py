"""Scaling sweep: train several GPT sizes on one token budget and write the loss curves as CSV.

The chapter 9 notebook runs a small version live and reads the shipped result of this one:

    python bench/scaling_sweep.py --sizes xxs xs s m l xl --tokens 524288 \
        --out data/scaling/sweep.csv

Each size is trained by ``minigpt.train`` (byte-level BPE, 512 tokens, on Tiny Shakespeare);
the run logs go to ``--runs`` (default ``out/scaling``), one directory per size.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from minigpt.scaling import SWEEP_SIZES, sweep, write_sweep_csv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SWEEP_SIZES), choices=SWEEP_SIZES,
                        help="model sizes to train (minigpt.scaling.SWEEP_SIZES)")
    parser.add_argument("--tokens", type=int, default=524288, help="training tokens per size")
    parser.add_argument("--evals", type=int, default=16, help="evaluations per run")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--runs", default="out/scaling", help="directory of the run logs")
    parser.add_argument("--out", default="data/scaling/sweep.csv", help="the CSV to write")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = sweep({k: SWEEP_SIZES[k] for k in args.sizes}, args.tokens, args.runs,
                 evals=args.evals, seed=args.seed)
    command = "python bench/scaling_sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_sweep_csv(rows, args.out, command=command)
    for r in rows:
        if r["final"]:
            print(f"{r['name']:>4}: N={r['non_embedding_params']:>8,} val_loss={r['val_loss']:.4f}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
