"""Tests for minigpt.generate: logit filters, sampling, KV-cache decoding, beam search."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from minigpt.generate import (
    _Context,
    _options,
    apply_repetition_penalty,
    beam_search,
    filter_logits,
    generate,
    length_penalty_gnmt,
    stream,
    top_k_filter,
    top_p_filter,
)
from minigpt.model import GPT, GPTConfig

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


# --- filters -----------------------------------------------------------------------------------


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    assert top_k_filter(logits, 1)[0].tolist() == [NEG, 3.0, NEG, 3.0, NEG]  # tie: both kept
    assert top_k_filter(logits, 3).tolist() == [
        [NEG, 3.0, 2.0, 3.0, NEG], [NEG, NEG, 2.0, 3.0, 4.0]
    ]
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 99), logits)


@pytest.mark.parametrize("k", [0, -1, 2.5, None, True])
def test_top_k_rejects_bad_k(k):
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(torch.zeros(3), k)


def test_top_p_hand_made():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [True, False, False]
    assert top_p_filter(logits, 0.6).isfinite().tolist() == [True, True, False]
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [True, True, True]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert top_p_filter(logits, 1e-9).isfinite().tolist() == [True, False, False]
    # ties are kept or dropped together: 0.4 + 0.3 reaches 0.5, and the other 0.3 ties with it
    tied = torch.tensor([0.3, 0.4, 0.3]).log()
    assert top_p_filter(tied, 0.5).isfinite().tolist() == [True, True, True]
    assert top_p_filter(tied, 0.4).isfinite().tolist() == [False, True, False]
    # all mass in one token
    peaked = torch.tensor([[0.0, 100.0, 0.0], [NEG, NEG, 0.0]])
    assert top_p_filter(peaked, 0.999).isfinite().tolist() == [
        [False, True, False], [False, False, True]
    ]


def test_top_p_matches_brute_force_definition():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(7, generator=gen) * 2
        p = float(torch.rand(1, generator=gen))
        probs = logits.softmax(-1)
        # the smallest set of most likely tokens whose probability reaches p
        order = probs.argsort(descending=True).tolist()
        n = next(i + 1 for i in range(7) if probs[order[: i + 1]].sum() >= p)
        expected = sorted(order[:n])
        kept = top_p_filter(logits, p).isfinite().nonzero().flatten().tolist()
        assert kept == expected


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan"), None])
def test_top_p_rejects_bad_p(p):
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(torch.zeros(3), p)


def test_repetition_penalty_ctrl_sign_aware():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    before = logits.clone()
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert torch.equal(logits, before)  # pure
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 1.0), logits)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="repetition_penalty"):
            apply_repetition_penalty(logits, torch.tensor([[0]]), bad)


def test_filter_logits_temperature_then_filters():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    assert torch.allclose(filter_logits(logits, 2.0), logits / 2)
    out = filter_logits(logits, 0.5, top_k=2)
    assert out.tolist() == [4.0, 2.0, NEG, NEG]
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, 0.0)


def test_length_penalty_gnmt():
    assert length_penalty_gnmt(1, 0.7) == 1.0
    assert math.isclose(length_penalty_gnmt(7, 1.0), 2.0)
    assert length_penalty_gnmt(10, 0.0) == 1.0


# --- KV cache, sliding window ------------------------------------------------------------------

CONFIGS = [
    {},
    {"pos_emb": "rope", "n_kv_head": 1, "norm": "rmsnorm", "mlp": "swiglu"},
]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("shift", [1, 3])
def test_cached_and_uncached_logits_agree_past_the_context(overrides, shift):
    model = tiny_model(1, **overrides)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    opts = {
        name: _options(model, 20, temperature=0, top_k=None, top_p=None, repetition_penalty=1.0,
                       num_beams=1, length_penalty=1.0, eos_id=None, stop_ids=None, seed=None,
                       use_cache=name, window_shift=shift)
        for name in (True, False)
    }
    with torch.no_grad():
        cached, plain = (_Context(model, prompt, 20, opts[c]) for c in (True, False))
        for _ in range(20):  # 3 + 20 tokens: the window slides several times past block_size=8
            a, b = cached.next_logits(), plain.next_logits()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            nxt = a.argmax(-1)
            cached.append(nxt)
            plain.append(nxt)
        assert cached.cache.length <= model.config.block_size


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


def test_sampling_follows_the_filtered_distribution():
    """Draw many first tokens in one batch and compare frequencies with softmax(filtered)."""
    model = tiny_model(5)
    prompt = [2, 7, 1]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0][0, -1]
    probs = filter_logits(logits, 0.8, top_k=4).softmax(-1)
    n = 4000
    first = torch.tensor([g[0] for g in generate(model, [prompt] * n, 1, temperature=0.8,
                                                  top_k=4, seed=0)])
    freq = torch.bincount(first, minlength=11).float() / n
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(freq, probs, atol=0.03)


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
            logits = apply_repetition_penalty(logits, torch.tensor([seq]), 5.0)
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
    generate(model, [1], 3, seed=0)
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


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "kwargs", "match"),
    [
        ([], {}, "empty prompt"),
        ([[1, 2], []], {}, "empty prompt 1"),
        ([1, 11], {}, "outside the model's vocabulary"),
        ([-1], {}, "outside the model's vocabulary"),
        ([1.5], {}, "integer token ids"),
        ([1], {"temperature": -1.0}, "temperature"),
        ([1], {"temperature": float("nan")}, "temperature"),
        ([1], {"top_p": 0.0}, "top_p"),
        ([1], {"top_p": 1.2}, "top_p"),
        ([1], {"top_k": 0}, "top_k"),
        ([1], {"num_beams": 0}, "num_beams"),
        ([1], {"num_beams": 2, "temperature": 0.7}, "temperature do not apply"),
        ([1], {"num_beams": 2, "top_k": 3, "seed": 1}, "top_k, seed do not apply"),
        ([1], {"repetition_penalty": 0.0}, "repetition_penalty"),
        ([1], {"eos_id": 11}, "eos_id"),
        ([1], {"stop_ids": [3, 4]}, "list of token sequences"),
        ([1], {"window_shift": 0}, "window_shift"),
        ([1], {"length_penalty": float("inf")}, "length_penalty"),
    ],
)
def test_bad_input_is_a_clear_error(prompt, kwargs, match):
    model = tiny_model(13)
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        list(stream(model, prompt, 3, **kwargs))


def test_bad_max_new_tokens_and_stream_arguments():
    model = tiny_model(13)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)
    with pytest.raises(ValueError, match="one prompt"):
        list(stream(model, [[1], [2]], 3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        list(stream(model, [1], 3, temprature=0.5))


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
