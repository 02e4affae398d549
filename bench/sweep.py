"""A sweep of training recipes: one ``python -m minigpt train`` process per variant, one row each.

Shared by ``bench/sweep_char.py`` and ``bench/sweep_bpe.py`` (run from the repository root,
``bench/`` is on ``sys.path`` as the script's own folder). A variant is a config name plus
overrides; ``run_variants`` trains the selected ones (or, with ``--collect DIR``, reads runs
made earlier with ``--keep DIR``), prints each row as a JSON line and merges it into the
output file, replacing an older row of the same name and keeping the variants' order (so
sweeps run in parallel processes can share one file). Before each run the sweep waits for
the 1-minute load average to fall below 1 (at most 3 minutes), so that the load it records
is other processes', not the previous run's; a row also records the CPU and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_model

from minigpt.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
Variants = dict[str, tuple[str, dict]]  # name -> (config, overrides)


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


def settle(quiet: float = 1.0, limit_s: float = 180.0) -> float:
    """Wait (at most ``limit_s``) until the 1-minute load average is below ``quiet``, so
    that it no longer holds the previous run of the sweep; return the load average then."""
    start = time.monotonic()
    while os.getloadavg()[0] >= quiet and time.monotonic() - start < limit_s:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def run(name: str, config: str, overrides: dict, keep: str | None) -> dict:
    """Train one variant in its own process (output in ``keep/<slug>`` or a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(keep, slug(name)) if keep else Path(tmp)
        load = settle()
        cmd = command(config, overrides)
        cmd = [sys.executable, *cmd[1:], "--set", f"out_dir={json.dumps(str(out))}",
               "--set", "progress=false"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        return {**collect(name, config, overrides, out, load), "cpu": cpu_model(),
                "date": time.strftime("%Y-%m-%d", time.gmtime())}


def add_options(parser: argparse.ArgumentParser, out: str) -> argparse.ArgumentParser:
    """The options every sweep takes; ``out`` is the default results file."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the config's num_threads)")
    parser.add_argument("--keep", default=None, help="keep each run's output under this folder")
    parser.add_argument("--collect", default=None, metavar="DIR",
                        help="do not train: record the runs found in DIR/<variant slug>")
    return parser


def save_row(out: Path, row: dict, variants: Variants) -> None:
    """Merge ``row`` into the JSON list in ``out`` (re-read: parallel sweeps share it)."""
    results = json.loads(out.read_text()) if out.is_file() else []
    results = [r for r in results if r["name"] != row["name"]] + [row]
    results.sort(key=lambda r: list(variants).index(r["name"]) if r["name"] in variants
                 else len(variants))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")


def run_variants(variants: Variants, args: argparse.Namespace,
                 train: Callable[[str, str, dict], dict],
                 finish: Callable[[str, str, dict, dict], dict] | None = None) -> None:
    """Make a row for every variant ``args.only`` selects: ``train(name, config, overrides)``,
    or with ``args.collect`` the finished run found there (variants without one are skipped);
    ``finish(name, config, overrides, row)`` adds a sweep's own columns. Each row is printed
    and saved to ``args.out`` (relative to the repository root) as soon as it is made."""
    out = ROOT / args.out
    for name, (config, overrides) in variants.items():
        if args.only and name not in args.only:
            continue
        if args.threads is not None:
            overrides = {**overrides, "num_threads": args.threads}
        if args.collect:
            if not Path(args.collect, slug(name)).is_dir():
                continue
            row = collect(name, config, overrides, Path(args.collect, slug(name)), None)
        else:
            row = train(name, config, overrides)
        if finish is not None:
            row = finish(name, config, overrides, row)
        print(json.dumps(row), flush=True)
        save_row(out, row, variants)
