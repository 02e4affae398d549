"""Tests for minigpt.generate: options, logits processors, the sliding window and KV cache,
sampling, beam search (against a plain reference and Hugging Face), and bad input."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt.generate import (
    PROCESSORS,
    DecodeOptions,
    DecodingError,
    NonFiniteLogitsError,
    SlidingWindow,
    apply_repetition_penalty,
    apply_temperature,
    beam_search,
    eval_mode,
    generate,
    length_penalty_gnmt,
    min_p_filter,
    process_logits,
    stream,
    top_k_filter,
    top_p_filter,
)
from minigpt.model import GPT, GPTConfig, KVCache, gpt2_config
from minigpt.pretrained import save_hf

NEG = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT with large random weights, so its next-token distributions are far from flat."""
    kw = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**kw, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


def greedy_reference(model: GPT, prompt: list[int], n: int, seed: int | None = None) -> list[int]:
    """The textbook loop: crop to the last block_size tokens, run the model, take the arg-max
    (or, with a seed, draw from the softmax)."""
    idx = torch.tensor([prompt])
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size :])[0][:, -1]
            if gen is None:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
    return idx[0, len(prompt) :].tolist()


# --- options ------------------------------------------------------------------------------------


def test_options_hold_the_defaults_and_normalise_stop_sequences():
    opts = DecodeOptions()
    assert (opts.temperature, opts.top_k, opts.top_p, opts.min_p, opts.num_beams) == (
        1.0, None, None, None, 1)
    assert opts.sampling_options() == []
    opts = DecodeOptions(temperature=0.5, top_k=3, stop_ids=[[1, 2], np.array([3])])
    assert opts.stop_ids == ((1, 2), (3,))
    assert opts.sampling_options() == ["temperature", "top_k"]
    assert dataclasses.replace(opts, top_k=None).sampling_options() == ["temperature"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\]"),
        ({"top_p": 1.2}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": 0.0}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, r"repetition_penalty must be a number in \[0.01, 100\]"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"num_beams": 0}, "num_beams"),
        ({"length_penalty": float("inf")}, "length_penalty"),
        ({"eos_id": -1}, "eos_id"),
        ({"stop_ids": [3, 4]}, "list of token sequences"),
        ({"stop_ids": [[3], []]}, "list of token sequences"),
        ({"seed": 1.5}, "seed"),
        ({"use_cache": "yes"}, "use_cache"),
        ({"window_shift": 0}, "window_shift"),
        ({"num_beams": 2, "temperature": 0.7}, "temperature do not apply"),
        ({"num_beams": 2, "top_k": 3, "seed": 1}, "top_k, seed do not apply"),
        ({"num_beams": 2, "min_p": 0.1}, "min_p do not apply"),
    ],
)
def test_bad_options_are_refused_when_built(kwargs, match):
    with pytest.raises(DecodingError, match=match):
        DecodeOptions(**kwargs)


def test_options_or_keyword_overrides_give_the_same_result():
    model = tiny_model(4)
    opts = DecodeOptions(seed=7, top_k=5, top_p=0.9)
    a = generate(model, [1, 2], 12, opts)
    assert a == generate(model, [1, 2], 12, seed=7, top_k=5, top_p=0.9)
    assert a == generate(model, [1, 2], 12, DecodeOptions(seed=7), top_k=5, top_p=0.9)
    assert a != generate(model, [1, 2], 12, opts, seed=8)  # an override wins
    with pytest.raises(TypeError, match="unexpected keyword"):
        generate(model, [1], 3, temprature=0.5)
    with pytest.raises(DecodingError, match="DecodeOptions"):
        generate(model, [1], 3, {"temperature": 0.5})


# --- logits processors --------------------------------------------------------------------------


