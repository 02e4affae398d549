"""Command line: ``minigpt train | sample | eval | finetune`` (or ``python -m minigpt ...``).

``--help`` on each command lists every option with its default; ``minigpt --version`` prints
the installed version. Configs are JSON files of ``TrainConfig`` keys: ``--config NAME`` finds
``NAME.json`` in ``./configs/`` (the working directory first, so a project can keep its own)
and then among the configs shipped inside the package (``minigpt/configs/``, package data
read with ``importlib.resources``, so it works from a wheel as from a checkout);
``--config path/to/file.json`` takes any file. Every user error (missing config, unknown
key, bad value, bad checkpoint or base model, a bad option) prints one line and exits with
status 2.

Design choices:

- argparse plus a hand-written typed ``--set`` rather than tyro, jsonargparse or
  transformers' HfArgumentParser: the config is one flat dataclass of five value types plus
  a dict of ``model.<field>`` overrides, which those libraries would turn into their own
  flag spelling (``--model.norm``, ``--no-resume``) and a dependency (HfArgumentParser pulls
  all of transformers) for about 30 lines of parsing. argparse is in the standard library,
  and ``--set KEY=VALUE`` keeps the command line the config file's format, checked by
  ``TrainConfig``'s own validation, with help generated from its field comments.
- ``--set KEY=VALUE`` converts ``VALUE`` by the type of ``TrainConfig``'s field (or of
  ``GPTConfig``'s for ``model.<field>``): ``true``/``false`` (``True``/``False`` too) for
  booleans, integers only for integer fields, finite numbers for floats, ``null``/``None``
  for optional fields, JSON for ``model``. Anything else is one line naming the key and the
  type it expects.
- ``sample`` is repeatable by default (``--seed 0``); sample ``i`` of ``--num-samples``
  uses seed ``seed + i``. Options and prompt are checked before anything is printed.
- A model directory is data, not instructions: ``eval`` uses a dataset named in its
  ``config.json`` only if it is a registered name (``minigpt.registry.REGISTRY``); a local file
  is read only when the user passes it (``--data PATH``).
- Training stopped by Ctrl-C, SIGTERM or SIGHUP saves a checkpoint and exits with one line
  and status 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import inspect
import itertools
import json
import math
import re
import shlex
import sys
import typing
from pathlib import Path

import torch

import minigpt
from minigpt import data, finetune_cli, registry
from minigpt.checkpoint import load_model, read_checkpoint
from minigpt.ddp import resolve_device
from minigpt.generate import DecodeOptions, stream
from minigpt.registry import DataError
from minigpt.train import TrainingInterrupted, estimate_loss, train
from minigpt.train_config import TrainConfig, check_value, type_name

if typing.TYPE_CHECKING:
    from importlib.resources.abc import Traversable


class CLIError(ValueError):
    """A user error: reported as one line, exit status 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: ...`` on stderr and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def config_dirs() -> list:
    """Where ``--config NAME`` looks, in order: ``./configs/``, then the package's configs."""
    return [Path.cwd() / "configs", importlib.resources.files(minigpt) / "configs"]


def config_help() -> str:
    """One line per TrainConfig key: name, default, type and the comment from its definition."""
    comments = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$",
                               inspect.getsource(TrainConfig), flags=re.M))
    hints = typing.get_type_hints(TrainConfig)
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name} = {json.dumps(default)}   ({type_name(hints[f.name])}) "
                     f"{comments.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def known_configs() -> list[str]:
    """The names ``--config`` accepts without a path (``./configs/`` and the shipped ones)."""
    return sorted({p.name.removesuffix(".json") for d in config_dirs() if d.is_dir()
                   for p in d.iterdir() if p.name.endswith(".json")})


def resolve_config(name: str) -> Traversable:
    """A config file (a ``Path`` or a package resource) from a path or a config name."""
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise CLIError(f"config file {path} does not exist")
        return path
    for d in config_dirs():
        if (d / f"{name}.json").is_file():
            return d / f"{name}.json"
    raise CLIError(f"no config named {name!r}; known configs: {known_configs()} "
                   "(or pass a .json path)")


