"""Attention from scratch vs torch, rotary embeddings vs their complex-number formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from minigpt.attention import (
    apply_rope,
    attention_weights,
    decode_mask,
    repeat_kv,
    rope_cos_sin,
    scaled_dot_product_attention,
    split_heads,
    torch_attention,
)
from minigpt.model import GPT, GPTConfig


def qkv(B=2, H=3, L=5, S=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, H, S, D, generator=g),
            torch.randn(B, H, S, D, generator=g))


def test_plain_equals_torch():
    q, k, v = qkv(L=4, S=6)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v))


def test_causal_equals_torch_square_and_rectangular():
    for L, S in ((5, 5), (3, 7)):
        q, k, v = qkv(L=L, S=S)
        torch.testing.assert_close(
            scaled_dot_product_attention(q, k, v, is_causal=True),
            F.scaled_dot_product_attention(q, k, v, is_causal=True),
        )


def test_boolean_mask_equals_torch():
    q, k, v = qkv(L=4, S=6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[:, 0] = True  # every query sees at least one key
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask=mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_additive_mask_and_scale_equal_torch():
    q, k, v = qkv(L=4, S=6)
    mask = torch.randn(2, 1, 4, 6)
    mask[..., 2] = float("-inf")
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, mask=mask, scale=0.3),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
    )


def test_gqa_equals_torch_and_repeated_heads():
    q, _, _ = qkv(H=6)
    _, k, v = qkv(H=2, seed=1)
    expected = scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True
    )
    ours = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(
        ours, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    )


def test_weights_are_causal_distributions():
    q, k, _ = qkv(L=6, S=6)
    w = attention_weights(q, k, is_causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6))
    assert torch.all(w.triu(1) == 0)


def test_mask_and_is_causal_together_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="not both"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool),
                                     is_causal=True)


def test_rope_equals_complex_rotation():
    torch.manual_seed(0)
    T, D, theta = 7, 8, 10000.0
    x = torch.randn(2, 3, T, D, dtype=torch.float64)
    pos = torch.arange(T)
    cos, sin = rope_cos_sin(pos, D, theta, dtype=torch.float64)
    ours = apply_rope(x, cos, sin)
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # theta_i
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), pos[:, None] * freqs)
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, T, D // 2, 2)) * rot)
    torch.testing.assert_close(ours, expected.reshape(2, 3, T, D))


def test_rope_rotates_strided_views_and_low_precision_like_the_pair_formula():
    """q and k are strided views of the fused projection (odd storage offsets too); bf16 is
    rotated in float32. The reference is the real-valued rotation of each pair."""
    torch.manual_seed(0)
    B, T, H, D = 2, 5, 3, 8
    fused = torch.randn(B, T, 1 + 2 * H * D, dtype=torch.float64)[..., 1:]  # odd offset
    cos, sin = rope_cos_sin(torch.arange(T), D, dtype=torch.float64)
    for x in fused.view(B, T, 2 * H, D).transpose(1, 2).split(H, dim=1):   # (B, H, T, D)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        pairs = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        torch.testing.assert_close(apply_rope(x, cos, sin), pairs)
        low = apply_rope(x.bfloat16(), cos.bfloat16(), sin.bfloat16())
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low, pairs.bfloat16(), atol=0.05, rtol=0.02)


def test_rope_keeps_norms_and_position_zero():
    x = torch.randn(4, 16)
    cos, sin = rope_cos_sin(torch.arange(4), 16)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[0], x[0])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    D = 16
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def score(m, n):
        cos, sin = rope_cos_sin(torch.tensor([m, n]), D, dtype=torch.float64)
        rq, rk = apply_rope(torch.stack([q, k]), cos, sin)
        return float(rq @ rk)

    assert math.isclose(score(3, 1), score(10, 8), rel_tol=1e-5)
    assert math.isclose(score(0, 5), score(20, 25), rel_tol=1e-5)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)


def test_rope_per_sequence_positions_broadcast_over_heads():
    x = torch.randn(2, 3, 4, 8)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    cos, sin = rope_cos_sin(pos, 8)
    y = apply_rope(x, cos, sin)
    for b in range(2):
        cb, sb = rope_cos_sin(pos[b], 8)
        torch.testing.assert_close(y[b], apply_rope(x[b], cb, sb))


@pytest.mark.parametrize("H_kv", [3, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_attention_equals_scratch_with_gqa_and_dropout_off(H_kv, causal):
    q, _, _ = qkv(H=3, L=4, S=6)
    _, k, v = qkv(H=H_kv, L=4, S=6, seed=2)
    mask = None if causal else decode_mask(2, 4)
    kw = dict(is_causal=mask is None, enable_gqa=H_kv != 3)
    torch.testing.assert_close(torch_attention(q, k, v, mask, **kw),
                               scaled_dot_product_attention(q, k, v, mask, **kw))


@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_short_bf16_attention_runs_in_fp32_even_under_autocast(mask):
    q, k, v = (t.bfloat16().requires_grad_() for t in qkv(L=4, S=6))
    m = {None: None, "bool": decode_mask(2, 4)}.get(mask, torch.zeros(4, 6, dtype=torch.bfloat16))
    kw = dict(is_causal=m is None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch_attention(q, k, v, m, **kw)
    m32 = m.float() if m is not None and m.is_floating_point() else m
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), m32, **kw)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.bfloat16())
    y.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_long_bf16_attention_keeps_torchs_bf16_kernel(monkeypatch):
    import minigpt.attention as attention
    monkeypatch.setattr(attention, "CPU_BF16_FP32_BELOW", 6)  # 6 keys count as long
    q, k, v = (t.bfloat16() for t in qkv(L=4, S=6))
    m = decode_mask(2, 4)
    torch.testing.assert_close(torch_attention(q, k, v, m),
                               F.scaled_dot_product_attention(q, k, v, m), rtol=0, atol=0)


def test_repeat_kv_repeats_each_head_for_its_group():
    k = torch.arange(2.0).view(1, 2, 1, 1).expand(1, 2, 3, 4)   # head h holds h
    assert repeat_kv(k, 6)[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert repeat_kv(k, 2) is k


def test_decode_mask_lets_query_i_see_the_past_and_itself():
    assert decode_mask(0, 5) is None  # nothing cached: plain causal attention
    assert decode_mask(3, 1).tolist() == [[True] * 4]
    assert decode_mask(2, 2).tolist() == [[True, True, True, False], [True] * 4]
    # the same as the bottom-right corner of a causal mask over past + new positions
    full = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(decode_mask(4, 3), full[4:])


def test_split_heads_gives_head_h_the_channel_slice_h():
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    for h in range(3):
        assert torch.equal(heads[:, h], x[..., 4 * h : 4 * (h + 1)])


def test_causal_attention_with_equal_scores_is_the_running_mean():
    # chapter 3's derivation: a masked softmax of equal scores averages the visible past
    _, k, v = qkv(L=6, S=6)
    out = scaled_dot_product_attention(torch.zeros_like(k), k, v, is_causal=True)
    running_mean = v.cumsum(dim=-2) / torch.arange(1, 7).view(6, 1)
    torch.testing.assert_close(out, running_mean)


@pytest.mark.parametrize("C, n_head", [(128, 4), (256, 8)])
def test_fresh_gpt_queries_and_keys_have_variance_0004_C(C, n_head):
    # GPT-2 init (weights N(0, 0.02^2)) on a unit-variance LayerNorm output: Var = 0.0004 C,
    # not Vaswani's unit variance; chapter 3 quotes this
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=1, n_head=n_head, n_embd=C))
    idx = torch.randint(0, 65, (8, 64), generator=torch.Generator().manual_seed(0))
    block = model.transformer.h[0]
    with torch.no_grad():
        x = block.ln_1(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(64)))
        q, k, _ = block.attn.heads(x)
    assert abs(q.var().item() / (0.0004 * C) - 1) < 0.1
    assert abs(k.var().item() / (0.0004 * C) - 1) < 0.1
