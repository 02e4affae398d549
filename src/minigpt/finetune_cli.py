"""The ``minigpt finetune`` command: its options, checks, runs and saved results (chapter 7).

``python -m minigpt finetune classify`` fine-tunes an SMS spam classifier once per method of
``minigpt.finetune.METHODS`` and prints one line per method; ``python -m minigpt finetune
instruct`` runs instruction tuning (``minigpt.instruct``), full or with LoRA. ``minigpt.cli``
adds these options to its ``finetune`` subcommand (``add_arguments``) and calls
``finetune_command``.

Design choices:

* The command line is its own module, apart from the fine-tuning it drives: ``finetune``
  holds what chapter 7 teaches and displays (data, metrics, the classifier, the runs),
  this module only turns options into those calls and writes their results.
* Requests are checked before anything loads: argparse checks types and choices,
  ``check_request`` the combinations it cannot, and the run configs (``task_configs``)
  check their values when built. Each failure is one ``ValueError`` line that
  ``minigpt.cli`` prints with exit status 2.
* The record written by ``--out`` holds the exact command, torch version and thread count
  next to the results; ``--save`` writes an instruction-tuned model (LoRA merged into the
  weights) as a shipped-model directory that ``sample`` and ``eval`` load, with that record
  beside it. Every file is written atomically (``minigpt.atomic``).
* Imports flow one way: ``cli`` imports this module, which imports ``finetune`` and
  ``instruct``; neither imports it back.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from minigpt import instruct, peft
from minigpt.atomic import atomic_write_text
from minigpt.checkpoint import export_model
from minigpt.finetune import (
    METHODS,
    ClassificationConfig,
    MethodConfig,
    load_base,
    run_classification,
)
from minigpt.model import GPT


def save_finetuned(model: GPT, tokenizer, out_dir: str | Path, record: dict) -> Path:
    """Write ``model`` (LoRA merged in, if it has any) as a shipped-model directory that
    ``checkpoint.load_model``, ``sample`` and ``eval`` read; ``record`` goes to
    ``finetune.json`` beside it."""
    if any(isinstance(m, peft.LoRALinear) for m in model.modules()):
        model = peft.remove_lora(copy.deepcopy(model))
    out = export_model(model, tokenizer, out_dir)
    atomic_write_text(out / "finetune.json", json.dumps(record, indent=1) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``minigpt finetune`` to ``parser`` (and return it)."""
    parser.add_argument("task", choices=["classify", "instruct"],
                        help="classify: SMS spam, one run per method; instruct: instruction "
                        "tuning")
    parser.add_argument("--base", required=True, default=argparse.SUPPRESS,
                        help="the model to start from: a shipped minigpt model directory, a "
                        "GPT-2 name (gpt2, gpt2-medium, ...; downloaded once, then cached) or "
                        "a Hugging Face GPT-2 directory")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        metavar="METHOD", help="classify: fine-tuning methods to compare, of "
                        + ", ".join(METHODS))
    parser.add_argument("--template", default="alpaca", choices=list(instruct.TEMPLATES),
                        help="instruct: the prompt template")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="instruct: LoRA of this rank on every projection instead of full "
                        "fine-tuning (0: full)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (None: per method for classify, 1e-4 for "
                        "instruct)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="tokens per example, at most the context (None: 64 for classify, "
                        "256 for instruct)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="train on at most this many examples (None: all)")
    parser.add_argument("--test-limit", type=int, default=None,
                        help="evaluate on at most this many validation / test examples "
                        "(None: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the run")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results as JSON to this file (None: do not)")
    parser.add_argument("--save", type=Path, default=None,
                        help="instruct: save the tuned model (LoRA merged) to this directory "
                        "(None: do not)")
    return parser


def check_request(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot check; a ``ValueError`` says what to change."""
    if args.save is not None and args.task != "instruct":
        raise ValueError("--save is for instruct: a classifier is not a language model that "
                         "sample and eval can run")
    for name in ("lora_rank", "threads"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got "
                             f"{getattr(args, name)}")
    for name in ("train_limit", "test_limit"):  # the rest: checked by the task's config
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")


def task_configs(args: argparse.Namespace) -> list:
    """The run configs the command line asks for (checked when built, before any loading):
    one ``ClassificationConfig`` per method, or one ``instruct.InstructionConfig``."""
    if args.task == "instruct":
        return [instruct.InstructionConfig(args.template, args.epochs, args.batch_size,
                                           args.lr or 1e-4, args.max_len or 256,
                                           args.train_limit, args.test_limit, seed=args.seed)]
    return [ClassificationConfig(method, args.epochs, args.batch_size, args.lr,
                                 args.max_len or 64, args.train_limit, args.test_limit,
                                 args.test_limit, seed=args.seed) for method in args.methods]


def classify_command(configs: list, base: GPT, tokenizer, eos_id: int) -> list:
    """Run ``classify`` for every method's config; print one line per method."""
    rows = []
    for cfg in configs:
        row = run_classification(base, tokenizer.encode, eos_id, cfg, progress=True)
        rows.append(row)
        t = row["test"]
        print(f"{cfg.method:12s} trainable {row['trainable_params']:>10,d}  "
              f"test acc {t['accuracy']:.3f}  F1 {t['f1']:.3f}  {row['train_seconds']:.0f}s")
    return rows


def instruct_command(cfg: instruct.InstructionConfig, lora_rank: int, base: GPT, tokenizer,
                     eos_id: int) -> list:
    """Run ``instruct`` (full fine-tuning, or LoRA of rank ``lora_rank``) on ``base`` in place."""
    if lora_rank:
        torch.manual_seed(cfg.seed)
        peft.add_lora(base, lora_rank, 2.0 * lora_rank, MethodConfig().lora_targets)
    row = instruct.run_instruction(base, tokenizer.encode, eos_id, cfg, progress=True,
                                   decode=tokenizer.decode)
    row["lora_rank"] = lora_rank
    before, after = row["before"], row["after"]
    print(f"test response loss {before['loss']:.3f} -> {after['loss']:.3f}; ROUGE-L of "
          f"greedy answers {before['answers']['rouge_l']:.3f} -> "
          f"{after['answers']['rouge_l']:.3f}")
    return [row]


def finetune_command(args: argparse.Namespace, command: str) -> int:
    """Run ``classify`` or ``instruct`` as ``args`` say; print, save JSON (and the model, for
    instruct with ``--save``). Bad requests, bases and data raise one-line errors."""
    check_request(args)
    configs = task_configs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer, eos_id = load_base(args.base)
    if args.task == "classify":
        rows = classify_command(configs, base, tokenizer, eos_id)
    else:
        rows = instruct_command(configs[0], args.lora_rank, base, tokenizer, eos_id)
    record = {"command": command, "task": args.task, "base": str(args.base),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    if args.save is not None:
        print(f"model saved to {save_finetuned(base, tokenizer, args.save, record)}")
    return 0