_WORDS = {"true": True, "True": True, "false": False, "False": False, "null": None,
          "None": None, "none": None}


def parse_value(key: str, raw: str, hint: object) -> object:
    """The command-line string ``raw`` as a value of type ``hint``; a ConfigError if it is not.

    Booleans: true/false/True/False; integers: digits only (2.5 and 'fifty' are errors);
    floats: finite numbers; strings: as given (JSON quotes removed); ``model``: a JSON object.
    """
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if raw in _WORDS and (base is bool or _WORDS[raw] is None):
        value = _WORDS[raw]
    elif base is str:
        value = json.loads(raw) if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    else:
        try:
            value = {int: int, float: float, dict: json.loads}.get(base, json.loads)(raw)
        except ValueError:
            value = raw  # reported below with the type expected
    return check_value(key, value, hint)


def load_config(name: str, overrides: list[str]) -> TrainConfig:
    """A TrainConfig from a config file plus typed ``key=value`` overrides."""
    path = resolve_config(name)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CLIError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise CLIError(f"config {path} must be a JSON object of TrainConfig keys")
    values.pop("description", None)  # a free-text note in the config files
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise CLIError(f"--set takes key=value, got {item!r}")
        value = parse_value(key, raw, TrainConfig.field_type(key))
        if key.startswith("model."):
            values.setdefault("model", {})[key.removeprefix("model.")] = value
        else:
            values[key] = value
    try:
        return TrainConfig.from_dict(values)
    except TypeError as e:
        raise CLIError(f"bad config value: {e}") from None


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    if ckpt.is_file() and not cfg.resume and not args.force:
        raise CLIError(f"{ckpt} exists: continue that run with --set resume=true, or start "
                       "over with --force (which overwrites it)")
    try:
        result = train(cfg)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    print(f"done: {result.iterations} steps, val loss {result.val_loss:.4f} "
          f"(whole validation split), {result.wall_time:.1f} s, "
          f"{result.tokens_per_s:,.0f} tokens/s; model in {cfg.out_dir}")
    return 0


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return the ``--device`` to run on (checked: it must exist)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"device={args.device!r} but MPS is not available; use --device cpu")
    return device


