"""Attention: scaled dot-product attention from scratch, rotary positions, the KV cache, and
causal multi-head self-attention (chapter 3).

Design choices:

* ``scaled_dot_product_attention`` is the teaching version, written with plain tensor
  operations and tested equal to ``torch.nn.functional.scaled_dot_product_attention``;
  ``CausalSelfAttention`` calls it with ``attn_impl="scratch"`` and torch's fused kernel
  (``torch_attention``, same signature) otherwise. Both give the same outputs.
* Masks follow torch: boolean (True = may attend) or additive float; ``is_causal`` is
  top-left aligned. Inside the model ``mask=None`` means "causal"; only decoding with a
  filled KV cache needs an explicit mask (``decode_mask``).
* Grouped-query attention stores ``n_kv_head`` key/value heads; ``repeat_kv`` repeats them
  for their groups of query heads where a kernel cannot share them itself.
* Rotary positions (``rope_cos_sin``, ``apply_rope``) turn q and k after the projection;
  the model computes the angles once per forward and hands them to every layer.
* Each attention layer talks to the KV cache through one call with its ``layer_idx``;
  the cache owns its buffers.
* Argument checks live in small ``_check_*`` helpers, so the displayed functions show the
  algorithm.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from minigpt.model import GPTConfig

Rope = tuple[Tensor, Tensor]  # (cos, sin) from rope_cos_sin, shape (T, D/2) or (B, T, D/2)

# torch >= 2.5 repeats key/value heads inside its SDPA kernel (grouped-query attention).
_TORCH_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
# torch's CPU flash kernel has a high fixed cost per (batch, head) in its bfloat16 backward:
# below this many keys its fp32 kernel is faster, casts included (bench/attention_bf16.py).
CPU_BF16_FP32_BELOW = 512


def _check_mask(mask: Tensor | None, is_causal: bool) -> None:
    if is_causal and mask is not None:
        raise ValueError("pass either mask or is_causal=True, not both (as torch's SDPA)")


def attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) over the keys: (..., L, S), each row sums to 1.

    q: (..., L, D), k: (..., S, D). ``mask`` is boolean (True = may attend, as in
    torch's SDPA) or additive (float); ``is_causal`` lets query i see keys 0..i
    (top-left aligned, like torch). ``scale`` defaults to 1/sqrt(D).
    """
    _check_mask(mask, is_causal)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale                  # (..., L, S)
    if is_causal:
        L, S = scores.shape[-2:]
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))      # blocked: weight 0
    elif mask is not None:
        scores = scores + mask                                  # additive mask
    return torch.softmax(scores, dim=-1)                        # over the keys


def repeat_kv(x: Tensor, n_head: int) -> Tensor:
    """Grouped-query attention: repeat each of the H_kv heads of x (..., H_kv, S, D) for
    its group of n_head / H_kv consecutive query heads, giving (..., n_head, S, D)."""
    groups = n_head // x.size(-3)
    return x if groups == 1 else x.repeat_interleave(groups, dim=-3)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention from scratch: softmax(q k^T / sqrt(D) + mask) v, as torch's SDPA.

    q: (..., H, L, D), k and v: (..., H_kv, S, D). With ``enable_gqa`` each key/value
    head serves H / H_kv consecutive query heads (grouped-query attention); otherwise
    H_kv must equal H.
    """
    if enable_gqa:
        k, v = repeat_kv(k, q.size(-3)), repeat_kv(v, q.size(-3))   # (..., H, S, D)
    weights = attention_weights(q, k, mask, is_causal, scale)       # (..., H, L, S)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v                                              # (..., H, L, D)


def torch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
) -> Tensor:
    """torch's fused ``F.scaled_dot_product_attention`` behind the signature of
    ``scaled_dot_product_attention`` (the model's fast path); repeats the key/value heads
    itself on torch < 2.5, whose kernel cannot share them."""
    extra = {}
    if enable_gqa and _TORCH_SDPA_GQA:
        extra["enable_gqa"] = True
    elif enable_gqa:
        k, v = repeat_kv(k, q.size(-3)), repeat_kv(v, q.size(-3))
    short_bf16 = (q.device.type == "cpu" and q.dtype == torch.bfloat16
                  and k.size(-2) < CPU_BF16_FP32_BELOW)
    if short_bf16:  # compute in fp32 (outside autocast, which would cast back to bf16)
        q, k, v = q.float(), k.float(), v.float()
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    with torch.autocast("cpu", enabled=False) if short_bf16 else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=is_causal, scale=scale, **extra)
    return y.to(torch.bfloat16) if short_bf16 else y


# GPTConfig.attn_impl -> the attention function CausalSelfAttention calls
ATTENTION_IMPLS = {"sdpa": torch_attention, "scratch": scaled_dot_product_attention}


def decode_mask(past: int, n_new: int, device: torch.device | str | None = None) -> Tensor | None:
    """Boolean mask (n_new, past + n_new) for new queries after ``past`` cached tokens:
    query i sits at slot past + i and may see slots 0 .. past + i. None when nothing is
    cached: then plain causal attention (``is_causal=True``) is the same thing."""
    if past == 0:
        return None
    return torch.ones(n_new, past + n_new, dtype=torch.bool, device=device).tril(past)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Rotation angles of rotary position embeddings (Su et al. 2021) for integer ``positions``.

    Pair i of a head vector turns by angle position * theta^(-2i/head_dim). Returns cos and sin of
    shape positions.shape + (head_dim // 2,).
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    dtype = dtype or torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each consecutive pair (x[2i], x[2i+1]) of x (..., T, D) by the angles in cos/sin.

    cos and sin have shape (T, D/2) or (B, T, D/2) (as from ``rope_cos_sin``); for x of shape
    (B, H, T, D) a per-sequence (B, T, D/2) table is broadcast over the heads. Each pair is
    read as a complex number and multiplied: (x[2i] + i x[2i+1]) * (cos + i sin). One complex
    product costs a fraction of the four real products on strided halves of x it replaces.
    """
    if cos.dim() == 3 and x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    real = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    pairs = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)).contiguous())  # (..., D/2)
    turned = pairs * torch.complex(cos.to(real), sin.to(real))                     # rotate
    return torch.view_as_real(turned).flatten(-2).to(x.dtype)                      # (..., D)