def test_processors_run_in_the_documented_order():
    assert PROCESSORS == (apply_repetition_penalty, apply_temperature, top_k_filter,
                          top_p_filter, min_p_filter)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    opts = DecodeOptions(temperature=0.5, top_k=2)
    assert process_logits(logits, opts).tolist() == [[0.0, -2.0, NEG, NEG]]  # shifted by max
    seen = torch.tensor([[True, False, False, False]])
    penalised = process_logits(logits, DecodeOptions(repetition_penalty=4.0, top_k=1), seen)
    assert penalised.isfinite().tolist() == [[False, True, False, False]]  # 2/4 < 1


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    k = lambda n: DecodeOptions(top_k=n)  # noqa: E731
    assert top_k_filter(logits, k(1))[0].tolist() == [NEG, 3.0, NEG, 3.0, NEG]  # tie: both
    assert top_k_filter(logits, k(3)).tolist() == [
        [NEG, 3.0, 2.0, 3.0, NEG], [NEG, NEG, 2.0, 3.0, 4.0]
    ]
    assert torch.equal(top_k_filter(logits, k(5)), logits)
    assert torch.equal(top_k_filter(logits, k(99)), logits)
    assert torch.equal(top_k_filter(logits, DecodeOptions()), logits)


def top_p(logits, p):
    return top_p_filter(logits, DecodeOptions(top_p=p))


def test_top_p_hand_made():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert top_p(logits, 0.5).isfinite().tolist() == [True, False, False]
    assert top_p(logits, 0.6).isfinite().tolist() == [True, True, False]
    assert top_p(logits, 0.81).isfinite().tolist() == [True, True, True]
    assert torch.equal(top_p(logits, 1.0), logits)
    assert top_p(logits, 1e-9).isfinite().tolist() == [True, False, False]
    # ties are kept or dropped together: 0.4 + 0.3 reaches 0.5, and the other 0.3 ties with it
    tied = torch.tensor([0.3, 0.4, 0.3]).log()
    assert top_p(tied, 0.5).isfinite().tolist() == [True, True, True]
    assert top_p(tied, 0.4).isfinite().tolist() == [False, True, False]
    # all mass in one token
    peaked = torch.tensor([[0.0, 100.0, 0.0], [NEG, NEG, 0.0]])
    assert top_p(peaked, 0.999).isfinite().tolist() == [
        [False, True, False], [False, False, True]
    ]


def test_top_p_and_min_p_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(7, generator=gen) * 2
        p = float(torch.rand(1, generator=gen)) * 0.99 + 0.01
        probs = logits.softmax(-1)
        # top-p: the smallest set of most likely tokens whose probability reaches p
        order = probs.argsort(descending=True).tolist()
        n = next(i + 1 for i in range(7) if probs[order[: i + 1]].sum() >= p)
        assert top_p(logits, p).isfinite().nonzero().flatten().tolist() == sorted(order[:n])
        # min-p: the tokens at least p times as likely as the most likely one
        expected = (probs >= p * probs.max()).nonzero().flatten().tolist()
        kept = min_p_filter(logits, DecodeOptions(min_p=p)).isfinite()
        assert kept.nonzero().flatten().tolist() == expected
        assert torch.equal(min_p_filter(logits, DecodeOptions()), logits)


def test_repetition_penalty_ctrl_sign_aware():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    before = logits.clone()
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, DecodeOptions(repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(logits, before)  # pure
    assert torch.equal(apply_repetition_penalty(logits, DecodeOptions(), seen), logits)
    assert torch.equal(  # nothing seen, nothing penalised
        apply_repetition_penalty(logits, DecodeOptions(repetition_penalty=2.0)), logits)


def test_temperature_is_shift_invariant_and_cannot_overflow():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.3, 1.0, 2.5):
        got = apply_temperature(logits, DecodeOptions(temperature=t)).softmax(-1)
        torch.testing.assert_close(got, (logits / t).softmax(-1))
    assert torch.equal(apply_temperature(logits, DecodeOptions(temperature=0)), logits)
    tiny = apply_temperature(logits * 1e30, DecodeOptions(temperature=1e-45))
    assert tiny.softmax(-1).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # logits / 1e-45 would be inf


def test_length_penalty_gnmt():
    assert length_penalty_gnmt(1, 0.7) == 1.0
    assert math.isclose(length_penalty_gnmt(7, 1.0), 2.0)
    assert length_penalty_gnmt(10, 0.0) == 1.0


# --- KV cache, sliding window ------------------------------------------------------------------

CONFIGS = [
    {},
    {"pos_emb": "rope", "n_kv_head": 1, "norm": "rmsnorm", "mlp": "swiglu"},
]


