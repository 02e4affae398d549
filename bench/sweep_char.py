"""Sweep training recipes for character-level Tiny Shakespeare; append results to a JSON file.

Each variant is the nanoGPT CPU recipe (configs/nanogpt_cpu.json) plus overrides; each runs in
its own process (``python -m minigpt train``) so timings do not share state. Recorded per run:
parameters, steps, training tokens, wall time (data preparation to the end of the final
evaluation), training throughput and the loss on the whole validation split.

    python bench/sweep_char.py --out data/sweeps/shakespeare_char.json [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "nanogpt-cpu (baseline)": {},
    "lr 3e-3": {"lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 50},
    "ctx 128, lr 3e-3, 1000 steps (shakespeare_char)": {
        "block_size": 128, "lr": 3e-3, "min_lr": 3e-4, "warmup_iters": 50, "max_iters": 1000,
        "lr_decay_iters": 1000},
    "bf16 autocast (baseline)": {"dtype": "bfloat16"},
}


def run(name: str, overrides: dict, config: str, threads: int, keep: str | None) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(keep, slug)) if keep else tmp
        sets = {**overrides, "out_dir": out, "progress": False, "num_threads": threads}
        cmd = [sys.executable, "-m", "minigpt", "train", "--config", config]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        final = json.loads(Path(out, "log.jsonl").read_text().splitlines()[-1])["final"]
        cfg = json.loads(Path(out, "config.json").read_text())["train"]["config"]
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum_steps"] * final["iterations"]
    return {"name": name, "overrides": overrides, "params": final["params"],
            "steps": final["iterations"], "tokens": tokens,
            "wall_time_s": round(final["wall_time"], 1),
            "tokens_per_s": round(final["tokens_per_s"]),
            "val_loss": round(final["val_loss"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sweeps/shakespeare_char.json")
    parser.add_argument("--config", default="nanogpt_cpu", help="the base config")
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--keep", default=None, help="keep each run's output under this folder")
    args = parser.parse_args()
    out = ROOT / args.out
    results = json.loads(out.read_text()) if out.is_file() else []
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        row = run(name, overrides, args.config, args.threads, args.keep)
        results = json.loads(out.read_text()) if out.is_file() else []  # parallel sweeps
        print(json.dumps(row), flush=True)
        results = [r for r in results if r["name"] != name] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
