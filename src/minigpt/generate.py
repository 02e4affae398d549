"""Decoding: turning a language model's next-token distributions into text (chapter 6).

At every step a GPT gives logits over the whole vocabulary for the next token; decoding picks
one and feeds it back. Greedy decoding (temperature 0) takes the arg-max; sampling draws from
the softmax at a temperature, optionally restricted to the k most likely tokens (top-k, Fan et
al. 2018) or to the smallest set holding probability p (top-p / nucleus, Holtzman et al. 2020),
after a CTRL repetition penalty (Keskar et al. 2019). Beam search keeps the ``num_beams`` most
likely partial sequences and ranks finished ones with the GNMT length penalty (Wu et al. 2016).

Incremental decoding feeds only the new token and reuses the keys and values of the past ones
(``model.KVCache``). The model sees at most ``block_size`` tokens; once the sequence outgrows
that, the window jumps forward, positions restart at 0 and the cache is refilled with the
window, so cached and uncached decoding see exactly the same tokens (``window_shift``).

Entry points: ``generate`` (prompts in, new tokens per prompt out) and ``stream`` (one prompt,
tokens yielded as they are produced).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from minigpt.model import GPT, KVCache

__all__ = [
    "apply_repetition_penalty",
    "beam_search",
    "filter_logits",
    "generate",
    "length_penalty_gnmt",
    "stream",
    "top_k_filter",
    "top_p_filter",
]


# --- logit processors: pure functions on (..., vocab_size) logits -------------------------------


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits of each row and set the others to -inf (Fan et al. 2018).

    Tokens tied with the k-th largest logit are all kept, so the result does not depend on how
    ties happen to be ordered; ``k >= vocab_size`` keeps everything.
    """
    if not _is_int(k) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {k!r}")
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least ``p``.

    This is nucleus sampling (Holtzman et al. 2020). A token is kept when the tokens strictly more
    likely than it hold less than ``p`` of the probability: the most likely token always
    survives, tied tokens are kept or dropped together, and ``p = 1`` keeps everything.
    """
    if not (_is_number(p) and 0.0 < p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no top-p), got {p!r}")
    if p == 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1)[..., :-1]  # exclusive prefix sums, exact zero first
    mass_before = torch.cat([torch.zeros_like(probs[..., :1]), mass_before], dim=-1)
    n_keep = (mass_before < p).sum(dim=-1, keepdim=True)  # >= 1: the first entry is 0 < p
    threshold = sorted_logits.gather(-1, n_keep - 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """Make tokens that occur in ``context`` less likely (CTRL, Keskar et al. 2019).

    ``logits`` (B, V), ``context`` (B, T) token ids. CTRL divides the logit of every seen token
    by ``penalty`` (1.2 in the paper); a negative logit divided by it would *grow*, so negative
    logits are multiplied instead (as Hugging Face does). ``penalty = 1`` changes nothing; a
    penalty below 1 favours repetition.
    """
    if not (_is_number(penalty) and math.isfinite(penalty) and penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {penalty!r}")
    if penalty == 1.0 or context.size(-1) == 0:
        return logits
    seen = logits.gather(-1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, context, seen)


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Logits of the sampling distribution: divide by ``temperature`` (> 0), then top-k, top-p.

    ``softmax(filter_logits(...))`` is the distribution ``generate`` samples the next token from.
    """
    if not temperature > 0:
        raise ValueError(f"filter_logits needs temperature > 0 (0 is greedy), got {temperature}")
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def length_penalty_gnmt(length: int, alpha: float) -> float:
    """GNMT's length normaliser lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14).

    Beam search ranks hypotheses by log P(Y) / lp(Y); alpha = 0 compares raw log-probabilities
    (favouring short outputs), larger alpha favours longer ones.
    """
    return ((5.0 + length) / 6.0) ** alpha


# --- options and input checks -------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class _Options:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    eos_id: int | None = None
    stop_ids: tuple[tuple[int, ...], ...] = ()
    seed: int | None = None
    use_cache: bool = True
    window_shift: int = 1


