"""Chapter 7's comparison table: every fine-tuning method on SMS spam, several seeds each.

Runs ``minigpt.finetune.run_classification`` for every method and seed (the seed draws the
undersampled ham, the batch order and the new parameters; the train/validation/test split is
the same fixed split every time), tunes each run's decision threshold on the validation split,
and writes one small JSON file: the exact command, the seeds, the base model's manifest entry,
the always-ham baseline, one row per run (per-step losses rounded to 4 digits) and the
mean +- sample standard deviation per method (``finetune.summarize_runs``).

    python bench/finetune_table.py --seeds 0 1 2 --epochs 1 --train-limit 400 --threads 1

On a busy machine the methods can run in parallel processes, each with ``--methods ... --out
PART.json``, and ``--combine PART.json ... --out FILE`` joins them (the runs do not depend on
each other or on their order, so the rows are those of the single command above).

Training times depend on the machine and its load; losses and metrics do not (on one CPU
type and thread count, runs are deterministic).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from minigpt.atomic import atomic_write_text
from minigpt.finetune import (
    METHODS,
    ClassificationConfig,
    always_ham,
    deduplicate,
    load_base,
    load_sms_spam,
    run_classification,
    stratified_split,
    summarize_runs,
)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="data/checkpoints/shakespeare-bpe")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on this many balanced messages (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("data/finetune/sms_spam_seeds.json"))
    parser.add_argument("--combine", nargs="+", type=Path, default=None,
                        help="join these result files (written by this script) into --out")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("give at least 2 seeds: a standard deviation needs them")
    return args


def base_manifest(base: str) -> dict | None:
    """The manifest entry of a shipped model (its command, loss and file hashes), if any."""
    manifest = ROOT / "data/checkpoints/manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text(encoding="utf-8")).get(Path(base).name)


def combine(parts: list[Path], command: str) -> dict:
    """One record from several files of this script: their rows, a summary over all."""
    records = [json.loads(p.read_text(encoding="utf-8")) for p in parts]
    rows = [r for record in records for r in record["results"]]
    return {**records[0], "command": command, "parts": [r["command"] for r in records],
            "seeds": sorted({s for record in records for s in record["seeds"]}),
            "summary": summarize_runs(rows), "results": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python bench/finetune_table.py " + shlex.join(argv_used)
    if args.combine:
        atomic_write_text(args.out, json.dumps(combine(args.combine, command), indent=1) + "\n")
        print(f"wrote {args.out}")
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer, eos_id = load_base(args.base)
    test = stratified_split(deduplicate(load_sms_spam()), seed=0)[2]
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            cfg = ClassificationConfig(method, args.epochs, max_len=args.max_len,
                                       train_limit=args.train_limit, seed=seed)
            row = run_classification(model, tokenizer.encode, eos_id, cfg)
            row["losses"] = [round(x, 4) for x in row["losses"]]
            rows.append(row)
            t = row["test"]
            print(f"{method:12s} seed {seed}  threshold {row['threshold']:.3f}  test F1 "
                  f"{t['f1']:.3f} (at 0.5: {row['test_argmax']['f1']:.3f})  "
                  f"{row['train_seconds']:.0f} s", flush=True)
    record = {
        "command": command,
        "seeds": args.seeds, "base": args.base, "base_manifest": base_manifest(args.base),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "always_ham": always_ham([y for _, y in test]),
        "summary": summarize_runs(rows), "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
