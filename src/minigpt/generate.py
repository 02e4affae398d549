"""Decoding: turning a language model's next-token distributions into text (chapter 6).

At every step a GPT gives logits over the vocabulary for the next token; decoding picks
one, appends it and runs the model again. Design choices:

- One options object, ``DecodeOptions``: each default and each rule is written once, in
  its field, and checked when the options are built. ``generate``, ``beam_search`` and
  ``stream`` take it, or keyword overrides of it (``generate(m, ids, 50, top_p=0.9)``).
- Sampling is a list of logits processors, ``PROCESSORS``: small functions
  ``f(logits, opts, seen) -> logits`` applied in order, each a no-op when its option is
  off. A new strategy is one function, one field and one entry (min-p was added so).
- ``temperature=0`` is greedy (the arg-max of the processed logits). Beam search is
  deterministic, so the sampling options are refused with ``num_beams > 1``.
- ``SlidingWindow`` is the model's view of the rows: at most ``block_size`` tokens,
  through a ``KVCache`` that owns its tensors. Past the context the window jumps forward
  and the cache is refilled, as the uncached crop loop sees it. Memory is bounded by the
  context whatever ``max_new_tokens`` is: only the returned tokens grow with it, and the
  repetition penalty keeps a (rows, vocab) mask of seen tokens, not the history.
- Bad input raises a ``DecodingError`` (a ``ValueError``) at the entry points, saying
  what to do; NaN or infinite logits raise ``NonFiniteLogitsError`` instead of decoding
  garbage. ``eval_mode`` puts the model in eval mode for one call and restores it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from minigpt.engine import TRANSPOSE_MIN_STEPS, Engine, supports
from minigpt.model import GPT, KVCache

__all__ = [
    "PROCESSORS", "DecodeOptions", "DecodingError", "NonFiniteLogitsError",
    "SlidingWindow", "apply_repetition_penalty", "apply_temperature", "beam_search",
    "decode_steps", "eval_mode", "generate", "length_penalty_gnmt", "min_p_filter",
    "process_logits", "stream", "top_k_filter", "top_p_filter",
]


class DecodingError(ValueError):
    """Bad decoding input (options, prompt ids): the message says what to change."""


class NonFiniteLogitsError(DecodingError):
    """The model produced NaN or infinite logits (its weights are broken)."""


# --- options: each default and each rule once ---------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_stop_list(x: object) -> bool:
    if not isinstance(x, Sequence):
        return False
    seqs = [s.tolist() if hasattr(s, "tolist") else s for s in x]  # numpy / torch rows
    return all(isinstance(s, Sequence) and s and all(map(_is_int, s)) for s in seqs)


def _option(default, must_be: str, ok: Callable[[object], bool], sampling=False):
    """A dataclass field: its default, its rule ``ok`` and the rule in words."""
    return field(default=default,
                 metadata={"must_be": must_be, "ok": ok, "sampling": sampling})


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. Each field holds its default and its rule, checked when built.

    ``stop_ids``: token sequences that end a row (kept in its output). ``window_shift``:
    how the window slides past the context (see ``SlidingWindow``). ``engine``: with the
    cache, one-token steps run on ``minigpt.engine`` (same logits, less overhead).
    """

    temperature: float = _option(1.0, "a finite number >= 0 (0 = greedy)",
                                 lambda t: _is_real(t) and t >= 0, sampling=True)
    top_k: int | None = _option(None, "an integer >= 1 (None: no top-k)",
                                lambda k: _is_int(k) and k >= 1, sampling=True)
    top_p: float | None = _option(None, "a number in (0, 1] (None: no top-p)",
                                  lambda p: _is_real(p) and 0 < p <= 1, sampling=True)
    min_p: float | None = _option(None, "a number in (0, 1] (None: no min-p)",
                                  lambda p: _is_real(p) and 0 < p <= 1, sampling=True)
    repetition_penalty: float = _option(1.0, "a number in [0.01, 100] (1: none)",
                                        lambda r: _is_real(r) and 0.01 <= r <= 100,
                                        sampling=True)
    seed: int | None = _option(None, "an integer (None: torch's global generator)",
                               _is_int, sampling=True)
    num_beams: int = _option(1, "an integer >= 1 (1: no beam search)",
                             lambda n: _is_int(n) and n >= 1)
    length_penalty: float = _option(1.0, "a finite number (GNMT's alpha)", _is_real)
    eos_id: int | None = _option(None, "a token id (an integer >= 0) or None",
                                 lambda i: _is_int(i) and i >= 0)
    stop_ids: Sequence[Sequence[int]] = _option(
        (), "a list of token sequences, e.g. [[13], [198, 198]]", _is_stop_list)
    use_cache: bool = _option(True, "True or False", lambda b: isinstance(b, bool))
    engine: bool = _option(True, "True or False", lambda b: isinstance(b, bool))
    window_shift: int = _option(1, "an integer >= 1", lambda s: _is_int(s) and s >= 1)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (value is None and f.default is None or f.metadata["ok"](value)):
                raise DecodingError(
                    f"{f.name} must be {f.metadata['must_be']}, got {value!r}")
        stops = tuple(tuple(int(i) for i in s) for s in self.stop_ids)
        object.__setattr__(self, "stop_ids", stops)
        if self.num_beams > 1 and self.sampling_options():
            raise DecodingError(
                f"beam search (num_beams={self.num_beams}) is a deterministic search "
                f"for the most likely sequence; {', '.join(self.sampling_options())} "
                "do not apply to it. Use num_beams=1 to sample, or drop these options")

    def sampling_options(self) -> list[str]:
        """Names of the sampling options that differ from their defaults."""
        return [f.name for f in fields(self)
                if f.metadata["sampling"] and getattr(self, f.name) != f.default]

    def ends(self, seq: list[int]) -> bool:
        """Whether ``seq`` ends with ``eos_id`` or with one of the stop sequences."""
        if self.eos_id is not None and seq[-1:] == [self.eos_id]:
            return True
        return any(len(seq) >= len(s) and tuple(seq[-len(s):]) == s
                   for s in self.stop_ids)