def _options(model: GPT, max_new_tokens: int, **kw) -> _Options:
    """Check every decoding option and return them; bad values raise a ValueError that says why."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    t = kw["temperature"]
    if not _is_number(t) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if kw["top_k"] is not None:
        top_k_filter(torch.zeros(1), kw["top_k"])  # validates
    if kw["top_p"] is not None:
        top_p_filter(torch.zeros(1), kw["top_p"])
    apply_repetition_penalty(torch.zeros(1, 1), torch.zeros(1, 0, dtype=torch.long),
                             kw["repetition_penalty"])
    nb = kw["num_beams"]
    if not _is_int(nb) or nb < 1:
        raise ValueError(f"num_beams must be an integer >= 1 (1 = no beam search), got {nb!r}")
    lp = kw["length_penalty"]
    if not _is_number(lp) or not math.isfinite(lp):
        raise ValueError(f"length_penalty must be a finite number, got {lp!r}")
    if nb > 1:
        sampling = {
            "temperature": t != 1.0, "top_k": kw["top_k"] is not None,
            "top_p": kw["top_p"] is not None, "seed": kw["seed"] is not None,
            "repetition_penalty": kw["repetition_penalty"] != 1.0,
        }
        bad = [name for name, used in sampling.items() if used]
        if bad:
            raise ValueError(
                f"beam search (num_beams={nb}) is a deterministic search for the most likely "
                f"sequence; {', '.join(bad)} do not apply to it. Use num_beams=1 to sample, or "
                "drop these options"
            )
    V = model.config.vocab_size
    eos = kw["eos_id"]
    if eos is not None and not (_is_int(eos) and 0 <= eos < V):
        raise ValueError(f"eos_id must be a token id in [0, {V - 1}] or None, got {eos!r}")
    stops = kw["stop_ids"] or ()
    if stops and _is_int(stops[0]):
        raise ValueError(
            "stop_ids is a list of token sequences, e.g. [[13], [198, 198]]; "
            "for a single stop token pass [[id]] (or use eos_id)"
        )
    stops = tuple(tuple(_check_ids(s, V, "stop sequence")) for s in stops)
    shift = kw["window_shift"]
    bs = model.config.block_size
    if not _is_int(shift) or not 1 <= shift <= bs:
        raise ValueError(f"window_shift must be an integer in [1, block_size={bs}], got {shift!r}")
    return _Options(**{**kw, "stop_ids": stops, "temperature": float(t),
                       "eos_id": None if eos is None else int(eos)})


def _check_ids(ids: Sequence[int], vocab_size: int, what: str) -> list[int]:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    ids = [i.tolist() if hasattr(i, "tolist") else i for i in ids]  # numpy / torch scalars
    if not ids:
        raise ValueError(f"empty {what}: give at least one token id (e.g. a newline or BOS token)")
    for i in ids:
        if not _is_int(i):
            raise ValueError(f"{what} must hold integer token ids, got {i!r}")
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(
            f"{what} has token ids outside the model's vocabulary [0, {vocab_size - 1}]: "
            f"{bad[:5]}; encode it with the tokenizer the model was trained with"
        )
    return ids


def _prompts(prompt_ids, vocab_size: int) -> list[list[int]]:
    """One prompt (ids) or several (list of lists, (B, T) tensor or array) -> a list of prompts."""
    if hasattr(prompt_ids, "tolist"):  # torch tensor or numpy array
        if prompt_ids.ndim not in (1, 2):
            raise ValueError(f"prompt arrays are (T,) or (B, T), got {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("empty prompt: give at least one token id (e.g. a newline or BOS token)")
    if not isinstance(prompt_ids[0], Sequence) and not hasattr(prompt_ids[0], "tolist"):
        prompt_ids = [prompt_ids]
    elif hasattr(prompt_ids[0], "ndim") and prompt_ids[0].ndim == 0:  # a list of scalar tensors
        prompt_ids = [prompt_ids]
    return [_check_ids(p, vocab_size, f"prompt {b}") for b, p in enumerate(prompt_ids)]


# --- the model's view of the sequence: token buffer, sliding window and KV cache ----------------


class _Context:
    """Every token so far, and the window of them the model sees (through a KV cache or not).

    The model sees at most ``block_size`` tokens. When the sequence would outgrow that, the
    window jumps so it holds the last ``block_size - window_shift + 1`` tokens, with positions
    restarting at 0; the cache is reset and refilled with the window. ``window_shift=1`` is the
    usual "crop to the last block_size tokens" at every step (exact, but each step past the
    context re-runs the whole window); larger shifts refill only every ``window_shift`` steps.
    """

    def __init__(self, model: GPT, prompts: Tensor, max_new: int, opts: _Options) -> None:
        B, P = prompts.shape
        self.model, self.block, self.shift = model, model.config.block_size, opts.window_shift
        self.tokens = torch.empty(B, P + max_new, dtype=torch.long, device=prompts.device)
        self.tokens[:, :P] = prompts
        self.length, self.start, self.fed = P, 0, 0
        self.cache = None
        if opts.use_cache:
            p = next(model.parameters())
            max_len = min(self.block, P + max_new)
            self.cache = KVCache(model.config, B, max_len, device=p.device, dtype=p.dtype)

    def next_logits(self) -> Tensor:
        """Logits (B, V) for the token after the current sequence."""
        end = self.length
        if end - self.start > self.block:
            self.start = end - self.block + self.shift - 1
            if self.cache is not None:
                self.cache.reset()
                self.fed = self.start
        if self.cache is None:
            logits, _ = self.model(self.tokens[:, self.start : end], last_only=True)
        else:
            logits, _ = self.model(self.tokens[:, self.fed : end], kv_cache=self.cache,
                                   last_only=True)
            self.fed = end
        return logits[:, -1]

    def append(self, next_ids: Tensor) -> None:
        self.tokens[:, self.length] = next_ids
        self.length += 1

    def reorder(self, rows: Tensor) -> None:
        """Keep sequence ``rows[i]`` in row i (beam search), cache included."""
        self.tokens = self.tokens[rows]
        if self.cache is not None:
            n = self.cache.length
            self.cache.k[:, :, :, :n] = self.cache.k[:, rows, :, :n]
            self.cache.v[:, :, :, :n] = self.cache.v[:, rows, :, :n]


def _ends_with_stop(seq: list[int], opts: _Options) -> bool:
    if opts.eos_id is not None and seq and seq[-1] == opts.eos_id:
        return True
    return any(len(seq) >= len(s) and tuple(seq[-len(s):]) == s for s in opts.stop_ids)


# --- sampling (and greedy) ----------------------------------------------------------------------


def _next_tokens(logits: Tensor, ctx: _Context, opts: _Options, gen: torch.Generator | None):
    """Choose the next token of every row: penalty, then greedy or temperature/top-k/top-p."""
    if opts.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, ctx.tokens[:, : ctx.length],
                                          opts.repetition_penalty)
    if opts.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float(), opts.temperature, opts.top_k, opts.top_p),
                          dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _sample(
    model: GPT, prompts: list[list[int]], max_new: int, opts: _Options, gen
) -> Iterator[list[int | None]]:
    """Decode equal-length prompts together; yield each step's tokens (None for finished rows)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        ctx = _Context(model, torch.tensor(prompts, device=device), max_new, opts)
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        with torch.inference_mode():
            nxt = _next_tokens(ctx.next_logits(), ctx, opts, gen)
            ctx.append(nxt)
        step: list[int | None] = []
        for b, tok in enumerate(nxt.tolist()):
            if done[b]:
                step.append(None)
                continue
            outs[b].append(tok)
            step.append(tok)
            done[b] = _ends_with_stop(outs[b], opts)
        yield step
        if all(done):
            return


