"""Command line: ``python -m minigpt train | sample | eval | finetune`` (``--help`` on each).

Configs are JSON files of ``TrainConfig`` keys. ``--config NAME`` finds ``NAME.json`` in
``./configs/`` or in the repository's ``configs/`` folder (found from this file, so it works in
an editable install, ``pip install -e .``); ``--config path/to/file.json`` takes any file.
Errors (missing config, unknown key, bad checkpoint) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import re
import sys
from pathlib import Path

from minigpt.checkpoint import load_model, read_checkpoint
from minigpt.data import DataError
from minigpt.finetune import finetune_main
from minigpt.generate import stream
from minigpt.train import TrainConfig, estimate_loss, prepare_data, train

CONFIG_DIRS = (Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs")


class CLIError(ValueError):
    """A user error: reported as one line, exit status 2."""


def config_help() -> str:
    """One line per TrainConfig key: name, default and the comment from its definition."""
    comments = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$",
                               inspect.getsource(TrainConfig), flags=re.M))
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {json.dumps(default)}   {comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def resolve_config(name: str) -> Path:
    """A config file path from a path or a name in ``configs/``."""
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise CLIError(f"config file {path} does not exist")
        return path
    for d in CONFIG_DIRS:
        if (d / f"{name}.json").is_file():
            return d / f"{name}.json"
    known = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.json")})
    raise CLIError(f"no config named {name!r}; known configs: {known} (or pass a .json path)")


def load_config(name: str, overrides: list[str]):
    """A TrainConfig from a config file plus ``key=value`` overrides (values parsed as JSON)."""
    path = resolve_config(name)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CLIError(f"config {path} is not valid JSON: {e}") from None
    values.pop("description", None)  # a free-text note in the config files
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CLIError(f"--set takes key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string, e.g. out_dir=out/x
        top, _, sub = key.partition(".")
        if top not in known or (sub and top != "model"):
            raise CLIError(f"unknown config key {key!r}; valid keys: {sorted(known)} "
                           "(and model.<GPTConfig field>)")
        if sub:
            values.setdefault("model", {})[sub] = value
        else:
            values[key] = value
    try:
        return TrainConfig.from_dict(values)
    except TypeError as e:
        raise CLIError(f"bad config value: {e}") from None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    result = train(cfg)
    print(f"done: {result.iterations} steps, val loss {result.val_loss:.4f} "
          f"(whole validation split), {result.wall_time:.1f} s, "
          f"{result.tokens_per_s:,.0f} tokens/s; model in {cfg.out_dir}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    model, tok = load_model(args.checkpoint)
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise CLIError("the prompt is empty; pass --prompt with at least one token")
    ids, shown = list(prompt), len(tok.decode(prompt))
    sys.stdout.write(args.prompt)
    for t in stream(model, prompt, args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    repetition_penalty=args.repetition_penalty):
        ids.append(t)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
    sys.stdout.write("\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, tok = load_model(args.checkpoint)
    src = Path(args.checkpoint)
    cfg = TrainConfig()  # the training config is stored in both formats; use its dataset
    if src.is_dir():
        train_info = json.loads((src / "config.json").read_text(encoding="utf-8")).get("train")
        if train_info:
            cfg = TrainConfig.from_dict(train_info["config"])
    elif "config" in (extra := read_checkpoint(src)["extra"]):
        cfg = TrainConfig.from_dict(json.loads(extra["config"]))
    if args.dataset:
        cfg = dataclasses.replace(cfg, dataset=args.dataset)
    _, _, val = prepare_data(cfg, tokenizer=tok)
    loss = estimate_loss(model, val, model.config.block_size, batch_size=args.batch_size)
    print(json.dumps({"val_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                      "val_tokens": len(val), "dataset": cfg.dataset}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minigpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a GPT from a config file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train (or resume, with --set resume=true) a GPT. Multi-process"
                       ": torchrun --nproc_per_node=N -m minigpt train --config ...",
                       epilog="config keys (--set KEY=VALUE; values are JSON, e.g. 6, 3e-4, "
                       "true, \"out/x\"; model.<GPTConfig field> for the rest of the model):\n"
                       + config_help())
    p.add_argument("--config", required=True,
                   help="config name in configs/ (e.g. shakespeare_char) or a .json path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key; repeat for several")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a trained model, streamed")
    p.add_argument("--checkpoint", required=True,
                   help="a model directory (model.safetensors + config.json) or a ckpt.pt file")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divide the logits by this; < 1 is more conservative (default 0.8)")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens whose total probability is p")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the context less likely")
    p.add_argument("--seed", type=int, default=None, help="random seed (repeatable output)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="validation loss and perplexity of a trained model")
    p.add_argument("--checkpoint", required=True,
                   help="a model directory (model.safetensors + config.json) or a ckpt.pt file")
    p.add_argument("--dataset", default=None,
                   help="dataset name or text file (default: the one the model was trained on)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", add_help=False,
                       help="fine-tune a model: classify (SMS spam, PEFT methods compared) or "
                       "instruct (instruction tuning); python -m minigpt finetune --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for user errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:  # its own parser, in minigpt.finetune
        return finetune_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, DataError, OSError) as e:  # CLIError, CheckpointError, bad values
        print(f"error: {e}", file=sys.stderr)
        return 2
