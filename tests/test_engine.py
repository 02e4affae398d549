"""The lean decoding engine: the same logits and tokens as the model's own forward pass."""

import pytest
import torch

from minigpt.attention import KVCache
from minigpt.engine import TRANSPOSE_MIN_STEPS, Engine, supports
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.peft import add_adapters, add_lora

VARIANTS = {
    "gpt2": {},
    "exact-gelu": {"gelu_approx": "none"},
    "modern": {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "n_kv_head": 2,
               "bias": False},
}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=64,
                         **kw)).eval()


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_step_matches_forward_with_the_same_cache(variant, transposed):
    model = _model(**VARIANTS[variant])
    engine = Engine(model, transposed=transposed)
    idx = torch.randint(97, (3, 12), generator=torch.Generator().manual_seed(1))
    ours, theirs = KVCache(model.config, 3, 32), KVCache(model.config, 3, 32)
    with torch.no_grad():
        model(idx[:, :4], kv_cache=ours)
        model(idx[:, :4], kv_cache=theirs)
        for t in range(4, 12):
            expected = model(idx[:, t : t + 1], kv_cache=theirs)[0][:, -1]
            got = engine.step(idx[:, t], ours)
            assert (got - expected).abs().max() < 1e-5
    assert ours.length == theirs.length == 12
    assert torch.allclose(ours.k[:, :, :, :12], theirs.k[:, :, :, :12], atol=1e-6)


@pytest.mark.parametrize("new_tokens", [40, TRANSPOSE_MIN_STEPS])  # without, with the copy
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opts", [{"temperature": 0}, {"seed": 3, "top_p": 0.9},
                                  {"num_beams": 3}, {"temperature": 0, "window_shift": 5}])
def test_generate_gives_the_same_tokens_with_and_without_the_engine(variant, opts, new_tokens):
    model = _model(**VARIANTS[variant])  # more new tokens than block_size 32: the window slides
    prompts = [1, 2, 3] if "num_beams" in opts else [[1, 2, 3], [4, 5, 6]]
    assert generate(model, prompts, new_tokens, **opts) == generate(
        model, prompts, new_tokens, engine=False, **opts)


def test_generate_sees_weights_changed_by_a_fused_optimiser_step():
    """Fused AdamW updates weights without bumping their version counters: an engine cached
    across calls would decode with the old weights."""
    model, n = _model(), TRANSPOSE_MIN_STEPS  # long enough for the transposed copy
    before = generate(model, [1, 2, 3], n, temperature=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]]))[1].backward()
    opt.step()
    after = generate(model.eval(), [1, 2, 3], n, temperature=0)
    assert after == generate(model, [1, 2, 3], n, temperature=0, engine=False)
    assert after != before


def test_models_with_replaced_modules_keep_the_module_path():
    lora = add_lora(_model(), rank=2)
    adapted = add_adapters(_model(), bottleneck=4)
    for model in (lora, adapted):
        assert not supports(model)
        with pytest.raises(TypeError, match="replaced modules"):
            Engine(model)
        assert generate(model, [1, 2], 8, temperature=0) == generate(
            model, [1, 2], 8, temperature=0, engine=False)
    assert supports(_model())


def test_step_refuses_a_full_cache():
    model = _model()
    cache = KVCache(model.config, 1, 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        Engine(model).step(torch.tensor([5]), cache)