def test_kv_cache_reorder_and_mask():
    model = tiny_model(1, n_kv_head=1)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    cache = KVCache(model.config, 3, 8)
    with torch.no_grad():
        model(idx, kv_cache=cache)
        cache.reorder(torch.tensor([2, 2, 0]))
        step = model(torch.tensor([[1], [2], [3]]), kv_cache=cache)[0]
        fresh = model(torch.tensor([[7, 8, 9, 1], [7, 8, 9, 2], [1, 2, 3, 3]]))[0]
    torch.testing.assert_close(step[:, -1], fresh[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.length == 4
    assert cache.mask(1).tolist() == [[True] * 5]  # one new query sees every cached slot
    assert cache.mask(2).tolist() == [[True] * 5 + [False], [True] * 6]
    cache.reset()
    assert cache.length == 0 and cache.mask(3) is None
    cache.advance(2)
    assert cache.length == 2


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("shift", [1, 3])
def test_cached_and_uncached_logits_agree_past_the_context(overrides, shift):
    model = tiny_model(1, **overrides)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    cached, plain = (SlidingWindow(model, prompt, DecodeOptions(use_cache=c, window_shift=shift),
                                   20) for c in (True, False))
    history = prompt
    for _ in range(20):  # 3 + 20 tokens: the window slides several times past block_size=8
        a, b = cached.next_logits(), plain.next_logits()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        nxt = a.argmax(-1)
        cached.append(nxt)
        plain.append(nxt)
        assert cached.tokens.size(1) <= model.config.block_size + 1
        history = torch.cat([history, nxt[:, None]], dim=1)
    assert cached.cache.max_len == model.config.block_size
    for row, seen in zip(history.tolist(), cached.seen.tolist(), strict=True):
        assert [i for i, s in enumerate(seen) if s] == sorted(set(row))


@pytest.mark.parametrize("overrides", CONFIGS)
def test_greedy_slides_like_the_crop_loop(overrides):
    model = tiny_model(2, **overrides)
    prompt = [3, 1, 4, 1, 5]
    expected = greedy_reference(model, prompt, 25)
    sampled = greedy_reference(model, prompt, 25, seed=5)
    assert len(set(sampled)) > 3  # greedy on random weights repeats; sampling does not
    for use_cache in (True, False):
        assert generate(model, prompt, 25, temperature=0, use_cache=use_cache) == [expected]
        assert generate(model, prompt, 25, seed=5, use_cache=use_cache) == [sampled]


def test_prompt_longer_than_the_context_is_cropped():
    model = tiny_model(3)
    prompt = list(range(11)) + [0, 1]  # 13 > block_size=8
    assert generate(model, prompt, 6, temperature=0) == [greedy_reference(model, prompt, 6)]


# --- sampling ----------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_cache_independent():
    model = tiny_model(4)
    a = generate(model, [1, 2], 30, seed=7, top_k=5, top_p=0.9)
    assert a == generate(model, [1, 2], 30, seed=7, top_k=5, top_p=0.9, use_cache=False)
    assert a != generate(model, [1, 2], 30, seed=8, top_k=5, top_p=0.9)
    assert list(stream(model, [1, 2], 30, seed=7, top_k=5, top_p=0.9)) == a[0]


def test_sampling_follows_the_processed_distribution():
    """Draw many first tokens in one batch and compare frequencies with softmax(processed)."""
    model = tiny_model(5)
    prompt = [2, 7, 1]
    opts = DecodeOptions(temperature=0.8, top_k=4, seed=0)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][0, -1]
    probs = process_logits(logits, opts).softmax(-1)
    n = 4000
    first = torch.tensor([g[0] for g in generate(model, [prompt] * n, 1, opts)])
    freq = torch.bincount(first, minlength=11).float() / n
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq, probs, atol=0.03)


def test_min_p_restricts_the_draws():
    model = tiny_model(5)
    prompt = [2, 7, 1]
    with torch.no_grad():
        probs = model(torch.tensor([prompt]))[0][0, -1].softmax(-1)
    allowed = set((probs >= 0.3 * probs.max()).nonzero().flatten().tolist())
    first = {g[0] for g in generate(model, [prompt] * 500, 1, seed=0, min_p=0.3)}
    assert first == allowed and len(allowed) < 11


