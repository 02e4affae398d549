"""Int8 quantization: absmax codes, Int8Linear vs nn.Linear, quantized GPT close to float."""

import pytest
import torch
from torch import nn

from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig
from minigpt.quantize import (
    METHODS,
    Int8Linear,
    decode_speed,
    dequantize,
    quantize_absmax,
    quantize_model,
    state_dict_bytes,
)

CFG = dict(vocab_size=64, block_size=48, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="module")
def trained() -> GPT:
    """A tiny GPT trained briefly on a periodic sequence, so its predictions are confident."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CFG))
    seq = torch.arange(400) * 7 % 64
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        starts = torch.randint(0, 400 - 33, (8,), generator=torch.Generator().manual_seed(step))
        x = torch.stack([seq[s : s + 33] for s in starts.tolist()])
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 1.0
    return model.eval()


def test_absmax_codes_and_error_bound():
    x = torch.randn(5, 40) * torch.tensor([[0.01], [1.0], [100.0], [0.0], [3.0]])
    q, scale = quantize_absmax(x, dim=1)
    assert q.dtype == torch.int8 and scale.shape == (5, 1)
    assert q.abs().max() == 127 and q[3].abs().max() == 0  # an all-zero row stays zero
    err = (dequantize(q, scale) - x).abs()
    assert torch.all(err <= scale / 2 + 1e-6)  # rounding error at most half a step
    with pytest.raises(ValueError, match="floating-point"):
        quantize_absmax(torch.ones(3, dtype=torch.long))


def test_int8_linear_matches_float_linear():
    torch.manual_seed(1)
    linear = nn.Linear(96, 40)
    q = Int8Linear.from_float(linear)
    assert q.weight_t.dtype == torch.int8 and q.weight_t.shape == (96, 40)
    x = torch.randn(3, 7, 96)
    ref, out = linear(x), q(x)
    assert out.shape == ref.shape == (3, 7, 40)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    # the integer path is exact: it equals the float product of the dequantized operands
    qx, sx = quantize_absmax(x.reshape(-1, 96), dim=1)
    w = dequantize(q.weight_t.t(), q.scale.t())
    torch.testing.assert_close(out.reshape(-1, 40), dequantize(qx, sx) @ w.t() + linear.bias,
                               rtol=1e-5, atol=1e-5)
    no_bias = Int8Linear.from_float(nn.Linear(8, 4, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("include_lm_head", [False, True])
def test_quantized_gpt_is_close_to_float(trained, method, include_lm_head):
    qmodel = quantize_model(trained, method, include_lm_head=include_lm_head)
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, _ = trained(x)
        out, _ = qmodel(x)
    corr = torch.corrcoef(torch.stack([ref.flatten(), out.flatten()]))[0, 1]
    assert corr > 0.999
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    prompts = [[0, 7, 14], [21, 28, 35]]
    greedy_f = generate(trained, prompts, 20, temperature=0.0)
    greedy_q = generate(qmodel, prompts, 20, temperature=0.0)
    same = sum(a == b for f, q in zip(greedy_f, greedy_q, strict=True)
               for a, b in zip(f, q, strict=True))
    assert same >= 0.9 * 40


def test_quantize_model_keeps_the_original_and_the_weight_tie(trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    q = quantize_model(trained, "scratch")
    assert isinstance(q.transformer.h[0].mlp.c_fc, Int8Linear)
    assert isinstance(q.lm_head, nn.Linear)  # float, still tied to the embedding
    assert q.lm_head.weight is q.transformer.wte.weight
    q_head = quantize_model(trained, "scratch", include_lm_head=True)
    assert isinstance(q_head.lm_head, Int8Linear)  # untied: an int8 copy of the table
    assert isinstance(trained.transformer.h[0].mlp.c_fc, nn.Linear)
    for k, v in trained.state_dict().items():
        assert torch.equal(v, before[k])
    tq = quantize_model(trained, "torch")
    assert type(tq.transformer.h[0].attn.c_attn).__name__ == "Linear"  # torch's dynamic one
    assert not isinstance(tq.transformer.h[0].attn.c_attn, nn.Linear)
    assert tq.lm_head.weight is tq.transformer.wte.weight


def test_quantized_state_dict_is_smaller():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=128))
    size = state_dict_bytes(model)
    assert size > 4 * model.num_params(non_embedding=False)  # float32 + pickle overhead
    for method in METHODS:
        q = state_dict_bytes(quantize_model(model, method))
        assert q < 0.4 * size  # blocks dominate this model: close to 4x smaller


def test_bad_arguments_raise(trained):
    with pytest.raises(ValueError, match="method"):
        quantize_model(trained, "int4")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), "scratch")
    with pytest.raises(ValueError, match="block_size"):
        decode_speed(trained, new_tokens=48, prompt_len=8)
    with pytest.raises(ValueError):
        decode_speed(trained, batch_size=0)


def test_decode_speed_reports_the_median_run_and_the_spread(trained):
    """Each repeat decodes new_tokens steps of one token through the KV cache; the result
    is the median repeat, as tokens/s over all rows and ms per step, with the spread."""
    inputs = []
    hook = trained.register_forward_hook(lambda m, args, kw, out: inputs.append(
        (tuple(args[0].shape), kw.get("kv_cache") is not None)), with_kwargs=True)
    durations = iter([0.5, 0.2, 0.4])  # seconds taken by the three repeats
    ticks = iter(t for d in durations for t in (0.0, d))
    try:
        r = decode_speed(trained, batch_size=2, new_tokens=4, prompt_len=3, repeats=3,
                         clock=lambda: next(ticks))
    finally:
        hook.remove()
    assert r == {"batch_size": 2, "repeats": 3, "tokens_per_s": pytest.approx(2 * 4 / 0.4),
                 "ms_per_token": pytest.approx(1000 * 0.4 / 4),
                 "ms_per_token_min": pytest.approx(1000 * 0.2 / 4),
                 "ms_per_token_max": pytest.approx(1000 * 0.5 / 4)}
    warm_up, repeats = inputs[:2], inputs[2:]
    assert warm_up == [((2, 3), True), ((2, 1), True)]
    assert repeats == 3 * ([((2, 3), True)] + 3 * [((2, 1), True)])