def split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, n_head * D) -> (B, n_head, T, D): each head becomes a batch dimension (a view)."""
    B, T, _ = x.shape
    return x.view(B, T, n_head, -1).transpose(1, 2)


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity()`` when p is 0, which is cheaper to call (decoding
    calls every module once per generated token)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding; it owns its tensors.

    A forward pass of ``GPT`` with ``kv_cache=cache`` over T new tokens calls
    ``check_append(B, T)``; in every layer ``update(layer, k, v)`` stores the new keys and
    values at slots ``length .. length + T - 1`` and returns all cached ones, which the new
    queries attend to as ``mask(T)`` says; then ``advance(T)`` counts the T slots as used.
    Decoders ``reset()`` the cache when the context window slides (positions restart at 0)
    and ``reorder(rows)`` it between beam-search steps; nothing else touches its tensors.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.n_layer = config.n_layer
        self.batch_size = batch_size
        self.max_len = max_len
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        dtype = dtype or torch.get_default_dtype()
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # slots in use

    def reset(self) -> None:
        """Forget all cached tokens (the buffers are reused)."""
        self.length = 0

    def check_append(self, batch_size: int, n_new: int) -> None:
        """Raise a ValueError unless ``n_new`` tokens of ``batch_size`` sequences fit."""
        if batch_size != self.batch_size:
            raise ValueError(
                f"the KV cache was built for batch_size={self.batch_size}, got {batch_size}; "
                "build a KVCache with the batch size you decode with"
            )
        if self.length + n_new > self.max_len:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {n_new} new tokens > "
                f"max_len={self.max_len}; reset() the cache and re-prefill the last tokens "
                "(sliding window), or build a larger cache"
            )

    def mask(self, n_new: int, device: torch.device | str | None = None) -> Tensor | None:
        """Mask for ``n_new`` queries after the cached tokens (``decode_mask``); None: causal."""
        return decode_mask(self.length, n_new, device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values (B, H_kv, T, D) of ``layer``; return all cached ones so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_new: int) -> None:
        """Mark the ``n_new`` slots written by ``update`` as used (after the last layer)."""
        self.length += n_new

    def reorder(self, rows: Tensor) -> None:
        """Row i of every layer continues row ``rows[i]`` (beam search keeps the best beams)."""
        n = self.length
        self.k[:, :, :, :n] = self.k[:, rows, :, :n]
        self.v[:, :, :, :n] = self.v[:, rows, :, :n]


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention, q/k/v from one fused projection (``c_attn``).

    ``n_kv_head < n_head`` gives grouped-query attention: k and v get fewer heads, each
    shared by a group of query heads. ``rope`` = (cos, sin) rotates q and k.
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx                  # this layer's slot in a KV cache
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.dropout = config.dropout
        self.attend = ATTENTION_IMPLS[config.attn_impl]  # same function, two kernels
        C, kv_dim = config.n_embd, self.n_kv_head * config.head_dim
        self.split_sizes = (C, kv_dim, kv_dim)
        self.c_attn = nn.Linear(C, C + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = dropout_layer(config.dropout)

    def heads(self, x: Tensor, rope: Rope | None = None) -> tuple[Tensor, ...]:
        """Project x (B, T, C) to q (B, H, T, D) and k, v (B, H_kv, T, D)."""
        C, C_kv, _ = self.split_sizes
        qk, v = self.c_attn(x).split((C + C_kv, C_kv), dim=2)   # (B, T, C+C_kv | C_kv)
        qk = split_heads(qk, self.n_head + self.n_kv_head)       # (B, H + H_kv, T, D)
        if rope is not None:                                     # rotary positions:
            qk = apply_rope(qk, *rope)                           # q and k in one call
        q, k = qk.split((self.n_head, self.n_kv_head), dim=1)    # (B, H | H_kv, T, D)
        return q, k, split_heads(v, self.n_kv_head)

    def forward(
        self,
        x: Tensor,
        rope: Rope | None = None,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C); mask None means causal (see ``decode_mask``)."""
        B, T, C = x.shape
        q, k, v = self.heads(x, rope)               # project, split heads, rotate
        if kv_cache is not None:                    # k, v: (B, H_kv, S, D), past + new
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = self.attend(q, k, v, mask, is_causal=mask is None,
                        dropout_p=self.dropout if self.training else 0.0,
                        enable_gqa=self.n_kv_head != self.n_head)   # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)      # merge the heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def attention_map(self, x: Tensor, rope: Rope | None = None) -> Tensor:
        """The causal attention weights (B, H, T, T) of this layer for its input x."""
        q, k, _ = self.heads(x, rope)
        return attention_weights(q, repeat_kv(k, self.n_head), is_causal=True)
