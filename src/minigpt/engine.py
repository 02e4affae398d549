"""A lean decoding engine: one new token per row per call, no module calls (chapters 6, 9).

After the prompt is in the KV cache, each generated token costs one matrix-vector product
per weight matrix plus attention over the cached keys. ``GPT.forward`` spends most of a
small model's step in Python (about fifty module calls per token, input checks, masks);
for a large one the products dominate. Design choices:

- ``step(ids, cache)`` is plain tensor functions over the model's weights and the same
  ``KVCache`` the model fills in the prefill: the new token attends to every cached slot,
  so no mask is needed. Its logits equal ``GPT.forward``'s to float rounding (tested).
- ``transposed=True`` first copies each Linear weight from (out, in) to a contiguous
  (in, out): ``x @ W`` then streams W row by row, which the matrix-vector kernel of the CPU
  we measured reads faster than ``F.linear``'s layout (GPT-2's 50257 x 768 output layer:
  1.6-1.7x, AMD EPYC; ``bench/generate_speed.py``). The copy costs memory (the matrices
  again) and time (for GPT-2 small about what 60 decoding steps save), so ``generate``
  asks for it only when it decodes at least ``TRANSPOSE_MIN_STEPS`` steps; otherwise the
  engine computes with the model's own tensors and copies nothing.
- Every ``GPTConfig`` variant is supported (LayerNorm/RMSNorm, GELU/SwiGLU, learned/rotary
  positions, grouped-query attention). A model whose modules were replaced (LoRA,
  adapters, int8) is not: ``supports(model)`` says so and ``generate`` keeps the module
  path.
- ``generate`` builds a fresh engine per call and drops it at the end, so a copy can never
  go stale (a fused optimiser step changes weights without bumping their version counters,
  so no cheap test could tell that a kept copy is out of date).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.attention import KVCache, apply_rope, rope_cos_sin, torch_attention
from minigpt.model import GPT, MLP, Block, CausalSelfAttention, RMSNorm

__all__ = ["TRANSPOSE_MIN_STEPS", "Engine", "supports"]

TRANSPOSE_MIN_STEPS = 64  # decoding steps from which the transposed copy pays (GPT-2 small)

_KNOWN = (GPT, Block, CausalSelfAttention, MLP, nn.Linear, nn.LayerNorm, RMSNorm,
          nn.Embedding, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Dropout)


def supports(model: nn.Module) -> bool:
    """Whether ``Engine`` can run ``model``: a ``GPT`` built only of its own module types."""
    return isinstance(model, GPT) and all(type(m) in _KNOWN for m in model.modules())


@dataclass
class _Linear:
    w: Tensor  # (in, out) contiguous if transposed, else the layer's own (out, in)
    b: Tensor | None
    transposed: bool

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None, transposed: bool) -> _Linear:
        w = weight.detach()
        b = None if bias is None else bias.detach()
        return cls(w.t().contiguous() if transposed else w, b, transposed)

    def __call__(self, x: Tensor) -> Tensor:          # x (B, in) -> (B, out)
        if not self.transposed:
            return F.linear(x, self.w, self.b)
        return x @ self.w if self.b is None else torch.addmm(self.b, x, self.w)


Norm = Callable[[Tensor], Tensor]  # a norm's math without the module call


def _norm(module: nn.Module) -> Norm:
    """LayerNorm as one ``F.layer_norm`` call on its detached tensors (half the time of
    the module's forward for one token); RMSNorm's own forward."""
    if not isinstance(module, nn.LayerNorm):
        return module.forward
    w, b = (None if t is None else t.detach() for t in (module.weight, module.bias))
    return functools.partial(F.layer_norm, normalized_shape=module.normalized_shape,
                             weight=w, bias=b, eps=module.eps)


@dataclass
class _Layer:
    ln_1: Norm
    qkv: _Linear
    proj: _Linear
    ln_2: Norm
    fc: _Linear
    gate: _Linear | None  # SwiGLU only
    fc_proj: _Linear

    @classmethod
    def of(cls, block: Block, transposed: bool) -> _Layer:
        def linear(layer: nn.Linear) -> _Linear:
            return _Linear.of(layer.weight, layer.bias, transposed)

        mlp = block.mlp
        gate = linear(mlp.c_gate) if mlp.swiglu else None
        return cls(_norm(block.ln_1), linear(block.attn.c_attn), linear(block.attn.c_proj),
                   _norm(block.ln_2), linear(mlp.c_fc), gate, linear(mlp.c_proj))


class Engine:
    """The weights of a ``GPT`` laid out for one-token decoding steps (see the module doc)."""

    def __init__(self, model: GPT, transposed: bool = True) -> None:
        if not supports(model):
            raise TypeError("Engine runs a plain minigpt GPT; this model has replaced modules "
                            "(LoRA, adapters, int8): merge them first or decode with "
                            "generate(..., engine=False)")
        cfg, t = model.config, model.transformer
        self.config = cfg
        self.wte = t.wte.weight.detach()                          # (V, C)
        self.wpe = t.wpe.weight.detach() if "wpe" in t else None  # (block, C)
        self.layers = [_Layer.of(block, transposed) for block in t.h]
        self.ln_f = _norm(t.ln_f)
        self.head = _Linear.of(model.lm_head.weight, None, transposed)  # C -> V
        self.split = t.h[0].attn.split_sizes                       # C, C_kv, C_kv

    @torch.no_grad()
    def step(self, ids: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, V) for one new token per row, ids (B,), after those in ``cache``.

        Writes the token's keys and values into ``cache`` slot ``cache.length`` of every
        layer and advances it, exactly as ``GPT.forward(ids[:, None], kv_cache=cache)``.
        """
        cache.check_append(ids.size(0), 1)
        pos = cache.length
        x = self.wte[ids]                                          # (B, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe[pos]
        else:
            at = torch.tensor([pos], device=x.device)
            cfg = self.config
            rope = rope_cos_sin(at, cfg.head_dim, cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = x + self._attend(i, layer, layer.ln_1(x), cache, rope)
            x = x + layer.fc_proj(self._mlp(layer, layer.ln_2(x)))
        cache.advance(1)
        return self.head(self.ln_f(x))                             # (B, V)

    def _attend(self, i: int, layer: _Layer, h: Tensor, cache: KVCache,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """Attention of the new token (B, C) over layer i's cached slots and itself."""
        B, H, H_kv = h.size(0), self.config.n_head, self.config.kv_heads
        C, C_kv, _ = self.split
        qk, v = layer.qkv(h).split((C + C_kv, C_kv), dim=1)
        qk, v = qk.view(B, H + H_kv, 1, -1), v.view(B, H_kv, 1, -1)
        if rope is not None:
            qk = apply_rope(qk, *rope)                             # q and k in one call
        q, k = qk.split((H, H_kv), dim=1)                          # (B, H | H_kv, 1, D)
        keys, values = cache.update(i, k, v)                       # (B, H_kv, S, D)
        y = torch_attention(q, keys, values, enable_gqa=H_kv != H)  # (B, H, 1, D)
        return layer.proj(y.reshape(B, -1))

    def _mlp(self, layer: _Layer, h: Tensor) -> Tensor:
        if layer.gate is not None:
            return F.silu(layer.gate(h)) * layer.fc(h)
        return F.gelu(layer.fc(h), approximate=self.config.gelu_approx)

