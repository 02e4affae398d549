"""Instruction (supervised) fine-tuning: templates, prompt-masked labels, collation (chapter 7).

An instruction example is a prompt (the template filled with the instruction and its input)
followed by the response. The model is trained with the usual next-token loss, but only on the
response: every label that belongs to the prompt or to padding is -100, which
``F.cross_entropy(ignore_index=-100)`` leaves out of the mean, so those positions get no
gradient. The chat template is the same idea with role markers, as for a customer-service
assistant (the seed article's scenario) trained on question -> answer pairs.

Design choices:

* Labels are aligned with the ids (``encode_example``); ``collate`` alone shifts them by one,
  so the off-by-one of next-token prediction lives in one place.
* Examples are validated where they enter (``check_examples``, called by ``collate``);
  examples whose prompt leaves no response token within ``max_len`` are dropped before
  training (``encode_entries``), never trained on as all-masked rows.
* ``max_len`` is clamped to the model's context, so a default that is longer than a small
  model's context never fails.
* Training is ``minigpt.tuning.fit``: the optimisation step of pretraining, with its schedule,
  decay groups and clipping. This module does not import ``minigpt.finetune`` (which imports
  this one for its command line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.data import path as dataset_path
from minigpt.tuning import FitConfig, fit

IGNORE = -100  # label of positions that are not trained on (prompt and padding)
Entry = dict  # {"instruction": str, "input": str, "output": str}


def load_instructions(file: str | Path | None = None) -> list[Entry]:
    """The instruction data (Raschka 2024): a JSON list of {instruction, input, output}."""
    if file is None:
        file = dataset_path("instruction-data")
    entries = json.loads(Path(file).read_text(encoding="utf-8"))
    for i, e in enumerate(entries):
        if not {"instruction", "input", "output"} <= set(e):
            raise ValueError(f"entry {i} lacks instruction/input/output keys: {sorted(e)}")
    return entries


def format_alpaca(entry: Entry) -> tuple[str, str]:
    """(prompt, response) in the Alpaca template (Taori et al. 2023); no Input block if empty."""
    prompt = ("Below is an instruction that describes a task. Write a response that "
              f"appropriately completes the request.\n\n### Instruction:\n{entry['instruction']}")
    if entry["input"]:
        prompt += f"\n\n### Input:\n{entry['input']}"
    return prompt + "\n\n### Response:\n", entry["output"]


def format_chat(entry: Entry, user: str = "User", assistant: str = "Assistant") -> tuple[str, str]:
    """(prompt, response) as one turn of a dialogue: ``User: ...`` then ``Assistant: ``."""
    question = entry["instruction"] + (f"\n{entry['input']}" if entry["input"] else "")
    return f"{user}: {question}\n{assistant}: ", entry["output"]


TEMPLATES: dict[str, Callable[[Entry], tuple[str, str]]] = {
    "alpaca": format_alpaca, "chat": format_chat,
}


def encode_example(prompt: str, response: str, encode: Callable[[str], list[int]],
                   eos_id: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + end-of-text, and labels with the prompt set to -100.

    The labels are aligned with the ids (label i is the target *at* token i); ``collate``
    shifts them by one so that position t is trained to predict token t + 1.
    """
    p, r = encode(prompt), encode(response) + [eos_id]
    return p + r, [IGNORE] * len(p) + r


def check_examples(batch: Sequence[tuple[list[int], list[int]]]) -> None:
    """Raise ``ValueError`` unless ``batch`` is a non-empty list of equally long (ids, labels)
    pairs of at least 2 tokens each."""
    if not batch:
        raise ValueError("empty batch")
    for ids, labels in batch:
        if len(ids) != len(labels):
            raise ValueError(f"ids and labels differ in length: {len(ids)} != {len(labels)}")
        if len(ids) < 2:
            raise ValueError("an example needs at least 2 tokens (one input, one target)")


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int,
            max_len: int) -> tuple[Tensor, Tensor]:
    """Inputs (B, T) and next-token targets (B, T) for (ids, labels) examples.

    Each example is cut to ``max_len + 1`` tokens; inputs are ids[:-1], targets
    labels[1:].
    Rows are right-padded to the longest: inputs with ``pad_id``, targets with -100.
    """
    check_examples(batch)
    rows = [(ids[: max_len + 1], labels[: max_len + 1]) for ids, labels in batch]
    T = max(len(ids) - 1 for ids, _ in rows)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        inputs[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, : len(labels) - 1] = torch.tensor(labels[1:])
    return inputs, targets


