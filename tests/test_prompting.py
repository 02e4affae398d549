"""Zero- and few-shot prompting scored by likelihood (minigpt.prompting)."""

import pytest
import torch

from minigpt.model import GPT, gpt2_config
from minigpt.prompting import (
    PromptError,
    Task,
    build_prompt,
    few_shot_eval,
    score_candidates,
)

WORDS = ("king", "queen", "lord", "lady", "death", "blood", "love", "night")
COPY = Task("copy", tuple((w, w) for w in WORDS))


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))  # bytes as token ids: a vocabulary of 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(gpt2_config("gpt2", vocab_size=256, block_size=96, n_layer=1, n_head=2,
                           n_embd=16)).eval()


def test_prompt_is_demonstrations_then_the_open_query():
    prompt = build_prompt(COPY, [("king", "king"), ("lady", "lady")], "love")
    assert prompt == "king -> king\nlady -> lady\nlove ->"
    assert build_prompt(COPY, [], "love") == "love ->"  # zero-shot: the query alone
    assert COPY.query("love") == ("love ->", " ")  # the space belongs to the answer
    other = Task("colon", COPY.pairs, "Q: {x}\nA:{y}.\n")
    assert build_prompt(other, [("a", "b")], "c") == "Q: a\nA:b.\nQ: c\nA:"


def test_scores_are_the_log_likelihood_of_each_answer(model):
    """Batched, right-padded scoring equals one unpadded forward pass per candidate."""
    prompt, candidates = "lady -> lady\nking ->", [" king", " q", " blood and death"]
    scores = score_candidates(model, encode, prompt, candidates)
    for score, candidate in zip(scores, candidates, strict=True):
        ids = torch.tensor([encode(prompt + candidate)])
        with torch.no_grad():
            logp = model(ids[:, :-1])[0].log_softmax(-1)[0]
        n = len(encode(prompt))
        expected = sum(logp[n - 1 + i, t] for i, t in enumerate(encode(candidate)))
        assert abs(score.item() - float(expected)) < 1e-4


def test_same_queries_for_every_number_of_shots_and_no_leak(model):
    seen: dict[int, list[str]] = {}

    for shots in (0, 2, 5):
        prompts: list[str] = []

        def spy(text, prompts=prompts):
            prompts.append(text)
            return encode(text)

        result = few_shot_eval(model, spy, COPY, shots, n_queries=6, seed=3)
        assert 0.0 <= result.accuracy <= 1.0 and result.answer_nll > 0
        full = [p for p in prompts if p.endswith("->")]
        assert len(full) == 6
        for p in full:
            lines = p.split("\n")
            assert len(lines) == shots + 1
            query = lines[-1].removesuffix(" ->")
            assert f"{query} -> {query}" not in lines[:-1]  # the answer is not in a demo
        seen[shots] = [p.split("\n")[-1] for p in full]
    assert seen[0] == seen[2] == seen[5]
    again = few_shot_eval(model, encode, COPY, 2, n_queries=6, seed=3)
    assert again == few_shot_eval(model, encode, COPY, 2, n_queries=6, seed=3)


def test_bad_tasks_and_prompts_say_what_to_do(model):
    with pytest.raises(PromptError, match="needs one {x} before one {y}"):
        Task("t", COPY.pairs, "{y} <- {x}\n")
    with pytest.raises(PromptError, match="fewer than n_candidates=4; add pairs"):
        Task("t", (("a", "x"), ("b", "y"), ("c", "x")))
    with pytest.raises(PromptError, match="shots must be in"):
        few_shot_eval(model, encode, COPY, len(WORDS))
    with pytest.raises(PromptError, match="more than the model's context of 96; use fewer"):
        few_shot_eval(model, encode, COPY, 7, n_queries=1)