def cmd_sample(args: argparse.Namespace) -> int:
    opts = DecodeOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         repetition_penalty=args.repetition_penalty, seed=args.seed)
    model, tok = load_model(args.checkpoint, device=setup_device(args))
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise CLIError("the prompt is empty; pass --prompt with at least one token")
    for i in range(args.num_samples):
        tokens = stream(model, prompt, args.max_new_tokens,
                        dataclasses.replace(opts, seed=args.seed + i))
        first = next(tokens, None)  # stream checks the prompt here: fail before echoing it
        sys.stdout.write(("---\n" if i else "") + args.prompt)
        ids, shown = list(prompt), len(tok.decode(prompt))
        for t in itertools.chain([] if first is None else [first], tokens):
            ids.append(t)
            text = tok.decode(ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        sys.stdout.write("\n")
    return 0


def eval_dataset(checkpoint: Path, explicit: str | None) -> TrainConfig:
    """The training config of a model, with the dataset to evaluate on.

    ``explicit`` (from the command line) may be any registered name or local file. A dataset
    named by the model's own files must be a registered name: a downloaded model's config
    must not make us read (and cache the tokens of) an arbitrary local file.
    """
    cfg = TrainConfig()
    if checkpoint.is_dir():
        train_info = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        if isinstance(train_info.get("train"), dict) and "config" in train_info["train"]:
            cfg = TrainConfig.from_dict(train_info["train"]["config"])
    elif "config" in (extra := read_checkpoint(checkpoint)["extra"]):
        cfg = TrainConfig.from_dict(json.loads(extra["config"]))
    if explicit is not None:
        return dataclasses.replace(cfg, dataset=explicit)
    if cfg.dataset not in registry.REGISTRY:
        raise CLIError(f"{checkpoint} names the dataset {cfg.dataset!r}, which is not a "
                       f"registered dataset ({', '.join(sorted(registry.REGISTRY))}); to evaluate "
                       "on a local file, pass it yourself: --data PATH")
    return cfg


def cmd_eval(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    model, tok = load_model(checkpoint, device=setup_device(args))
    cfg = eval_dataset(checkpoint, args.data)
    _, _, val = data.prepare_data(cfg.data_spec, tokenizer=tok)
    loss = estimate_loss(model, val, model.config.block_size, batch_size=args.batch_size)
    print(json.dumps({"val_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                      "val_tokens": len(val), "dataset": cfg.dataset}))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    return finetune_cli.finetune_command(args, "minigpt " + shlex.join(args.argv))


def count(minimum: int) -> typing.Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def device_name(text: str) -> str:
    """An argparse type: a device name (auto, cpu, mps, cuda, cuda:N)."""
    if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, "
                                         "cuda:N or mps")
    return text


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--device`` and ``--threads``: shared by sample and eval."""
    p.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                   help="a model directory (model.safetensors + config.json) or a ckpt.pt file")
    p.add_argument("--device", type=device_name, default="auto",
                   help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=count(0), default=0,
                   help="torch CPU threads; 0: torch's default (one per core)")


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a GPT from a config file",
                       formatter_class=HelpFormatter,
                       description="Train (or resume, with --set resume=true) a GPT. Multi-process"
                       ": torchrun --nproc_per_node=N -m minigpt train --config ...",
                       epilog="config keys with their defaults (--set KEY=VALUE, converted to "
                       "the key's type: 6, 3e-4, true, out/x, null; model.<GPTConfig field> "
                       "for the rest of the model, e.g. model.norm=rmsnorm):\n"
                       + config_help())
    p.add_argument("--config", required=True, default=argparse.SUPPRESS,
                   help="a config name, from ./configs/ or shipped with minigpt ("
                   + ", ".join(known_configs()) + "), or a path to a .json file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key; repeat for several")
    p.add_argument("--force", action="store_true",
                   help="start from scratch even if out_dir holds a checkpoint (overwrites it)")
    p.set_defaults(func=cmd_train)


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a trained model, streamed",
                       formatter_class=HelpFormatter,
                       description="Generate text from a trained model, streamed as it is "
                       "produced. The same seed gives the same text (on the same device).")
    add_runtime_options(p)
    p.add_argument("--prompt", default="\n", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=count(0), default=300, help="tokens to generate")
    p.add_argument("--num-samples", type=count(1), default=1,
                   help="samples to draw, separated by lines of ---; sample i uses seed + i")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divide the logits by this; < 1 is more conservative, 0 is greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample only among the k most likely tokens (None: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only among the most likely tokens whose total probability "
                   "is p (None: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 makes tokens already in the context less likely")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed repeats the same text")
    p.set_defaults(func=cmd_sample)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a trained model",
                       formatter_class=HelpFormatter,
                       description="Validation loss and perplexity over every window of the "
                       "validation split (no random numbers: the same result every run).")
    add_runtime_options(p)
    p.add_argument("--data", "--dataset", dest="data", default=None, metavar="NAME_OR_PATH",
                   help="registered dataset name or a local UTF-8 text file (None: the "
                   "model's training dataset, if it is a registered name)")
    p.add_argument("--batch-size", type=count(1), default=32, help="windows per forward pass")
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``minigpt`` and its four commands."""
    parser = Parser(prog="minigpt", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"minigpt {minigpt.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(sub)
    add_sample(sub)
    add_eval(sub)
    p = sub.add_parser("finetune", help="fine-tune a model: classify (SMS spam, PEFT methods "
                       "compared) or instruct (instruction tuning)",
                       formatter_class=HelpFormatter,
                       description="Fine-tune a model. classify: an SMS spam classifier, one "
                       "run per fine-tuning method, compared; instruct: instruction tuning "
                       "(--save writes a model that sample and eval load).")
    finetune_cli.add_arguments(p)
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for user errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a bad option (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, DataError, OSError) as e:  # CLIError, ConfigError, CheckpointError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and stops)
        print("interrupted", file=sys.stderr)
        return 130
