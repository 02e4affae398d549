"""Fine-tuning for classification: a head on a GPT, the spam data, metrics, runs (chapter 7).

``GPTClassifier`` reads the final hidden state of each sequence's last real token (the only
position that, under causal attention, has seen the whole message) and maps it to class logits.
``run_classification`` fine-tunes it on the SMS Spam Collection (Almeida et al. 2011) with one
of the methods of ``METHODS``: full fine-tuning, the top blocks only, LoRA, adapters, prompt
tuning (``minigpt.peft``), or full training from a random initialisation (the baseline that
shows what pretraining buys). ``load_base`` loads the model to start from. The
``python -m minigpt finetune`` command that drives these runs is ``minigpt.finetune_cli``.

Design choices:

* The data are made honest before anything is trained: the collection repeats 403 messages
  verbatim, which are dropped before the split; the split is fixed, seeded and stratified
  (70/10/20).
* Class balance: spam is 13% of the messages, so the *training* split is balanced by
  undersampling ham (as Raschka 2024 does): every step sees both classes equally, with no loss
  weights to tune, and epochs get 3.7x cheaper on a CPU. Validation and test keep the natural
  class ratio, so they measure the deployed situation; accuracy is then dominated by ham, so
  F1 (spam positive) and the confusion matrix are reported too, next to the always-ham
  baseline (``always_ham``).
* Training at 50% spam and deploying at 13% is a prior shift: the arg-max (threshold 0.5)
  flags too much ham. The threshold on the spam probability is tuned for F1 on the
  validation split (``tune_threshold``) and applied unchanged to the test split; metrics at
  0.5 are kept beside it.
* One run per method is not a ranking: ``summarize_runs`` gives mean and sample standard
  deviation over seeds (the seed draws the undersampled ham, the batch order and the new
  parameters; the split stays fixed).
* Every method trains with ``minigpt.tuning.fit``, pretraining's optimisation step (decay
  groups, warm-up + cosine schedule, clipping); only the peak learning rate differs by method
  (``DEFAULT_LR``).
* Validation lives in the config objects, at the command line and in ``check_*``
  functions; the pieces the book displays (``GPTClassifier``, the metrics) compute, with at
  most one call to such a check.
* A base model comes with the tokenizer it was trained with: a shipped minigpt directory
  and a Hugging Face directory that holds ``vocab.json`` and ``merges.txt`` (as ``save_hf``
  writes) bring their own; a GPT-2 hub name, or a directory without tokenizer files, gets
  GPT-2's. The end-of-text id (the pad token here) is that tokenizer's ``<|endoftext|>``.
* Imports flow one way: this module imports ``peft``, ``tuning``, ``checkpoint`` and
  ``pretrained``; only ``minigpt.finetune_cli`` (the command line) imports it back.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt import peft
from minigpt.checkpoint import load_model
from minigpt.model import GPT
from minigpt.pretrained import PretrainedError, from_pretrained, load_tokenizer
from minigpt.registry import gpt2_tokenizer
from minigpt.registry import path as dataset_path
from minigpt.tuning import FitConfig, fit

Example = tuple[str, int]  # (text, label)
SMS_LABELS = ("ham", "spam")  # label ids 0 and 1; spam is the positive class


# ------------------------------------------------------------------------------------ data
def load_sms_spam(file: str | Path | None = None) -> list[Example]:
    """The SMS Spam Collection as (text, label) pairs, label 1 for spam, in file order."""
    if file is None:
        file = dataset_path("sms-spam")
    examples = []
    for line in Path(file).read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition("\t")
        examples.append((text, SMS_LABELS.index(label)))
    return examples


def deduplicate(examples: Sequence[Example]) -> list[Example]:
    """Keep the first occurrence of each text (a message in both train and test would leak)."""
    seen: set[str] = set()
    out = []
    for text, label in examples:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return out


def stratified_split(
    examples: Sequence[Example], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> tuple[list[Example], ...]:
    """Split into len(fractions) parts with the same class ratio in each (seeded, fixed).

    Each class is shuffled and cut at the cumulative fractions; the parts are then shuffled.
    """
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    rng = random.Random(seed)
    parts: list[list[Example]] = [[] for _ in fractions]
    for label in sorted({y for _, y in examples}):
        group = [e for e in examples if e[1] == label]
        rng.shuffle(group)
        cuts = [round(sum(fractions[:i]) * len(group)) for i in range(len(fractions) + 1)]
        for part, lo, hi in zip(parts, cuts, cuts[1:], strict=False):
            part.extend(group[lo:hi])
    for part in parts:
        rng.shuffle(part)
    return tuple(parts)


def undersample(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """Drop random examples of the larger classes until every class is as small as the rarest."""
    rng = random.Random(seed)
    labels = sorted({y for _, y in examples})
    groups = {y: [e for e in examples if e[1] == y] for y in labels}
    n = min(len(g) for g in groups.values())
    out = [e for y in labels for e in rng.sample(groups[y], n)]
    rng.shuffle(out)
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, max_len: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists (truncated to ``max_len``) into ids (B, T) and their lengths (B,)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot classify an empty sequence: every text must have >= 1 token")
    seqs = [list(s[:max_len]) for s in seqs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


# --------------------------------------------------------------------------------- metrics
def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = 2):
    """Counts ``cm[t][p]`` of examples with true class t predicted as p (rows: truth)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    cm = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred, strict=True):
        cm[int(t)][int(p)] += 1
    return cm