def test_batch_of_different_lengths_equals_each_prompt_alone():
    model = tiny_model(6)
    prompts = [[1], [2, 3, 4], [5, 6], [7, 8, 9], [10, 0, 1, 2, 3, 4, 5, 6, 7]]
    batch = generate(model, prompts, 12, temperature=0)
    assert batch == [generate(model, p, 12, temperature=0)[0] for p in prompts]
    assert batch == [greedy_reference(model, p, 12) for p in prompts]
    tensor_batch = generate(model, torch.tensor([[2, 3, 4], [7, 8, 9]]), 12, temperature=0)
    assert tensor_batch == [batch[1], batch[3]]
    assert generate(model, np.array([2, 3, 4]), 12, temperature=0) == [batch[1]]


def test_repetition_penalty_changes_greedy_choices():
    model = tiny_model(7)
    plain = generate(model, [1, 2, 3], 20, temperature=0)[0]
    penalised = generate(model, [1, 2, 3], 20, temperature=0, repetition_penalty=5.0)[0]
    assert plain != penalised
    # recompute the penalised greedy choice by hand at every step
    seq = [1, 2, 3]
    with torch.no_grad():
        for tok in penalised:
            logits = model(torch.tensor([seq[-8:]]))[0][:, -1]
            seen = torch.zeros(1, 11, dtype=torch.bool)
            seen[0, seq] = True
            logits = torch.where(seen & (logits > 0), logits / 5, logits)
            logits = torch.where(seen & (logits <= 0), logits * 5, logits)
            assert int(logits.argmax()) == tok
            seq.append(tok)


def test_eos_and_stop_sequences_end_a_row():
    model = tiny_model(8)
    full = generate(model, [[1, 2], [3, 4]], 15, temperature=0)
    eos = full[0][3]
    cut = generate(model, [[1, 2], [3, 4]], 15, temperature=0, eos_id=eos)
    assert cut[0] == full[0][: full[0].index(eos) + 1]
    row1 = full[1][: full[1].index(eos) + 1] if eos in full[1] else full[1]
    assert cut[1] == row1
    stop = full[0][4:6]
    got = generate(model, [1, 2], 15, temperature=0, stop_ids=[stop])[0]
    assert got[-2:] == stop and len(got) <= 6
    assert list(stream(model, [1, 2], 15, temperature=0, eos_id=eos)) == cut[0]


def test_zero_new_tokens_and_training_mode_restored():
    model = tiny_model(9).train()
    assert generate(model, [[1], [2, 3]], 0) == [[], []]
    assert beam_search(model, [1], 0, num_beams=2) == ([], 0.0)
    generate(model, [1], 3, seed=0)
    assert model.training
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        assert not model.training
        raise RuntimeError("inside")
    assert model.training  # restored after an exception too
    it = stream(model, [1], 3)
    next(it)
    assert not model.training  # while streaming
    list(it)
    assert model.training


# --- beam search -------------------------------------------------------------------------------


