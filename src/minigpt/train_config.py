"""The training configuration: every hyper-parameter of a run, typed and checked (chapter 5).

Design choices:

- ``TrainConfig`` is a plain dataclass; the JSON files in ``minigpt/configs/`` and the
  command line's ``--set KEY=VALUE`` set its fields, and ``python -m minigpt train --help``
  lists them with their defaults, types and the comments written beside them here.
- Every field is type-checked when a config is built, by the field's annotation
  (``check_value``): booleans must be booleans (the string "False" is not), integers must be
  integers (2.5 is not), floats must be finite numbers (ints are accepted and converted).
  A ``ConfigError`` names the key and the type it expects, in one line.
- ``model`` holds further ``GPTConfig`` fields (``model.<field>`` on the command line); they
  are checked against GPTConfig's annotations, and the whole model configuration is validated
  when the config is built, so a bad model key fails before any data is read.
- The data side of a run is handed to ``minigpt.data`` as a small ``DataSpec``, so data never
  imports the trainer.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field

from minigpt import data
from minigpt.model import GPTConfig


class ConfigError(ValueError):
    """A configuration value of the wrong type or out of range (one line, naming the key)."""


# Set by TrainConfig's own fields: a model.<key> override must not set them twice.
_TOP_LEVEL_MODEL_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout",
                         "bias")


def type_name(hint: object) -> str:
    """What a value of type ``hint`` looks like, for error messages and ``--help``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:  # X | None
        return f"{type_name(args[0])} or null"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a JSON object"}.get(hint, str(hint))