# --- logits processors: f(logits (B, V), opts, seen (B, V) bool or None) -> logits ---


def apply_repetition_penalty(logits: Tensor, opts: DecodeOptions,
                             seen: Tensor | None = None) -> Tensor:
    """Make the tokens each row has already seen less likely (CTRL, Keskar et al. 2019).

    CTRL divides a seen token's logit by the penalty (1.2 in the paper). Divided, a
    negative logit would *grow*, so negative logits are multiplied instead (as Hugging
    Face does). ``seen`` (B, V) marks the tokens of the prompt and the output so far.
    """
    theta = opts.repetition_penalty
    if theta == 1.0 or seen is None:
        return logits
    penalised = torch.where(logits > 0, logits / theta, logits * theta)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, opts: DecodeOptions,
                      seen: Tensor | None = None) -> Tensor:
    """Divide by the temperature: below 1 sharpens the distribution, above 1 flattens.

    The row's maximum is subtracted first (the softmax is the same), so even a tiny
    temperature cannot overflow. Temperature 0 (greedy) is left to the arg-max.
    """
    t = opts.temperature
    if t in (0.0, 1.0):
        return logits
    return (logits - logits.amax(dim=-1, keepdim=True)) / t


def top_k_filter(logits: Tensor, opts: DecodeOptions,
                 seen: Tensor | None = None) -> Tensor:
    """Keep the ``top_k`` largest logits of each row, set the others to -inf.

    Top-k sampling (Fan et al. 2018). Tokens tied with the k-th largest are all kept, so
    the order of ties does not matter; ``top_k >= vocab_size`` keeps everything.
    """
    k = opts.top_k
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, opts: DecodeOptions,
                 seen: Tensor | None = None) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    Nucleus sampling (Holtzman et al. 2020). A token is kept when the tokens strictly
    more likely than it hold less than p: the most likely token always survives, ties
    are kept or dropped together, and p = 1 keeps everything.
    """
    p = opts.top_p
    if p is None or p == 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1)[..., :-1]  # exclusive prefix sums
    mass_before = torch.cat([torch.zeros_like(probs[..., :1]), mass_before], dim=-1)
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True)  # >= 1: the first is 0 < p
    threshold = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def min_p_filter(logits: Tensor, opts: DecodeOptions,
                 seen: Tensor | None = None) -> Tensor:
    """Keep the tokens at least ``min_p`` times as likely as the most likely one.

    Min-p sampling (Nguyen et al. 2024). In log space p_i >= m p_max reads
    z_i >= z_max + log m, so no softmax is needed. The cut adapts to how sure the model
    is, and looks only at the top token, not at the length of the tail.
    """
    if opts.min_p is None:
        return logits
    threshold = logits.amax(dim=-1, keepdim=True) + math.log(opts.min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


Processor = Callable[[Tensor, DecodeOptions, Tensor | None], Tensor]
PROCESSORS: tuple[Processor, ...] = (
    apply_repetition_penalty, apply_temperature, top_k_filter, top_p_filter,
    min_p_filter,
)


def process_logits(logits: Tensor, opts: DecodeOptions, seen: Tensor | None = None
                   ) -> Tensor:
    """The logits the next token is chosen from: every one of ``PROCESSORS``, in order.

    The arg-max of the result is the greedy choice; its softmax is the distribution a
    sampled token is drawn from.
    """
    logits = logits.float()
    for processor in PROCESSORS:
        logits = processor(logits, opts, seen)
    return logits


def length_penalty_gnmt(length: int, alpha: float) -> float:
    """GNMT's length normaliser lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016).

    Beam search ranks hypotheses by log P(Y) / lp(Y); alpha = 0 compares raw
    log-probabilities (favouring short outputs), larger alpha favours longer ones.
    """
    return ((5.0 + length) / 6.0) ** alpha


# --- the model's view of the rows: a sliding window through a KV cache ----------------


@contextmanager
def eval_mode(model: GPT) -> Iterator[GPT]:
    """Put ``model`` in eval mode (no dropout) for a ``with`` block, then restore it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class SlidingWindow:
    """The tokens each row shows the model, at most ``block_size``, through a KV cache.

    When the rows would outgrow the context, the window jumps to their last
    ``block_size - window_shift + 1`` tokens, positions restart at 0 and the cache is
    refilled with the window. ``window_shift=1`` is the usual "crop to the last
    block_size tokens" at every step; larger shifts refill only every ``window_shift``
    steps. ``seen`` (B, V) marks every token a row has held.
    """

    def __init__(self, model: GPT, prompts: Tensor, opts: DecodeOptions, max_new: int
                 ) -> None:
        B, P = prompts.shape
        cfg, w = model.config, next(model.parameters())
        self.model, self.block, self.shift = model, cfg.block_size, opts.window_shift
        self.tokens, self.fed = prompts, 0  # fed: tokens of the window already cached
        self.seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=w.device)
        self.seen.scatter_(1, prompts, True)
        self.cache, self.engine = None, None
        if opts.use_cache:  # never longer than the context, whatever max_new is
            max_len = min(self.block, P + max_new)
            self.cache = KVCache(cfg, B, max_len, device=w.device, dtype=w.dtype)
            if opts.engine and supports(model) and not model.training:
                self.engine = Engine(model, transposed=max_new >= TRANSPOSE_MIN_STEPS)

    @torch.no_grad()
    def next_logits(self) -> Tensor:
        """Logits (B, V) for the token after each row."""
        if self.tokens.size(1) > self.block:  # slide: keep the last block - shift + 1
            self.tokens = self.tokens[:, self.shift - self.block - 1 :]
            self.fed = 0
            if self.cache is not None:
                self.cache.reset()
        new = self.tokens[:, self.fed :]
        if self.cache is None:
            logits = self.model(self.tokens, last_only=True)[0][:, -1]
        elif self.engine is not None and new.size(1) == 1:  # one token: the lean step
            logits = self.engine.step(new[:, 0], self.cache)
        else:
            logits = self.model(new, kv_cache=self.cache, last_only=True)[0][:, -1]
        self.fed = self.tokens.size(1)
        if not torch.isfinite(logits).all():
            raise NonFiniteLogitsError(
                "the model's logits are NaN or infinite, so no token can be chosen; "
                "its weights are probably corrupt (check them with torch.isfinite)")
        return logits

    def append(self, ids: Tensor) -> None:
        """Add one token (B,) to every row."""
        self.tokens = torch.cat([self.tokens, ids[:, None]], dim=1)
        self.seen.scatter_(1, ids[:, None], True)

    def reorder(self, rows: Tensor) -> None:
        """Row i continues row ``rows[i]`` (beam search): tokens, seen mask, cache."""
        self.tokens, self.seen = self.tokens[rows], self.seen[rows]
        if self.cache is not None:
            self.cache.reorder(rows)