def seq_logprob(model: GPT, prompt: list[int], cont: list[int]) -> float:
    """log P(cont | prompt) with the uncached model (contexts fit in block_size here)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + cont]))[0][0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))


def reference_beam(model, prompt, steps, num_beams, alpha, eos=None):
    """Beam search written plainly: lists of hypotheses, the model re-run from scratch."""
    beams = [([], 0.0)]
    finished = []
    for _ in range(steps):
        cands = []
        for seq, score in beams:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + seq]))[0][0, -1]
            logp = torch.log_softmax(logits.float(), -1).tolist()
            cands += [(seq + [t], score + lp) for t, lp in enumerate(logp)]
        cands.sort(key=lambda c: -c[1])
        beams = []
        for rank, (seq, score) in enumerate(cands[: 2 * num_beams]):
            if seq[-1] == eos:
                if rank < num_beams:
                    finished.append((score / length_penalty_gnmt(len(seq), alpha), seq))
            elif len(beams) < num_beams:
                beams.append((seq, score))
        if len(finished) >= num_beams:
            break
    else:
        finished += [(s / length_penalty_gnmt(len(q), alpha), q) for q, s in beams]
    return max(finished, key=lambda f: f[0])[1]


def test_beam_search_with_all_beams_is_exhaustive():
    model = tiny_model(10, vocab_size=5)
    prompt, steps, V = [1, 3], 3, 5
    best = max(itertools.product(range(V), repeat=steps),
               key=lambda c: seq_logprob(model, prompt, list(c)))
    tokens, logp = beam_search(model, prompt, steps, num_beams=V**steps)
    assert tokens == list(best)
    assert math.isclose(logp, seq_logprob(model, prompt, tokens), rel_tol=1e-4)
    # with EOS (id 0) and a length penalty: every sequence that ends in EOS, or runs to the end
    alpha = 0.8
    seqs = [list(c) for n in range(1, steps + 1) for c in itertools.product(range(V), repeat=n)
            if (0 in c and c.index(0) == n - 1) or (n == steps and 0 not in c)]
    best = max(seqs, key=lambda c: seq_logprob(model, prompt, c) / length_penalty_gnmt(len(c),
                                                                                      alpha))
    got = beam_search(model, prompt, steps, num_beams=V**steps, eos_id=0, length_penalty=alpha)
    assert got[0] == best


@pytest.mark.parametrize("num_beams", [2, 3])
@pytest.mark.parametrize("eos", [None, 0])
def test_beam_search_matches_reference(num_beams, eos):
    for seed in range(3):
        model = tiny_model(20 + seed, vocab_size=5)
        prompt = [seed + 1, 2]
        ref = reference_beam(model, prompt, 4, num_beams, 0.6, eos)
        for use_cache in (True, False):
            got = generate(model, prompt, 4, num_beams=num_beams, length_penalty=0.6,
                           eos_id=eos, use_cache=use_cache)
            assert got == [ref]


def test_beam_search_beats_greedy_in_log_probability():
    model = tiny_model(11, vocab_size=5)
    prompt = [1, 2]
    greedy = generate(model, prompt, 5, temperature=0)[0]
    beam, logp = beam_search(model, prompt, 5, num_beams=8, length_penalty=0.0)
    assert logp >= seq_logprob(model, prompt, greedy) - 1e-5
    assert list(stream(model, prompt, 5, num_beams=8, length_penalty=0.0)) == beam


def test_beam_search_slides_past_the_context():
    model = tiny_model(12, vocab_size=5, block_size=4)
    for use_cache in (True, False):
        out = generate(model, [1, 2, 3], 7, num_beams=3, use_cache=use_cache)
        assert len(out[0]) == 7
    assert generate(model, [1, 2, 3], 7, num_beams=3) == generate(
        model, [1, 2, 3], 7, num_beams=3, use_cache=False)


def test_greedy_and_beam_search_equal_hugging_face(tmp_path):
    torch.manual_seed(0)
    ours = GPT(gpt2_config("gpt2", vocab_size=50, block_size=32, n_layer=2, n_head=2,
                           n_embd=32)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.15)
    save_hf(ours, tmp_path)
    with warnings.catch_warnings():  # its checks of GPT-2's bos/eos ids against vocab 50
        warnings.simplefilter("ignore")
        hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert hf.generate(prompt, **kw)[:, 3:].tolist() == generate(ours, prompt, 12,
                                                                      temperature=0)
        for num_beams, eos in [(3, None), (5, 5)]:
            kw.update(attention_mask=torch.ones_like(prompt[:1]), num_beams=num_beams,
                      length_penalty=0.0, early_stopping=True, eos_token_id=eos)
            expected = hf.generate(prompt[:1], **kw)[0, 3:].tolist()
            got = beam_search(ours, [1, 2, 3], 12, num_beams=num_beams, length_penalty=0.0,
                              eos_id=eos)[0]
            assert got == expected[: len(got)] and len(got) in (len(expected), 12)
    assert beam_search(ours, [1, 2, 3], 12, num_beams=3, length_penalty=0.0)[0] != generate(
        ours, [1, 2, 3], 12, temperature=0)[0]  # the beams found something greedy did not


# --- bad input and faults ----------------------------------------------------------------------


def streamed(model, prompt, max_new_tokens, **kwargs) -> list[int]:
    """``stream``'s tokens as a list: checked when the first token is asked for."""
    return list(stream(model, prompt, max_new_tokens, **kwargs))


