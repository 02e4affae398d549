"""Zero- and few-shot prompting: in-context learning measured by likelihood (chapter 8).

A *task* is a list of (input, answer) pairs rendered with one line template such as
``"{x} -> {y}\\n"``. A k-shot prompt is k solved pairs (the demonstrations) followed by the
query with its answer left out; the model is never trained on the task, it only reads it.

Design choices:

* the model does not generate: each candidate answer is scored by its total log-probability
  after the prompt (teacher forcing, one batched forward pass) and the best one is the
  prediction; no answer can fail to parse, and a small model's scores are as meaningful as a
  large one's (GPT-3 scores its multiple-choice tasks this way);
* the whitespace before ``{y}`` in the template belongs to the answer (``" king"``, not
  ``"king"`` after ``"-> "``), as byte-level BPEs spell a word with its leading space;
* ``few_shot_accuracy`` draws the queries and the wrong candidates from a seeded generator that
  does not depend on k, so every k sees the same questions and only the demonstrations change;
  the demonstrations never contain the query's own pair, so copying one cannot score;
* a tokenizer is anything with ``encode(str) -> list[int]`` (minigpt's BPE or tiktoken);
  argument checks live in ``Task`` and ``check_fits``, not in the scoring code.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minigpt.model import GPT

Encode = Callable[[str], list[int]]


class PromptError(ValueError):
    """A task or prompt that cannot be scored (bad template, too few pairs, too long)."""


@dataclass(frozen=True)
class Task:
    """(input, answer) pairs and the template that writes one solved pair as text."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    template: str = "{x} -> {y}\n"
    n_candidates: int = 4

    def __post_init__(self) -> None:
        head, sep, tail = self.template.partition("{y}")
        if "{x}" not in head or not sep or "{x}" in tail or "{y}" in tail:
            raise PromptError(f"template {self.template!r} needs one {{x}} before one {{y}}")
        if self.n_candidates < 2:
            raise PromptError(f"n_candidates must be at least 2, got {self.n_candidates}")
        answers = {y for _, y in self.pairs}
        if len(answers) < self.n_candidates:
            raise PromptError(
                f"task {self.name!r} has {len(answers)} distinct answers, fewer than "
                f"n_candidates={self.n_candidates}; add pairs or lower n_candidates"
            )

    def solved(self, x: str, y: str) -> str:
        """One demonstration: the template filled with an input and its answer."""
        return self.template.replace("{x}", x).replace("{y}", y)

    def query(self, x: str) -> tuple[str, str]:
        """The query line up to the answer, and the whitespace the answer starts with."""
        head = self.template.partition("{y}")[0].replace("{x}", x)
        stem = head.rstrip()
        return stem, head[len(stem):]


def build_prompt(task: Task, demos: Sequence[tuple[str, str]], x: str) -> str:
    """k solved demonstrations, then the query ``x`` with its answer left out."""
    stem, _ = task.query(x)
    return "".join(task.solved(dx, dy) for dx, dy in demos) + stem


def check_fits(model: GPT, n_tokens: int) -> None:
    """Raise ``PromptError`` if a prompt plus answer of ``n_tokens`` exceeds the context."""
    if n_tokens > model.config.block_size:
        raise PromptError(
            f"prompt and answer take {n_tokens} tokens, more than the model's context of "
            f"{model.config.block_size}; use fewer demonstrations or shorter pairs"
        )


@torch.no_grad()
def score_candidates(
    model: GPT, encode: Encode, prompt: str, candidates: Sequence[str]
) -> torch.Tensor:
    """Each candidate's log p(candidate | prompt), summed over its tokens."""
    context = encode(prompt)
    answers = [encode(c) for c in candidates]
    width = len(context) + max(len(a) for a in answers)
    check_fits(model, width)
    rows = torch.zeros(len(answers), width, dtype=torch.long)  # right-padded (causal)
    for i, answer in enumerate(answers):
        rows[i, : len(context) + len(answer)] = torch.tensor(context + answer)
    logp = model.eval()(rows[:, :-1])[0].float().log_softmax(-1)
    scores = torch.zeros(len(answers))
    for i, answer in enumerate(answers):
        at = torch.arange(len(context) - 1, len(context) - 1 + len(answer))
        scores[i] = logp[i, at, torch.tensor(answer)].sum()
    return scores


@dataclass(frozen=True)
class ShotResult:
    """How a model did with ``shots`` demonstrations over ``n_queries`` queries."""

    shots: int
    accuracy: float  # share of queries whose right answer scored best among the candidates
    answer_nll: float  # mean -log p(right answer | prompt), in nats


def few_shot_eval(
    model: GPT, encode: Encode, task: Task, shots: int, n_queries: int = 40, seed: int = 0
) -> ShotResult:
    """Accuracy and answer log-loss of ``shots``-shot prompting on ``n_queries`` queries.

    Query i, its wrong candidates and the order of the candidates depend on ``seed`` only;
    its ``shots`` demonstrations are drawn (from the other pairs) by a second generator.
    """
    if not 0 <= shots < len(task.pairs):
        raise PromptError(f"shots must be in [0, {len(task.pairs) - 1}], got {shots}")
    questions, demo_rng = random.Random(seed), random.Random(f"{seed}-{shots}")
    answers = sorted({y for _, y in task.pairs})
    correct, nll = 0, 0.0
    for _ in range(n_queries):
        x, y = questions.choice(task.pairs)
        wrong = questions.sample([a for a in answers if a != y], task.n_candidates - 1)
        candidates = [y, *wrong]
        questions.shuffle(candidates)
        others = [p for p in task.pairs if p != (x, y)]
        prompt = build_prompt(task, demo_rng.sample(others, shots), x)
        gap = task.query(x)[1]
        scores = score_candidates(model, encode, prompt, [gap + c for c in candidates])
        correct += candidates[int(scores.argmax())] == y
        nll -= scores[candidates.index(y)].item()
    return ShotResult(shots, correct / n_queries, nll / n_queries)