def masked_lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the positions whose target is not -100."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The masked next-token loss of ``model`` on one collated batch (``fit``'s ``loss_fn``)."""
    inputs, targets = batch
    logits, _ = model(inputs)
    return masked_lm_loss(logits, targets)


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> dict:
    """Mean loss per response token over all batches, and its perplexity exp(loss).

    Token-weighted (a batch with more response tokens counts more), in eval mode; no
    parameter changes here, unlike the seed article's ``evaluate``.
    """
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits, _ = model(inputs)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    if count == 0:
        raise ValueError("no response tokens to evaluate (all labels are -100)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def split_entries(entries: Sequence[Entry], fractions: Sequence[float] = (0.85, 0.05, 0.10),
                  seed: int = 0) -> tuple[list[Entry], ...]:
    """Shuffle (seeded) and cut into train / validation / test parts."""
    order = list(entries)
    random.Random(seed).shuffle(order)
    cuts = [round(sum(fractions[:i]) * len(order)) for i in range(len(fractions) + 1)]
    return tuple(order[lo:hi] for lo, hi in zip(cuts, cuts[1:], strict=False))


def encode_entries(entries: Sequence[Entry], template: Callable[[Entry], tuple[str, str]],
                   encode: Callable[[str], list[int]], eos_id: int,
                   max_len: int) -> list[tuple[list[int], list[int]]]:
    """Encode entries, dropping those whose prompt leaves no response token within max_len."""
    out = []
    for entry in entries:
        ids, labels = encode_example(*template(entry), encode, eos_id)
        if any(label != IGNORE for label in labels[1 : max_len + 1]):
            out.append((ids, labels))
    return out


def lm_batches(data: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
               max_len: int, seed: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """Collated batches of encoded examples, shuffled if ``seed`` is given."""
    order = list(range(len(data)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [collate([data[j] for j in order[i : i + batch_size]], pad_id, max_len)
            for i in range(0, len(order), batch_size)]


@dataclass
class InstructionConfig:
    """One instruction fine-tuning run (``run_instruction``)."""

    template: str = "alpaca"
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-4  # peak learning rate (tuning.FitConfig: warm-up, cosine, decay groups)
    max_len: int = 256  # tokens per example (longer ones are cut); at most the model's context
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose one of "
                             f"{list(TEMPLATES)}")
        if min(self.epochs, self.batch_size, self.max_len) < 1:
            raise ValueError("epochs, batch_size and max_len must be >= 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.max_len}")


def run_instruction(model: nn.Module, encode: Callable[[str], list[int]], eos_id: int,
                    cfg: InstructionConfig, entries: Sequence[Entry] | None = None,
                    progress: bool = False) -> dict:
    """Instruction-tune ``model`` in place (full fine-tuning, or whatever ``peft`` left trainable).

    ``cfg.max_len`` is clamped to the model's context. Evaluates the response loss on the test
    split before and after. Returns a result dict.
    """
    cfg = dataclasses.replace(cfg, max_len=min(cfg.max_len, model.config.block_size))
    train, _, test = split_entries(load_instructions() if entries is None else entries,
                                   seed=0)
    template = TEMPLATES[cfg.template]
    data = {name: encode_entries(part, template, encode, eos_id, cfg.max_len)[:limit]
            for name, part, limit in (("train", train, cfg.train_limit),
                                      ("test", test, cfg.test_limit))}
    for name, part in data.items():
        if not part:
            raise ValueError(f"no {name} example leaves room for a response within max_len="
                             f"{cfg.max_len} tokens; raise max_len or use a shorter template")
    test_batches = lm_batches(data["test"], 16, eos_id, cfg.max_len)
    before = evaluate_lm(model, test_batches)
    torch.manual_seed(cfg.seed)
    batches = [b for epoch in range(cfg.epochs) for b in lm_batches(
        data["train"], cfg.batch_size, eos_id, cfg.max_len, seed=cfg.seed + epoch)]
    fit_cfg = FitConfig(lr=cfg.lr)
    start = time.perf_counter()
    losses = fit(model, batches, lm_loss, fit_cfg, progress=progress)
    seconds = time.perf_counter() - start
    return {"before": before, "after": evaluate_lm(model, test_batches), "losses": losses,
            "train_examples": len(data["train"]), "train_seconds": seconds,
            "config": asdict(cfg), "fit": asdict(fit_cfg)}