# --- beam search --------------------------------------------------------------------------------


def beam_search(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] | None = None,
    use_cache: bool = True,
    window_shift: int = 1,
) -> tuple[list[int], float]:
    """The best continuation of one prompt found by beam search, and its log-probability.

    Each step extends every live beam by every token, and keeps the ``2 * num_beams`` best
    candidates by total log-probability: candidates that end (EOS or a stop sequence) among the
    top ``num_beams`` become finished hypotheses, the others fill the ``num_beams`` live beams.
    The search stops early once ``num_beams`` hypotheses have finished (Hugging Face's
    ``early_stopping=True``) or after ``max_new_tokens`` steps, when the live beams join the
    finished ones. The winner maximises log P / lp(length), with ``length_penalty_gnmt`` as lp
    and length counting the generated tokens (an ending EOS included).
    """
    opts = _options(
        model, max_new_tokens, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
        num_beams=num_beams, length_penalty=length_penalty, eos_id=eos_id, stop_ids=stop_ids,
        seed=None, use_cache=use_cache, window_shift=window_shift,
    )
    prompts = _prompts(prompt_ids, model.config.vocab_size)
    if len(prompts) != 1:
        raise ValueError(f"beam_search takes one prompt, got {len(prompts)}; use generate")
    was_training = model.training
    model.eval()
    try:
        return _beam(model, prompts[0], max_new_tokens, opts)
    finally:
        model.train(was_training)


