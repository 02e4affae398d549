"""Instruction tuning's answer metrics: ROUGE-L, exact match, greedy answers (tiny models)."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minigpt.instruct import (
    InstructionConfig,
    answer,
    evaluate_answers,
    exact_match,
    format_chat,
    keep_fitting,
    lcs_length,
    rouge_l,
    run_instruction,
    split_entries,
    words,
)
from minigpt.model import GPT, GPTConfig


def brute_force_lcs(a, b):
    """The longest common subsequence by trying every subsequence of ``a`` (tiny inputs)."""
    for n in range(len(a), 0, -1):
        for keep in itertools.combinations(range(len(a)), n):
            sub, it = [a[i] for i in keep], iter(b)
            if all(x in it for x in sub):  # sub is a subsequence of b
                return n
    return 0


@given(st.lists(st.sampled_from("abc"), max_size=7), st.lists(st.sampled_from("abc"), max_size=7))
def test_lcs_length_matches_brute_force(a, b):
    assert lcs_length(a, b) == brute_force_lcs(a, b) == lcs_length(b, a)


def test_rouge_l_on_hand_examples():
    assert words("The cat, sat!") == ["the", "cat", "sat"]
    # LCS "the cat on the mat": 5 of 6 words on each side
    assert rouge_l("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # precision 2/2, recall 2/4: F1 = 2/3
    assert rouge_l("blue sky", "the blue clear sky") == pytest.approx(2 / 3)
    assert rouge_l("Blue.", "blue") == 1.0
    assert rouge_l("", "blue") == rouge_l("red", "blue") == 0.0
    assert rouge_l("sky blue", "blue sky") == pytest.approx(0.5)  # order matters
    assert exact_match("The answer: Au.", "the answer au") and not exact_match("Au", "Ag")


def char_codec():
    alphabet = "".join(chr(c) for c in range(32, 127)) + "\n"
    return (lambda s: [alphabet.index(c) for c in s],
            lambda ids: "".join(alphabet[i] for i in ids if i < len(alphabet)),
            len(alphabet))  # the end-of-text id


def test_answer_is_greedy_and_stops_at_end_of_text():
    encode, decode, eos = char_codec()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=eos + 1, block_size=32, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    with torch.no_grad():  # every final hidden state = a long end-of-text direction
        model.lm_head.weight[eos] *= 10
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.lm_head.weight[eos])
    assert answer(model, "User: hi\nAssistant: ", encode, decode, eos, 10) == ""
    entries = [{"instruction": "hi", "input": "", "output": "hello"}] * 3
    result = evaluate_answers(model, entries, format_chat, encode, decode, eos, 10)
    assert result["answers"] == ["", "", ""] and result["rouge_l"] == 0.0 and result["n"] == 3
    with pytest.raises(ValueError, match="no entries"):
        evaluate_answers(model, [], format_chat, encode, decode, eos)


def test_run_instruction_scores_answers_before_and_after():
    encode, decode, eos = char_codec()
    names = ["Ann", "Bob", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal", "Ida", "Jo"] * 4
    entries = [{"instruction": f"Greet {n}.", "input": "", "output": "hi there"} for n in names]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=eos + 1, block_size=32, n_layer=1, n_head=2, n_embd=32))
    cfg = InstructionConfig(template="chat", epochs=4, batch_size=8, lr=1e-2, max_len=31,
                            answer_limit=3, answer_tokens=9)
    result = run_instruction(model, encode, eos, cfg, entries=entries, decode=decode)
    before, after = result["before"]["answers"], result["after"]["answers"]
    assert before["n"] == after["n"] == len(result["held_out"]) == 3
    assert before["exact_match"] == 0.0  # a random model does not say "hi there"
    assert after["rouge_l"] > before["rouge_l"] + 0.25  # it learnt at least "hi"
    assert after["rouge_l_each"] == [rouge_l(a, "hi there") for a in after["answers"]]
    expected = keep_fitting(split_entries(entries, seed=0)[2], format_chat, encode, eos, 31)
    assert result["held_out"] == [{"instruction": e["instruction"], "input": "",
                                   "reference": e["output"]} for e in expected[:3]]
    one_epoch = InstructionConfig(template="chat", epochs=1, max_len=31)
    assert "answers" not in run_instruction(model, encode, eos, one_epoch, entries=entries)["after"]
