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
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (config, overrides). The nanoGPT CPU recipe first, then one change at a time.
VARIANTS: dict[str, tuple[str, dict]] = {
    "nanogpt-cpu (baseline)": ("nanogpt_cpu", {}),
    "lr 3e-3 (= shakespeare_char)": ("nanogpt_cpu", {"lr": 3e-3, "min_lr": 3e-4}),
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
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def command(config: str, overrides: dict) -> list[str]:
    cmd = ["python", "-m", "minigpt", "train", "--config", config]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    return cmd


def collect(name: str, config: str, overrides: dict, out: Path, load: float | None) -> dict:
    """The result row of a finished run in ``out``."""
    final = json.loads(Path(out, "log.jsonl").read_text().splitlines()[-1])["final"]
    cfg = json.loads(Path(out, "config.json").read_text())["train"]["config"]
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum_steps"] * final["iterations"]
    return {"name": name, "command": shlex.join(command(config, overrides)),
            "params": final["params"], "steps": final["iterations"], "tokens": tokens,
            "threads": cfg["num_threads"], "dtype": cfg["dtype"], "load_avg": load,
            "wall_time_s": round(final["wall_time"], 1),
            "tokens_per_s": round(final["tokens_per_s"]),
            "val_loss": round(final["val_loss"], 4)}


def run(name: str, config: str, overrides: dict, keep: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep, slug(name)) if keep else Path(tmp)
        load = round(os.getloadavg()[0], 2)
        cmd = command(config, overrides)
        cmd = [sys.executable, *cmd[1:], "--set", f"out_dir={json.dumps(str(out))}",
               "--set", "progress=false"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        return collect(name, config, overrides, out, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sweeps/shakespeare_char.json")
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the config's num_threads)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (median time)")
    parser.add_argument("--keep", default=None, help="keep each run's output under this folder")
    parser.add_argument("--collect", default=None, metavar="DIR",
                        help="do not train: record the runs found in DIR/<variant slug>")
    args = parser.parse_args()
    out = ROOT / args.out
    for name, (config, overrides) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        if args.threads is not None:
            overrides = {**overrides, "num_threads": args.threads}
        if args.collect:
            if not Path(args.collect, slug(name)).is_dir():
                continue
            row = collect(name, config, overrides, Path(args.collect, slug(name)), None)
        else:
            rows = [run(name, config, overrides, args.keep) for _ in range(args.repeat)]
            row = rows[0]
            if any(r["val_loss"] != row["val_loss"] for r in rows):
                print(f"warning: {name}: val loss differs between repeats", file=sys.stderr)
            row["wall_times_s"] = [r["wall_time_s"] for r in rows]
            row["wall_time_s"] = round(statistics.median(row["wall_times_s"]), 1)
            # a repeat starts right after the previous one, whose own load the average still holds
            row["load_avg"] = min(r["load_avg"] for r in rows)
        print(json.dumps(row), flush=True)
        results = json.loads(out.read_text()) if out.is_file() else []  # parallel sweeps
        results = [r for r in results if r["name"] != name] + [row]
        results.sort(key=lambda r: list(VARIANTS).index(r["name"]) if r["name"] in VARIANTS
                     else len(VARIANTS))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