def accuracy(cm: Sequence[Sequence[int]]) -> float:
    """Fraction of examples on the diagonal of the confusion matrix."""
    total = sum(map(sum, cm))
    return sum(cm[i][i] for i in range(len(cm))) / total if total else 0.0


def precision_recall_f1(cm: Sequence[Sequence[int]],
                        positive: int = 1) -> tuple[float, float, float]:
    """Precision, recall and F1 of class ``positive`` (0.0 where a ratio is 0/0)."""
    tp = cm[positive][positive]
    predicted = sum(row[positive] for row in cm)
    actual = sum(cm[positive])
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ------------------------------------------------------------------------------ the model
def check_lengths(lengths: Tensor, T: int) -> None:
    """Raise ``ValueError`` unless every length is in [1, T] (a real token to read)."""
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must be in [1, {T}], got {lengths.tolist()}")


class GPTClassifier(nn.Module):
    """A linear head on the final hidden state of each sequence's last real token.

    ``base`` is a ``GPT`` or anything with ``config`` and ``hidden_states(idx)`` (such
    as ``peft.PromptTuning``). Right padding is safe: causal attention never lets the
    last real token see the pads after it.
    """

    def __init__(self, base: nn.Module, num_classes: int = 2) -> None:
        super().__init__()
        self.base = base
        self.head = nn.Linear(base.config.n_embd, num_classes)

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits (B, classes); ``lengths`` (B,) counts each row's real tokens."""
        hidden = self.base.hidden_states(idx)  # (B, T, C)
        if lengths is None:  # no padding: the last position is the last real token
            return self.head(hidden[:, -1])
        check_lengths(lengths, idx.size(1))
        last = hidden[torch.arange(idx.size(0)), lengths - 1]  # (B, C)
        return self.head(last)


def _random_init(model: GPT) -> GPT:
    """A fresh, randomly initialised GPT of the same configuration (the no-pretraining baseline)."""
    return GPT(model.config)


@dataclass
class MethodConfig:
    """Knobs of the fine-tuning methods (each method reads its own)."""

    top_blocks: int = 2  # "top": train the top k blocks (+ final norm)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    adapter_bottleneck: int = 16
    n_prompt: int = 16  # "prompt": soft-prompt vectors


METHODS: dict[str, Callable[[GPT, MethodConfig], nn.Module]] = {
    "full": lambda m, c: m,  # every weight is trained
    "head": lambda m, c: peft.freeze(m),  # features stay fixed; only the new head learns
    "top": lambda m, c: peft.freeze_all_but_top(m, c.top_blocks),
    "lora": lambda m, c: peft.add_lora(m, c.lora_rank, c.lora_alpha, c.lora_targets),
    "adapters": lambda m, c: peft.add_adapters(m, c.adapter_bottleneck),
    "prompt": lambda m, c: peft.PromptTuning(m, c.n_prompt),
    "random-init": lambda m, c: _random_init(m),
}
# Peak learning rates (few new parameters need larger steps), chosen by short sweeps on the
# validation split with a constant rate, before fit had a schedule; not re-swept since.
DEFAULT_LR = {"full": 3e-4, "head": 1e-2, "top": 1e-3, "lora": 3e-3, "adapters": 3e-3,
              "prompt": 3e-2, "random-init": 1e-3}