def _beam(model: GPT, prompt: list[int], max_new_tokens: int, opts: _Options):
    nb, device = opts.num_beams, next(model.parameters()).device
    with torch.inference_mode():
        ctx = _Context(model, torch.tensor([prompt] * nb, device=device), max_new_tokens, opts)
        scores = torch.full((nb,), float("-inf"), device=device)
        scores[0] = 0.0  # all rows hold the prompt; only one may be extended at the first step
        beams: list[list[int]] = [[] for _ in range(nb)]
        finished: list[tuple[float, float, list[int]]] = []  # (normalised, log P, tokens)
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(ctx.next_logits().float(), dim=-1)
            V = logp.size(-1)
            cand = (scores[:, None] + logp).view(-1)
            top, idx = torch.topk(cand, min(2 * nb, cand.numel()))
            rows, new_scores, new_beams = [], [], []
            for rank, (s, i) in enumerate(zip(top.tolist(), idx.tolist(), strict=True)):
                seq = beams[i // V] + [i % V]
                if _ends_with_stop(seq, opts):
                    if rank < nb and s > float("-inf"):
                        lp = length_penalty_gnmt(len(seq), opts.length_penalty)
                        finished.append((s / lp, s, seq))
                    continue
                rows.append(i // V)
                new_scores.append(s)
                new_beams.append(seq)
                if len(rows) == nb:
                    break
            if len(finished) >= nb or not rows:
                break
            while len(rows) < nb:  # every candidate ended: pad with dead beams
                rows.append(rows[0])
                new_scores.append(float("-inf"))
                new_beams.append(new_beams[0])
            row_idx = torch.tensor(rows, device=device)
            ctx.reorder(row_idx)
            ctx.append(torch.tensor([b[-1] for b in new_beams], device=device))
            scores = torch.tensor(new_scores, device=device)
            beams = new_beams
        else:
            for s, seq in zip(scores.tolist(), beams, strict=True):
                if s > float("-inf"):
                    finished.append((s / length_penalty_gnmt(len(seq), opts.length_penalty),
                                     s, seq))
    if not finished:  # max_new_tokens == 0
        return [], 0.0
    best = max(finished, key=lambda f: f[0])
    return best[2], best[1]


# --- entry points -------------------------------------------------------------------------------


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Sequence[Sequence[int]] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    window_shift: int = 1,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; return the new tokens per prompt.

    ``prompt_ids`` is one prompt (a list of ids) or several (a list of lists, or a (B, T)
    tensor); the result always holds one list per prompt, prompt not included. A row stops early
    after ``eos_id`` or after any of the token sequences in ``stop_ids`` (the stop tokens are
    included in its output).

    Sampling (``num_beams=1``): repetition penalty, then temperature, top-k, top-p, then a draw
    from the softmax; ``temperature=0`` is greedy (arg-max). ``seed`` makes the draws
    reproducible (its own ``torch.Generator``; None uses torch's global generator).

    Beam search (``num_beams > 1``): see ``beam_search``. It is deterministic, so the sampling
    options (temperature, top_k, top_p, seed, repetition_penalty) raise a ValueError with it.

    Prompts of different lengths are decoded in groups of equal length (the model has no padding
    mask), which gives exactly the tokens each prompt gets alone. ``use_cache`` reuses past keys
    and values (``KVCache``); ``window_shift`` sets how the context window slides past
    ``block_size`` (1: crop to the last block_size tokens at every step).
    """
    opts = _options(
        model, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, num_beams=num_beams,
        length_penalty=length_penalty, eos_id=eos_id, stop_ids=stop_ids, seed=seed,
        use_cache=use_cache, window_shift=window_shift,
    )
    prompts = _prompts(prompt_ids, model.config.vocab_size)
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        if opts.num_beams > 1:
            for b, p in enumerate(prompts):
                out[b] = _beam(model, p, max_new_tokens, opts)[0]
            return out
        gen = _generator(model, opts.seed)
        groups: dict[int, list[int]] = {}
        for b, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(b)
        for rows in groups.values():
            for step in _sample(model, [prompts[b] for b in rows], max_new_tokens, opts, gen):
                for b, tok in zip(rows, step, strict=True):
                    if tok is not None:
                        out[b].append(tok)
        return out
    finally:
        model.train(was_training)


def stream(
    model: GPT, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (same options as ``generate``).

    With ``num_beams > 1`` the best beam is only known at the end, so its tokens come at once.
    """
    prompts = _prompts(prompt_ids, model.config.vocab_size)
    if len(prompts) != 1:
        raise ValueError(f"stream decodes one prompt, got {len(prompts)}; use generate for a batch")
    kw = dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, num_beams=1,
              length_penalty=1.0, eos_id=None, stop_ids=None, seed=None, use_cache=True,
              window_shift=1)
    unknown = sorted(set(kwargs) - set(kw))
    if unknown:
        raise TypeError(f"stream() got unexpected keyword arguments {unknown}")
    opts = _options(model, max_new_tokens, **{**kw, **kwargs})
    return _stream(model, prompts[0], max_new_tokens, opts)


def _stream(model: GPT, prompt: list[int], max_new_tokens: int, opts: _Options) -> Iterator[int]:
    was_training = model.training
    model.eval()
    try:
        if opts.num_beams > 1:
            yield from _beam(model, prompt, max_new_tokens, opts)[0]
            return
        gen = _generator(model, opts.seed)
        for step in _sample(model, [prompt], max_new_tokens, opts, gen):
            yield step[0]
    finally:
        model.train(was_training)


def _generator(model: GPT, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