# --- decoding loops -------------------------------------------------------------------


def decode_steps(model: GPT, prompts: Tensor, max_new_tokens: int, opts: DecodeOptions,
                 generator: torch.Generator | None = None
                 ) -> Iterator[list[int | None]]:
    """Decode equal-length prompts (B, T) together; yield each step's new tokens.

    Each step processes the next-token logits (``process_logits``), then takes their
    arg-max (greedy) or draws from their softmax. A row ends after EOS or a stop
    sequence (None from then on); the loop ends when every row has. ``generate`` and
    ``stream`` check the inputs.
    """
    window = SlidingWindow(model, prompts, opts, max_new_tokens)
    tail = max(map(len, opts.stop_ids), default=1)  # enough to see EOS or a stop
    recent: list[list[int]] = [[] for _ in range(prompts.size(0))]
    live = [True] * len(recent)
    for _ in range(max_new_tokens):
        logits = process_logits(window.next_logits(), opts, window.seen)
        if opts.temperature == 0.0:
            next_ids = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        window.append(next_ids)
        ids = next_ids.tolist()
        step = [t if on else None for t, on in zip(ids, live, strict=True)]
        for b, t in enumerate(step):
            if t is not None:
                recent[b] = (recent[b] + [t])[-tail:]
                live[b] = not opts.ends(recent[b])
        yield step
        if not any(live):
            return