def make_classifier(base: GPT, method: str, cfg: MethodConfig | None = None,
                    num_classes: int = 2, seed: int = 0) -> GPTClassifier:
    """Wrap ``base`` (modified in place) for ``method`` and put a classification head on it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    torch.manual_seed(seed)  # new parameters (head, LoRA A, adapters) are initialised from it
    return GPTClassifier(METHODS[method](base, cfg or MethodConfig()), num_classes)


# ------------------------------------------------------------------------------- runs
def classification_batches(
    data: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int, max_len: int,
    seed: int | None = None,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(ids, lengths, labels) batches of encoded examples, shuffled if ``seed`` is given."""
    order = list(range(len(data)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        ids, lengths = pad_batch([s for s, _ in chunk], pad_id, max_len)
        out.append((ids, lengths, torch.tensor([y for _, y in chunk])))
    return out


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Cross-entropy of the classifier's logits on one (ids, lengths, labels) batch."""
    ids, lengths, labels = batch
    return F.cross_entropy(model(ids, lengths), labels)


@torch.no_grad()
def spam_scores(model: nn.Module,
                batches: Sequence[tuple[Tensor, Tensor, Tensor]]) -> tuple[list[float], list[int]]:
    """The probability of class 1 (softmax of the logits) for every example, and the labels."""
    model.eval()
    scores, labels = [], []
    for ids, lengths, y in batches:
        scores += model(ids, lengths).softmax(-1)[:, 1].tolist()
        labels += y.tolist()
    return scores, labels


def metrics_at(scores: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> dict:
    """Accuracy, precision/recall/F1 of class 1 and the confusion matrix when an example is
    called class 1 iff its score exceeds ``threshold`` (0.5: the argmax of two classes)."""
    cm = confusion_matrix(labels, [int(s > threshold) for s in scores])
    precision, recall, f1 = precision_recall_f1(cm)
    return {"accuracy": accuracy(cm), "precision": precision, "recall": recall, "f1": f1,
            "confusion": cm, "n": len(labels), "threshold": threshold}


def tune_threshold(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The threshold with the highest F1 of class 1 on (scores, labels).

    Candidates lie halfway between consecutive distinct scores (and 0.5 itself), so the
    choice does not hinge on a score's last digit; ties go to the candidate nearest 0.5.
    """
    distinct = sorted(set(scores))
    midpoints = [(a + b) / 2 for a, b in zip(distinct, distinct[1:], strict=False)]
    candidates = [0.5] + midpoints
    return max(candidates, key=lambda t: (precision_recall_f1(confusion_matrix(
        labels, [int(s > t) for s in scores]))[2], -abs(t - 0.5)))


def evaluate_classifier(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor, Tensor]],
                        threshold: float = 0.5) -> dict:
    """``metrics_at`` of the model's class-1 scores on ``batches``, in eval mode."""
    return metrics_at(*spam_scores(model, batches), threshold)


def always_ham(labels: Sequence[int]) -> dict:
    """The metrics of the baseline that calls every message ham (class 0)."""
    return metrics_at([0.0] * len(labels), labels, threshold=0.5)


@dataclass
class ClassificationConfig:
    """One classification fine-tuning run (``run_classification``)."""

    method: str = "lora"
    epochs: int = 2
    batch_size: int = 16
    lr: float | None = None  # None: DEFAULT_LR[method]
    max_len: int = 64  # tokens per message (longer ones are truncated)
    train_limit: int | None = None  # use only this many (balanced) training examples
    test_limit: int | None = None  # evaluate on this many test examples (None: all)
    val_limit: int | None = None  # ... and validation examples (0: skip validation)
    seed: int = 0
    methods: MethodConfig = field(default_factory=MethodConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if min(self.epochs, self.batch_size, self.max_len) < 1:
            raise ValueError("epochs, batch_size and max_len must be >= 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.max_len}")


def run_classification(
    base: GPT, encode: Callable[[str], list[int]], pad_id: int,
    cfg: ClassificationConfig, data: Sequence[Example] | None = None, progress: bool = False,
) -> dict:
    """Fine-tune a copy of ``base`` on SMS spam with ``cfg.method``; evaluate on the test split.

    The decision threshold on the spam probability is tuned for F1 on the validation split
    (0.5 if there is none) and then applied to the test split. ``cfg.max_len`` is clamped to
    the model's context (minus a soft prompt). Returns a result row: method, trainable /
    total parameters, training seconds, the threshold, validation and test metrics at it,
    test metrics at 0.5 (``test_argmax``) and the per-step training losses.
    """
    data = deduplicate(load_sms_spam() if data is None else data)
    train, val, test = stratified_split(data, seed=0)
    train = undersample(train, seed=cfg.seed)[: cfg.train_limit]
    val, test = val[: cfg.val_limit], test[: cfg.test_limit]
    encoded = {name: [(encode(t), y) for t, y in split]
               for name, split in (("train", train), ("val", val), ("test", test))}
    model = make_classifier(copy.deepcopy(base), cfg.method, cfg.methods, seed=cfg.seed)
    fit_cfg = FitConfig(lr=cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.method])
    prompt = cfg.methods.n_prompt if cfg.method == "prompt" else 0
    max_len = min(cfg.max_len, base.config.block_size - prompt)  # the soft prompt needs room
    batches = [b for epoch in range(cfg.epochs) for b in classification_batches(
        encoded["train"], cfg.batch_size, pad_id, max_len, seed=cfg.seed + epoch)]
    start = time.perf_counter()
    losses = fit(model, batches, classification_loss, fit_cfg, progress=progress)
    seconds = time.perf_counter() - start
    scored = {s: spam_scores(model, classification_batches(encoded[s], 64, pad_id, max_len))
              for s in ("val", "test")}
    threshold = tune_threshold(*scored["val"]) if val else 0.5
    return {
        "method": cfg.method, "trainable_params": peft.count_parameters(model),
        "total_params": peft.count_parameters(model, trainable_only=False),
        "train_examples": len(train), "train_seconds": seconds, "lr": fit_cfg.lr,
        "val": metrics_at(*scored["val"], threshold) if val else None, "threshold": threshold,
        "test": metrics_at(*scored["test"], threshold),
        "test_argmax": metrics_at(*scored["test"], 0.5),
        "losses": losses, "config": asdict(cfg), "max_len": max_len, "fit": asdict(fit_cfg),
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0.0 for one value)."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    n, mean = len(values), sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, variance**0.5


def summarize_runs(rows: Sequence[dict], split: str = "test",
                   keys: Sequence[str] = ("accuracy", "precision", "recall", "f1")) -> dict:
    """``{method: {key: (mean, sd), "runs": n}}`` over the result rows of each method (several
    seeds), for the metrics of ``split`` and the threshold, in order of first appearance."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out[method] = {k: mean_sd([r[split][k] for r in mine]) for k in keys}
        out[method]["threshold"] = mean_sd([r["threshold"] for r in mine])
        out[method]["runs"] = len(mine)
    return out


# ----------------------------------------------------------------------------------- bases
def load_base(spec: str | Path) -> tuple[GPT, object, int]:
    """``(model, tokenizer, eos_id)`` for a model directory or a GPT-2 name.

    A directory written by ``minigpt.checkpoint.export_model`` brings its own tokenizer;
    anything else goes to ``minigpt.pretrained.from_pretrained``, with the tokenizer of the
    directory's ``vocab.json`` and ``merges.txt`` (``minigpt.pretrained.load_tokenizer``)
    when it has them and GPT-2's otherwise. ``eos_id`` is the tokenizer's ``<|endoftext|>``
    (the end/pad token; 0 if it has none).
    """
    config = Path(spec) / "config.json"
    try:
        info = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except ValueError as e:  # not UTF-8 or not JSON
        raise PretrainedError(f"{config} is not a JSON model config ({e}); pass a directory "
                              "written by export_model, save_hf or save_pretrained") from None
    if isinstance(info, dict) and "tokenizer" in info:
        model, tokenizer = load_model(spec)
    else:
        model = from_pretrained(spec)
        own = any((Path(spec) / name).is_file() for name in ("vocab.json", "merges.txt"))
        tokenizer = load_tokenizer(spec) if own else gpt2_tokenizer()
    return model, tokenizer, getattr(tokenizer, "special_tokens", {}).get("<|endoftext|>", 0)


if __name__ == "__main__":  # the command line of this module is ``minigpt finetune``
    print("error: run `python -m minigpt finetune ...` (or `minigpt finetune ...`); "
          "see `python -m minigpt finetune --help`", file=sys.stderr)
    raise SystemExit(2)
