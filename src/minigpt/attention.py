"""Attention: scaled dot-product attention from scratch, rotary positions, the KV cache, and
causal multi-head self-attention (chapter 3).

``scaled_dot_product_attention`` is the teaching version, tested equal to
``torch.nn.functional.scaled_dot_product_attention``; ``CausalSelfAttention`` uses the torch
kernel on its fast path (``attn_impl="sdpa"``) and this one with ``attn_impl="scratch"``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from minigpt.model import GPTConfig

# torch >= 2.5 repeats key/value heads inside its SDPA kernel (grouped-query attention).
_TORCH_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention_weights(
    q: Tensor,
    k: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) over the keys: shape (..., L, S), each row sums to 1.

    ``mask`` is boolean (True means "may attend", as in torch's SDPA) or an additive float mask;
    ``is_causal`` lets query i see keys 0..i (top-left aligned, like torch). ``scale`` defaults to
    1/sqrt(head_dim).
    """
    if is_causal and mask is not None:
        raise ValueError("pass either mask or is_causal=True, not both (as torch's SDPA)")
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        L, S = scores.shape[-2:]
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    return torch.softmax(scores, dim=-1)


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
    """Attention from scratch: softmax(q k^T / sqrt(d) + mask) v, same semantics as torch's SDPA.

    q: (..., H, L, D), k and v: (..., H_kv, S, D). With ``enable_gqa`` each key/value head serves
    H / H_kv consecutive query heads (grouped-query attention); otherwise H_kv must equal H.
    """
    if enable_gqa and k.size(-3) != q.size(-3):
        groups = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    weights = attention_weights(q, k, mask, is_causal, scale)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


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
    (B, H, T, D) a per-sequence (B, T, D/2) table is broadcast over the heads. In complex numbers:
    (x[2i] + i x[2i+1]) * e^(i angle).
    """
    if cos.dim() == 3 and x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


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

    def mask(self, n_new: int, device: torch.device | str | None = None
             ) -> tuple[Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for SDPA over the cache plus ``n_new`` new queries.

        Empty cache: plain causal attention. One new query sees every slot (no mask).
        Otherwise query i sits at slot ``length + i`` and sees slots 0 .. length + i.
        """
        if self.length == 0:
            return None, True
        if n_new == 1:
            return None, False
        ones = torch.ones(n_new, self.length + n_new, dtype=torch.bool, device=device)
        return ones.tril(self.length), False

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
    """Masked multi-head self-attention with a fused q/k/v projection (GPT-2's ``c_attn``).

    Supports grouped-query attention (``n_kv_head`` < ``n_head``: each key/value head is shared
    by a group of query heads), rotary positions and a KV cache.
    """

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        kv_dim = self.n_kv_head * self.head_dim
        self.split_sizes = (config.n_embd, kv_dim, kv_dim)
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = dropout_layer(config.dropout)

    def _qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """Project x (B, T, C) to q (B, H, T, D) and k, v (B, H_kv, T, D), rotated if ``rope``."""
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x, rope)
        mask, is_causal = None, True
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.update(self.layer_idx, k, v)
            if past > 0:  # query i sits at slot past + i and may see slots 0 .. past + i
                is_causal = False
                if T > 1:
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if self.attn_impl == "scratch":
            y = scaled_dot_product_attention(
                q, k, v, mask, is_causal, dropout_p=dropout_p, enable_gqa=gqa
            )
        else:
            if gqa and not _TORCH_SDPA_GQA:
                groups = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            extra = {"enable_gqa": True} if gqa and _TORCH_SDPA_GQA else {}
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, **extra
            )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def attention_map(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The causal attention weights (B, H, T, T) this layer computes for its input x."""
        q, k, _ = self._qkv(x, rope)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return attention_weights(q, k, is_causal=True)
