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
* A falling loss is not yet a better answer, so held-out items are also answered (greedy
  decoding up to end-of-text) and scored against the reference: ROUGE-L (Lin 2004; the
  longest common word subsequence, F1 of its precision and recall) and exact match, both on
  lower-cased words. Both are implemented here in a few lines and tested.
* Training is ``minigpt.tuning.fit``: the optimisation step of pretraining, with its schedule,
  decay groups and clipping. This module does not import ``minigpt.finetune`` or
  ``minigpt.finetune_cli`` (which imports this one for its command line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.generate import generate
from minigpt.registry import path as dataset_path
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


def keep_fitting(entries: Sequence[Entry], template: Callable[[Entry], tuple[str, str]],
                 encode: Callable[[str], list[int]], eos_id: int, max_len: int) -> list[Entry]:
    """The entries whose prompt leaves at least one response token within ``max_len``."""
    out = []
    for entry in entries:
        _, labels = encode_example(*template(entry), encode, eos_id)
        if any(label != IGNORE for label in labels[1 : max_len + 1]):
            out.append(entry)
    return out


def encode_entries(entries: Sequence[Entry], template: Callable[[Entry], tuple[str, str]],
                   encode: Callable[[str], list[int]], eos_id: int,
                   max_len: int) -> list[tuple[list[int], list[int]]]:
    """Encode entries, dropping those whose prompt leaves no response token within max_len."""
    return [encode_example(*template(e), encode, eos_id)
            for e in keep_fitting(entries, template, encode, eos_id, max_len)]


def lm_batches(data: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
               max_len: int, seed: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """Collated batches of encoded examples, shuffled if ``seed`` is given."""
    order = list(range(len(data)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [collate([data[j] for j in order[i : i + batch_size]], pad_id, max_len)
            for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------ answers and metrics
def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters and digits): what the answer metrics compare."""
    return re.findall(r"\w+", text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (by dynamic
    programming)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004): the longest common word subsequence, as a share of the
    candidate (precision) and of the reference (recall), combined by a harmonic mean."""
    c, r = words(candidate), words(reference)
    common = lcs_length(c, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(c), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """Whether the two texts have the same words (case and punctuation ignored)."""
    return words(candidate) == words(reference)


def answer(model: nn.Module, prompt: str, encode: Callable[[str], list[int]],
           decode: Callable[[list[int]], str], eos_id: int, max_new_tokens: int) -> str:
    """The model's greedy answer to ``prompt``, up to end-of-text or ``max_new_tokens``."""
    out = generate(model, encode(prompt), max_new_tokens, temperature=0.0, eos_id=eos_id)[0]
    return decode(out[:-1] if out[-1:] == [eos_id] else out).strip()


def evaluate_answers(model: nn.Module, entries: Sequence[Entry],
                     template: Callable[[Entry], tuple[str, str]],
                     encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                     eos_id: int, max_new_tokens: int = 48) -> dict:
    """Greedy answers to held-out entries, scored against their references: mean ROUGE-L,
    the exact-match rate, and the answers themselves."""
    if not entries:
        raise ValueError("no entries to answer")
    answers = [answer(model, template(e)[0], encode, decode, eos_id, max_new_tokens)
               for e in entries]
    references = [template(e)[1] for e in entries]
    scores = [rouge_l(a, r) for a, r in zip(answers, references, strict=True)]
    matches = [exact_match(a, r) for a, r in zip(answers, references, strict=True)]
    return {"rouge_l": sum(scores) / len(scores), "exact_match": sum(matches) / len(matches),
            "n": len(entries), "answers": answers, "rouge_l_each": scores}


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
    answer_limit: int | None = None  # answer this many test items (None: all; 0: none)
    answer_tokens: int = 48  # at most this many tokens per generated answer

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose one of "
                             f"{list(TEMPLATES)}")
        if min(self.epochs, self.batch_size, self.max_len, self.answer_tokens) < 1:
            raise ValueError("epochs, batch_size, max_len and answer_tokens must be >= 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.max_len}, "
                             f"{self.answer_tokens}")


def run_instruction(model: nn.Module, encode: Callable[[str], list[int]], eos_id: int,
                    cfg: InstructionConfig, entries: Sequence[Entry] | None = None,
                    progress: bool = False,
                    decode: Callable[[list[int]], str] | None = None) -> dict:
    """Instruction-tune ``model`` in place (full fine-tuning, or whatever ``peft`` left trainable).

    ``cfg.max_len`` is clamped to the model's context. Before and after training, measures the
    response loss on the test split and, if ``decode`` is given, the greedy answers to the
    first ``cfg.answer_limit`` test items (ROUGE-L, exact match). Returns a result dict.
    """
    cfg = dataclasses.replace(cfg, max_len=min(cfg.max_len, model.config.block_size))
    train, _, test = split_entries(load_instructions() if entries is None else entries,
                                   seed=0)
    template = TEMPLATES[cfg.template]
    parts = {name: keep_fitting(part, template, encode, eos_id, cfg.max_len)[:limit]
             for name, part, limit in (("train", train, cfg.train_limit),
                                       ("test", test, cfg.test_limit))}
    for name, part in parts.items():
        if not part:
            raise ValueError(f"no {name} example leaves room for a response within max_len="
                             f"{cfg.max_len} tokens; raise max_len or use a shorter template")
    data = {name: [encode_example(*template(e), encode, eos_id) for e in part]
            for name, part in parts.items()}
    held_out = parts["test"][: cfg.answer_limit] if decode is not None else []

    def measure() -> dict:
        out = evaluate_lm(model, lm_batches(data["test"], 16, eos_id, cfg.max_len))
        if held_out:
            out["answers"] = evaluate_answers(model, held_out, template, encode, decode,
                                              eos_id, cfg.answer_tokens)
        return out

    before = measure()
    torch.manual_seed(cfg.seed)
    batches = [b for epoch in range(cfg.epochs) for b in lm_batches(
        data["train"], cfg.batch_size, eos_id, cfg.max_len, seed=cfg.seed + epoch)]
    fit_cfg = FitConfig(lr=cfg.lr)
    start = time.perf_counter()
    losses = fit(model, batches, lm_loss, fit_cfg, progress=progress)
    seconds = time.perf_counter() - start
    return {"before": before, "after": measure(), "losses": losses,
            "train_examples": len(data["train"]), "train_seconds": seconds,
            "held_out": [{"instruction": e["instruction"], "input": e["input"],
                          "reference": e["output"]} for e in held_out],
            "config": asdict(cfg), "fit": asdict(fit_cfg)}