def check_value(key: str, value: object, hint: object) -> object:
    """``value`` if it has type ``hint`` (ints pass as floats); else a ConfigError."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:  # X | None
        if value is None:
            return None
        try:
            return check_value(key, value, args[0])
        except ConfigError:
            raise ConfigError(f"{key} expects {type_name(hint)}, got {value!r}") from None
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool)
          and math.isfinite(v),
          str: lambda v: isinstance(v, str),
          dict: lambda v: isinstance(v, dict)}[hint](value)
    if not ok:
        raise ConfigError(f"{key} expects {type_name(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _model_hints() -> dict[str, object]:
    hints = typing.get_type_hints(GPTConfig)
    return {k: v for k, v in hints.items() if k not in _TOP_LEVEL_MODEL_KEYS}


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run (the JSON files in ``minigpt/configs/``)."""

    # data
    dataset: str = "tinyshakespeare"  # a name registered in minigpt.registry, or a UTF-8 text file
    tokenizer: str = "char"  # "char" (one id per character) or "bpe" (byte-level BPE)
    bpe_vocab_size: int = 1024  # for tokenizer="bpe": trained on the training split
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split
    # model (GPTConfig; vocab_size comes from the tokenizer)
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 64  # context length in tokens
    dropout: float = 0.0  # dropout probability while training
    bias: bool = True  # biases in Linear layers and LayerNorms
    model: dict = field(default_factory=dict)  # further GPTConfig fields, e.g. {"norm": "rmsnorm"}
    # optimisation
    batch_size: int = 12  # sequences per micro-batch (per rank)
    grad_accum_steps: int = 1  # micro-batches per optimiser step
    max_iters: int = 2000  # optimiser steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor of the cosine schedule
    warmup_iters: int = 100  # linear warm-up from 0 to lr over this many steps
    lr_decay_iters: int | None = None  # end of the cosine; None: max_iters
    weight_decay: float = 0.1  # Linear weights only (see minigpt.optim.param_groups)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    optimizer: str = "torch"  # "torch" (torch.optim.AdamW, fused/foreach) or "scratch"
    # evaluation, stopping, logging
    eval_interval: int = 250  # estimate train/val loss every this many steps (and at the end)
    eval_iters: int = 20  # batches per estimate (fixed, evenly spaced windows)
    early_stop_patience: int = 0  # stop after this many evals without a better val loss; 0: off
    checkpoint_interval: int = 0  # also checkpoint every this many steps; 0: at evals only
    # system
    seed: int = 1337  # seeds python, numpy, torch and the batch sampler
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # "float32", "bfloat16" (autocast) or "auto": bf16 where in hardware
    compile: bool = False  # torch.compile the model
    num_threads: int = 0  # cores to use; 0: torch's default (all of them)
    micro_batch_threads: int = 1  # micro-batches run at once, in threads sharing the cores
    out_dir: str = "out/run"  # log.jsonl, ckpt.pt and the exported model go here
    resume: bool = False  # continue from out_dir/ckpt.pt if it exists
    progress: bool = True  # progress bar and one line per evaluation (rank 0 only)

    def __post_init__(self) -> None:
        for key, hint in typing.get_type_hints(TrainConfig).items():
            setattr(self, key, check_value(key, getattr(self, key), hint))
        hints = _model_hints()
        for key, value in self.model.items():
            if key not in hints:
                raise ConfigError(f"model.{key} is not a GPTConfig field this config may set; "
                                  f"valid: {sorted(hints)} (set the others as top-level keys)")
            check_value(f"model.{key}", value, hints[key])
        decay = "max_iters" if self.lr_decay_iters is None else "lr_decay_iters"
        checks = {  # key: (valid?, the rule to print when it is not)
            "tokenizer": (self.tokenizer in ("char", "bpe"), "'char' or 'bpe'"),
            "optimizer": (self.optimizer in ("torch", "scratch"), "'torch' or 'scratch'"),
            "dtype": (self.dtype in ("float32", "bfloat16", "auto"),
                      "'float32', 'bfloat16' or 'auto'"),
            "device": (re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
                       "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"),
            "batch_size": (self.batch_size >= 1, "at least 1"),
            "grad_accum_steps": (self.grad_accum_steps >= 1, "at least 1"),
            "max_iters": (self.max_iters >= 1, "at least 1"),
            "eval_interval": (self.eval_interval >= 1, "at least 1"),
            "eval_iters": (self.eval_iters >= 1, "at least 1"),
            "val_fraction": (0 < self.val_fraction < 1, "between 0 and 1"),
            "warmup_iters": (0 <= self.warmup_iters <= self.decay_iters,
                             f"between 0 and {decay} ({self.decay_iters})"),
            "micro_batch_threads": (self.micro_batch_threads >= 1, "at least 1"),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise ConfigError(f"invalid TrainConfig value {key}={getattr(self, key)!r}: "
                                  f"it must be {rule}; see `python -m minigpt train --help`")
        self._check_micro_batch_threads()
        self.model_config(vocab_size=1)  # GPTConfig's own checks, before any data is read

    def _check_micro_batch_threads(self) -> None:
        n = self.micro_batch_threads
        needs = [
            (self.grad_accum_steps >= n,
             f"grad_accum_steps >= {n} (it runs the micro-batches of one step at once)"),
            (self.dropout == 0, "dropout=0 (the threads would draw their dropout masks from "
                                "one generator in a racy order, so runs would not repeat)"),
            (not self.compile, "compile=false (a compiled model is not run from threads)"),
        ]
        unmet = [need for ok, need in needs if not ok]
        if n > 1 and unmet:
            raise ConfigError(f"micro_batch_threads={n} needs {unmet[0]}; "
                              "or set micro_batch_threads=1")

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    @property
    def data_spec(self) -> data.DataSpec:
        """What ``data.prepare_data`` needs to build this run's token bins."""
        return data.DataSpec(self.dataset, self.tokenizer, self.bpe_vocab_size,
                             self.val_fraction)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The ``GPTConfig`` of this run for a tokenizer of ``vocab_size`` tokens."""
        try:
            return GPTConfig(vocab_size=vocab_size, block_size=self.block_size,
                             n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                             dropout=self.dropout, bias=self.bias, **self.model)
        except ValueError as e:
            raise ConfigError(f"invalid model configuration: {e}") from None

    @classmethod
    def field_type(cls, key: str) -> object:
        """The type of config key ``key`` (``model.<field>`` for GPTConfig fields)."""
        top, _, sub = key.partition(".")
        if top == "model" and sub in _TOP_LEVEL_MODEL_KEYS:
            raise ConfigError(f"{key}: set {sub} as a top-level key (vocab_size comes from "
                              "the tokenizer)")
        hints = _model_hints() if top == "model" and sub else typing.get_type_hints(cls)
        name = sub if top == "model" and sub else key
        if name not in hints:
            raise ConfigError(f"unknown config key {key!r}; valid keys: "
                              f"{sorted(typing.get_type_hints(cls))} (and model.<GPTConfig "
                              f"field>: {sorted(_model_hints())})")
        return hints[name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (a config file); unknown keys raise a ConfigError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


__all__ = ["ConfigError", "TrainConfig", "check_value", "type_name"]