def beam_search(model: GPT, prompt_ids: Sequence[int], max_new_tokens: int,
                options: DecodeOptions | None = None, **overrides
                ) -> tuple[list[int], float]:
    """The best continuation of one prompt found by beam search, and its log P.

    Each step extends every live beam by every token and keeps the ``2 * num_beams``
    best candidates by total log P: those that end (EOS or a stop sequence) among the
    top ``num_beams`` are finished hypotheses, the others refill the beams. The search
    stops once ``num_beams`` hypotheses have finished (Hugging Face's
    ``early_stopping=True``) or after ``max_new_tokens`` steps. The winner maximises
    log P / ``length_penalty_gnmt(length, length_penalty)``.
    """
    opts, (prompt,) = _checked(model, prompt_ids, max_new_tokens, options, overrides)
    k, V, device = opts.num_beams, model.config.vocab_size, model.lm_head.weight.device
    finished: list[tuple[float, float, list[int]]] = []  # (rank by, log P, tokens)

    def finish(log_p: float, seq: list[int]) -> None:
        lp = length_penalty_gnmt(len(seq), opts.length_penalty)
        finished.append((log_p / lp, log_p, seq))

    with eval_mode(model):
        window = SlidingWindow(model, torch.tensor([prompt] * k, device=device), opts,
                               max_new_tokens)
        scores = torch.full((k,), float("-inf"), device=device)
        scores[0] = 0.0  # the k rows hold the same prompt: extend one at the first step
        beams: list[list[int]] = [[] for _ in range(k)]
        for _ in range(max_new_tokens):
            log_p = torch.log_softmax(window.next_logits().float(), dim=-1)
            total = (scores[:, None] + log_p).flatten()
            top, idx = torch.topk(total, min(2 * k, k * V))
            rows, new_scores, new_beams = [], [], []
            for rank, (s, i) in enumerate(zip(top.tolist(), idx.tolist(), strict=True)):
                seq = beams[i // V] + [i % V]
                if opts.ends(seq):
                    if rank < k and s > float("-inf"):
                        finish(s, seq)
                elif len(rows) < k:
                    rows.append(i // V)
                    new_scores.append(s)
                    new_beams.append(seq)
            if len(finished) >= k or not rows:
                break
            while len(rows) < k:  # too few live candidates: pad with dead beams
                rows.append(rows[0])
                new_scores.append(float("-inf"))
                new_beams.append(new_beams[0])
            window.reorder(torch.tensor(rows, device=device))
            window.append(torch.tensor([seq[-1] for seq in new_beams], device=device))
            scores, beams = torch.tensor(new_scores, device=device), new_beams
        else:  # max_new_tokens steps: the live beams are hypotheses too
            for s, seq in zip(scores.tolist(), beams, strict=True):
                if s > float("-inf"):
                    finish(s, seq)
    best = max(finished, key=lambda f: f[0], default=(0.0, 0.0, []))
    return best[2], best[1]


# --- entry points: every argument is checked here ------------------------------------


def _token_ids(ids: object, vocab_size: int, what: str) -> list[int]:
    """A list of ints in [0, vocab_size) from a list, array or tensor."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    ids = [i.tolist() if hasattr(i, "tolist") else i for i in ids]  # numpy/torch ints
    if not ids:
        raise DecodingError(f"empty {what}: give at least one token id (e.g. newline)")
    if not all(map(_is_int, ids)):
        raise DecodingError(f"{what} must hold integer token ids, got {ids[:5]!r}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise DecodingError(
            f"{what} has token ids outside the model's vocabulary [0, {vocab_size - 1}]"
            f": {bad[:5]}; encode it with the tokenizer the model was trained with")
    return [int(i) for i in ids]


def _checked(model: GPT, prompt_ids: object, max_new_tokens: int,
             options: DecodeOptions | None, overrides: dict, one: bool = True
             ) -> tuple[DecodeOptions, list[list[int]]]:
    """Options (``options`` with keyword overrides), the length and every token id."""
    if options is not None and not isinstance(options, DecodeOptions):
        raise DecodingError(
            f"options must be a DecodeOptions, got {type(options).__name__}; "
            "pass single options as keywords, e.g. temperature=0.8")
    opts = replace(options or DecodeOptions(), **overrides)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise DecodingError(
            f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    V, block = model.config.vocab_size, model.config.block_size
    if opts.window_shift > block:
        raise DecodingError(f"window_shift must be at most block_size={block}, "
                            f"got {opts.window_shift}")
    if opts.eos_id is not None:
        _token_ids([opts.eos_id], V, "eos_id")
    for stop in opts.stop_ids:
        _token_ids(stop, V, "stop sequence")
    if getattr(prompt_ids, "ndim", 1) not in (1, 2):
        raise DecodingError(
            f"prompt arrays are (T,) or (B, T), got {tuple(prompt_ids.shape)}")
    rows = list(prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)
    if rows and (isinstance(rows[0], Sequence) or getattr(rows[0], "ndim", 0) == 1):
        prompts = [_token_ids(p, V, f"prompt {b}") for b, p in enumerate(rows)]
    else:
        prompts = [_token_ids(rows, V, "prompt")]
    if one and len(prompts) != 1:
        raise DecodingError(f"this decodes one prompt, got {len(prompts)}; "
                            "use generate for a batch")
    return opts, prompts


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device).manual_seed(seed)


def generate(model: GPT, prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Tensor,
             max_new_tokens: int, options: DecodeOptions | None = None, **overrides
             ) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return the new tokens.

    ``prompt_ids`` is one prompt (a list of ids) or several (a list of lists, or a
    (B, T) tensor); the result holds one list per prompt. ``options`` (a
    ``DecodeOptions``) and keyword overrides of its fields say how: sampling through
    ``PROCESSORS`` (``temperature=0``: greedy), or ``beam_search`` (``num_beams > 1``).
    Prompts of different lengths are decoded in groups of equal length (the model has
    no padding mask), which gives exactly the tokens each prompt gets alone.
    """
    opts, prompts = _checked(model, prompt_ids, max_new_tokens, options, overrides,
                             one=False)
    if opts.num_beams > 1:
        return [beam_search(model, p, max_new_tokens, opts)[0] for p in prompts]
    device = next(model.parameters()).device
    generator = _generator(opts.seed, device)  # one stream of draws for all groups
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(b)
    with eval_mode(model):
        for rows in groups.values():
            batch = torch.tensor([prompts[b] for b in rows], device=device)
            for step in decode_steps(model, batch, max_new_tokens, opts, generator):
                for b, t in zip(rows, step, strict=True):
                    if t is not None:
                        out[b].append(t)
    return out


def stream(model: GPT, prompt_ids: Sequence[int], max_new_tokens: int,
           options: DecodeOptions | None = None, **overrides) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (as ``generate``).

    With ``num_beams > 1`` the best beam is only known at the end, so its tokens come at
    once. Like any generator, it checks its arguments when the first token is asked for.
    """
    opts, prompts = _checked(model, prompt_ids, max_new_tokens, options, overrides)
    if opts.num_beams > 1:
        yield from beam_search(model, prompts[0], max_new_tokens, opts)[0]
        return
    device = next(model.parameters()).device
    with eval_mode(model):
        batch = torch.tensor(prompts, device=device)
        generator = _generator(opts.seed, device)
        for step in decode_steps(model, batch, max_new_tokens, opts, generator):
            yield step[0]