DECODERS = pytest.mark.parametrize("decode", [generate, streamed], ids=["generate", "stream"])


@DECODERS
@pytest.mark.parametrize(
    ("prompt", "kwargs", "match"),
    [
        ([], {}, "empty prompt"),
        ([[1, 2], []], {}, "empty prompt 1"),
        ([1, 11], {}, "outside the model's vocabulary"),
        ([-1], {}, "outside the model's vocabulary"),
        ([1.5], {}, "integer token ids"),
        (torch.zeros(1, 1, 2, dtype=torch.long), {}, r"\(T,\) or \(B, T\)"),
        ([1], {"temperature": -1.0}, "temperature"),
        ([1], {"top_p": 1.2}, "top_p"),
        ([1], {"num_beams": 2, "temperature": 0.7}, "temperature do not apply"),
        ([1], {"eos_id": 11}, "eos_id"),
        ([1], {"stop_ids": [[3, 11]]}, "stop sequence"),
        ([1], {"window_shift": 9}, "block_size=8"),
    ],
)
def test_bad_input_is_a_clear_error(decode, prompt, kwargs, match):
    with pytest.raises(DecodingError, match=match):
        decode(tiny_model(13), prompt, 3, **kwargs)


@pytest.mark.parametrize("bad", [-1, 2.5, 1e12, True])
def test_bad_max_new_tokens(bad):
    with pytest.raises(DecodingError, match="max_new_tokens"):
        generate(tiny_model(13), [1], bad)


@pytest.mark.parametrize("decode", [streamed, beam_search], ids=["stream", "beam_search"])
def test_one_prompt_decoders_refuse_a_batch(decode):
    with pytest.raises(DecodingError, match="one prompt"):
        decode(tiny_model(13), [[1], [2]], 3, num_beams=2)


@DECODERS
@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"seed": 0}, {"num_beams": 3},
                                    {"use_cache": False}])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_raise_instead_of_decoding_garbage(decode, kwargs, bad):
    model = tiny_model(14)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = bad
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite"):
        decode(model, [1, 2], 10, **kwargs)


def test_extreme_but_valid_values_decode():
    model = tiny_model(15)
    greedy = generate(model, [1, 2], 12, temperature=0)
    assert generate(model, [1, 2], 12, temperature=1e-45, seed=0) == greedy
    assert generate(model, [1, 2], 12, temperature=1e300, seed=0)[0] != greedy[0]  # ~uniform
    for theta in (0.01, 100.0):
        out = generate(model, [1, 2], 12, temperature=0, repetition_penalty=theta)[0]
        assert len(out) == 12 and all(0 <= t < 11 for t in out)


def test_huge_max_new_tokens_allocates_only_the_window():
    """Memory is bounded by the context window, not by max_new_tokens (no 8 TB buffers)."""
    model = tiny_model(16)
    first = list(itertools.islice(stream(model, [1, 2], 10**12, temperature=0), 30))
    assert first == generate(model, [1, 2], 30, temperature=0)[0]
    window = SlidingWindow(model, torch.tensor([[1, 2]]), DecodeOptions(), 10**12)
    assert window.cache.k.shape[3] == model.config.block_size
    eos = first[20]
    out = generate(model, [[1, 2]] * 3, 10**12, temperature=0, eos_id=eos)
    assert out == [first[: first.index(eos) + 1]] * 3
    tokens, _ = beam_search(model, [1, 2], 10**12, num_beams=2, eos_id=eos)
    assert tokens[-1] == eos


# --- regression: the outputs of the decoder before the options/processors redesign -------------

MODERN = {"pos_emb": "rope", "n_kv_head": 1, "norm": "rmsnorm", "mlp": "swiglu"}
BEFORE = {  # recorded with the 529-line generate.py (commit c2efcb7) on one thread
    "gpt2": {
        "greedy": [[24, 24, 24, 24, 7, 7, 24, 24, 24, 7, 7, 24, 24, 24, 7, 7, 24, 24, 24, 7],
                   [24, 24, 24, 24, 24, 24, 24, 11, 7, 7, 24, 7, 7, 24, 24, 24, 24, 24, 24, 24],
                   [7, 7, 7, 7, 7, 7, 7, 24, 24, 24, 24, 24, 24, 24, 24, 11, 7, 7, 24, 7]],
        "penalty": [[24, 7, 24, 25, 15, 5, 24, 11, 29, 24, 7, 7, 7, 7, 7, 7, 24, 26, 7, 7]],
        "shift3": [[24, 24, 24, 24, 7, 7, 7, 24, 24, 24, 24, 24, 24, 24, 24, 11, 7, 7, 7, 7]],
        "beam": [24],
        "beam4": [[11, 24, 7, 24, 7, 7, 24, 24, 24, 7], [24, 7, 24, 24, 7, 7, 24, 24, 24, 24]],
        "sample": [[7, 11, 7, 7, 24, 7, 5, 7, 7, 24, 15, 24, 7, 7, 15],
                   [29, 15, 5, 7, 24, 11, 7, 11, 11, 7, 7, 15, 7, 5, 11]],
        "sample_t": [[25, 7, 0, 25, 24, 7, 5, 29, 29, 19, 15, 24, 7, 7, 15]],
    },
    "modern": {
        "greedy": [[8, 8, 8, 8, 8, 8, 22, 20, 15, 7, 6, 1, 23, 26, 1, 1, 1, 29, 13, 1],
                   [7, 6, 1, 1, 1, 1, 1, 10, 1, 13, 15, 15, 15, 15, 10, 23, 5, 16, 4, 16],
                   [22, 6, 1, 23, 1, 6, 1, 1, 1, 1, 1, 1, 13, 10, 15, 15, 15, 10, 5, 16]],
        "penalty": [[8, 4, 14, 8, 8, 8, 22, 20, 6, 19, 23, 28, 23, 20, 5, 15, 11, 25, 15, 13]],
        "shift3": [[8, 8, 8, 8, 8, 8, 14, 14, 14, 13, 20, 22, 23, 23, 23, 5, 5, 5, 15, 15]],
        "beam": [14, 27],
        "beam4": [[13, 1, 22, 6, 1, 13, 11, 1, 29, 1], [27, 27, 30, 8, 3, 14, 8, 8, 8, 8]],
        "sample": [[15, 6, 23, 6, 5, 13, 13, 7, 26, 6, 1, 13, 16, 13, 15],
                   [16, 16, 16, 16, 30, 22, 1, 19, 22, 4, 13, 19, 11, 7, 22]],
        "sample_t": [[15, 1, 4, 8, 13, 7, 5, 0, 29, 10, 15, 13, 5, 20, 15]],
    },
}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kind", ["gpt2", "modern"])
def test_outputs_unchanged_by_the_redesign(kind, use_cache):
    variant = MODERN if kind == "modern" else {}
    model = tiny_model(0, vocab_size=31, n_embd=32, n_head=4, **variant)
    eos = 24 if kind == "gpt2" else 27
    got = {
        "greedy": generate(model, [[1, 2, 3], [4], list(range(5, 15))], 20, temperature=0,
                           use_cache=use_cache),
        "penalty": generate(model, [1, 2, 3], 20, temperature=0, repetition_penalty=1.5,
                            use_cache=use_cache),
        "shift3": generate(model, [1, 2, 3], 20, temperature=0, window_shift=3,
                           use_cache=use_cache),
        "beam": beam_search(model, [1, 2, 3], 12, num_beams=3, length_penalty=0.6, eos_id=eos,
                            use_cache=use_cache)[0],
        "beam4": generate(model, [[1, 2], [3, 4, 5]], 10, num_beams=4, use_cache=use_cache),
        "sample": generate(model, [[1, 2], [3, 4, 5]], 15, seed=3, top_k=5, top_p=0.9,
                           use_cache=use_cache),
        "sample_t": generate(model, [1, 2], 15, seed=3, temperature=0.7, repetition_penalty=1.3,
                             use_cache=use_cache),
    }
    assert got == BEFORE[kind]
