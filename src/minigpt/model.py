"""The GPT model: configuration, MLP, Transformer block, and the decoder-only stack (chapter 4).

Design choices:

* GPT-2 by default (learned positions, pre-LayerNorm blocks, GELU MLP, tied LM head), with
  the modern variants as config switches: RMSNorm, SwiGLU, rotary positions (RoPE) and
  grouped-query attention. Attention itself lives in ``minigpt.attention``.
* Module and parameter names follow Hugging Face's GPT-2, so loading its weights is a
  rename plus a transpose.
* ``GPT.forward`` validates shapes and dtypes in one call (``_check_inputs``) and never
  waits for the device: token ids are not range-checked here (that would be a
  device-to-host sync per step); the data loader, ``generate`` and the CLI check them.
* The trunk computes positions, rotary angles and the decoding mask once per forward and
  hands them to every block; ``mask=None`` means plain causal attention.
* A KV cache is passed down to each attention layer, which stores its keys and values
  with one call; the model advances the cache after the last layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.attention import (
    CausalSelfAttention,
    KVCache,
    Rope,
    apply_rope,
    attention_weights,
    dropout_layer,
    rope_cos_sin,
    scaled_dot_product_attention,
)

__all__ = [
    "GPT",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "KVCache",
    "RMSNorm",
    "apply_rope",
    "attention_weights",
    "gpt2_config",
    "param_count",
    "rope_cos_sin",
    "scaled_dot_product_attention",
]

_CHOICES = {
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu"),
    "pos_emb": ("learned", "rope"),
    "attn_impl": ("sdpa", "scratch"),
    "gelu_approx": ("tanh", "none"),
}


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class ConfigError(ValueError):
    """A model configuration with an unknown key or a value of the wrong type or range."""


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT; invalid values raise a ValueError when the config is built."""

    vocab_size: int = 50304
    block_size: int = 1024  # maximum context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    n_kv_head: int | None = None  # grouped-query attention; None means n_head
    norm: str = "layernorm"  # or "rmsnorm"
    mlp: str = "gelu"  # or "swiglu"
    pos_emb: str = "learned"  # or "rope"
    rope_theta: float = 10000.0
    attn_impl: str = "sdpa"  # or "scratch" (the from-scratch attention, equal outputs)
    mlp_hidden: int | None = None  # None: 4*n_embd (gelu), 8/3*n_embd rounded up to 64 (swiglu)
    gelu_approx: str = "tanh"  # GPT-2's tanh approximation, or "none": the exact (erf) GELU

    def __post_init__(self) -> None:
        """Check every field's type and range; raise ``ConfigError`` naming the field."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false (a bool), got {self.bias!r}")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("dropout", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be finite, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                "(each head gets n_embd // n_head dimensions)"
            )
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                "(each key/value head serves n_head // n_kv_head query heads)"
            )
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} is odd")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_head``, or ``n_head`` when that is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden layer."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "swiglu":  # keeps the parameter count of a 4x GELU MLP (three matrices)
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build a config from ``to_dict()`` output (e.g. a config.json's ``"model"`` entry).

        Strict: unknown keys and values of the wrong type or range raise ``ConfigError`` (a
        ``ValueError``) naming the key; missing keys take their defaults.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a JSON object (dict), got {d!r:.60}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ConfigError(
                f"unknown GPTConfig keys {unknown}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**d)


_GPT2_SIZES = {  # name: (n_layer, n_head, n_embd), Radford et al. 2019
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


def gpt2_config(name: str, **overrides) -> GPTConfig:
    """The configuration of a released GPT-2 model ("gpt2", "gpt2-medium", "-large", "-xl")."""
    if name not in _GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 model {name!r}; choose one of {list(_GPT2_SIZES)}")
    n_layer, n_head, n_embd = _GPT2_SIZES[name]
    kwargs = dict(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head,
                  n_embd=n_embd, dropout=0.0, bias=True)
    return GPTConfig(**{**kwargs, **overrides})


def param_count(config: GPTConfig, non_embedding: bool = True) -> int:
    """Number of parameters of ``GPT(config)``, by formula (nothing is allocated).

    Same convention as ``GPT.num_params``: ``non_embedding`` leaves out the position table; the
    token table stays, because (tied) it is also the output layer's weight.
    """
    C, V, b = config.n_embd, config.vocab_size, config.bias
    norm = C + (C if b and config.norm == "layernorm" else 0)
    qkv = C + 2 * config.kv_heads * config.head_dim
    attn = C * qkv + C * C + ((qkv + C) if b else 0)
    H = config.hidden_dim
    n_in = 2 if config.mlp == "swiglu" else 1
    mlp = n_in * C * H + H * C + ((n_in * H + C) if b else 0)
    total = V * C + config.n_layer * (2 * norm + attn + mlp) + norm
    if config.pos_emb == "learned" and not non_embedding:
        total += config.block_size * C
    return total


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): x / rms(x) * weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()                                      # (..., C), in float32
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def _norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class MLP(nn.Module):
    """Position-wise feed-forward net: GELU (GPT-2) or SwiGLU (Shazeer 2020)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        H = config.hidden_dim
        self.swiglu = config.mlp == "swiglu"
        self.approximate = config.gelu_approx
        self.c_fc = nn.Linear(config.n_embd, H, bias=config.bias)
        if self.swiglu:
            self.c_gate = nn.Linear(config.n_embd, H, bias=config.bias)
        self.c_proj = nn.Linear(H, config.n_embd, bias=config.bias)
        self.dropout = dropout_layer(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.swiglu:  # silu(x W_gate) * (x W_fc): (B, T, H)
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:            # gelu(x W_fc): (B, T, H), H = 4C for GPT-2
            h = F.gelu(self.c_fc(x), approximate=self.approximate)
        return self.dropout(self.c_proj(h))                 # back to (B, T, C)


class Block(nn.Module):
    """A pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: Rope | None = None,
        kv_cache: KVCache | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C); rope, kv_cache and mask go to the attention."""
        x = x + self.attn(self.ln_1(x), rope, kv_cache, mask)
        return x + self.mlp(self.ln_2(x))


_ID_DTYPES = (torch.long, torch.int32, torch.int16, torch.uint8, torch.int8)


class GPT(nn.Module):
    """A decoder-only Transformer language model (GPT-2 layout)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = dropout_layer(config.dropout)
        modules["h"] = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        modules["ln_f"] = _norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # GPT-2: scale residual projections
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: Tensor | None,
        targets: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        inputs_embeds: Tensor | None = None,
        positions: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T), and the loss if targets are given.

        Token ids must lie in [0, vocab_size): they are not range-checked here, because
        the check would wait for the device on every step; the data loader, ``generate``
        and the CLI check them. The loss is the mean cross-entropy over the targets that
        are not -100. ``inputs_embeds`` (B, T, C) replaces the token embeddings (prompt
        tuning); ``positions`` (T,) or (B, T) replaces the default positions (cache
        length + 0..T-1); ``kv_cache`` appends the new keys/values and attends to the
        cached ones; ``last_only`` gives the logits of the last position only.
        """
        self._check_inputs(idx, inputs_embeds, kv_cache, positions, targets, last_only)
        x = self._trunk(idx, inputs_embeds, kv_cache, positions)    # (B, T, C)
        if last_only:
            x = x[:, -1:, :]                                        # (B, 1, C)
        logits = self.lm_head(x)                                    # (B, T, V)
        if targets is None:
            return logits, None
        V = logits.size(-1)
        loss = F.cross_entropy(logits.view(-1, V), targets.reshape(-1),
                               ignore_index=-100)           # mean over targets != -100
        return logits, loss

    def _trunk(
        self,
        idx: Tensor | None,
        inputs_embeds: Tensor | None,
        kv_cache: KVCache | None,
        positions: Tensor | None,
    ) -> Tensor:
        """Embeddings, the blocks and the final norm: (B, T, C) hidden states."""
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = 0 if kv_cache is None else kv_cache.length      # tokens already cached
        if positions is None:
            positions = torch.arange(past, past + T, device=x.device)   # (T,)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(positions)            # (B, T, C) + (T, C)
        else:                                                  # cos, sin: (T, D/2)
            rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta,
                                x.dtype)
        mask = None if kv_cache is None else kv_cache.mask(T, x.device)  # None: causal
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(T)                                # now cached too
        return self.transformer.ln_f(x)

    def _check_inputs(
        self,
        idx: Tensor | None,
        inputs_embeds: Tensor | None,
        kv_cache: KVCache | None,
        positions: Tensor | None,
        targets: Tensor | None = None,
        last_only: bool = False,
    ) -> None:
        """Raise a ValueError for inputs ``forward`` cannot use (shapes and dtypes only:
        nothing here waits for the device, except explicit ``positions``)."""
        B, T = self._check_tokens(idx, inputs_embeds)
        if T == 0:
            raise ValueError("the input sequence is empty (time dimension 0)")
        if kv_cache is not None:
            kv_cache.check_append(B, T)
        elif T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; crop "
                "the input to its last block_size tokens, e.g. idx[:, -block_size:]"
            )
        past = 0 if kv_cache is None else kv_cache.length
        self._check_positions(B, T, past, positions)
        if targets is not None and last_only:
            raise ValueError("last_only=True gives no loss; pass targets=None")
        if targets is not None and tuple(targets.shape) != (B, T):
            raise ValueError(
                f"targets must have shape {(B, T)} (one id per input position), "
                f"got {tuple(targets.shape)}"
            )

    def _check_tokens(self, idx: Tensor | None, inputs_embeds: Tensor | None) -> tuple[int, int]:
        """Check the shape and dtype of idx (B, T) or inputs_embeds (B, T, C); return B, T."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds (vectors)")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.size(-1) != self.config.n_embd:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, time, {self.config.n_embd}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds.shape[0], inputs_embeds.shape[1]
        if idx.dim() != 2:
            raise ValueError(
                f"idx must have shape (batch, time), got {tuple(idx.shape)}; "
                "for a single sequence use idx[None] (or idx.unsqueeze(0))"
            )
        if idx.dtype not in _ID_DTYPES:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        return idx.shape[0], idx.shape[1]

    def _check_positions(self, B: int, T: int, past: int, positions: Tensor | None) -> None:
        """Positions must fit the learned position table (RoPE needs no table)."""
        cfg = self.config
        if positions is None:
            if cfg.pos_emb == "learned" and past + T > cfg.block_size:
                raise ValueError(
                    f"positions {past}..{past + T - 1} exceed block_size={cfg.block_size}: "
                    "learned position embeddings stop there; keep at most block_size tokens "
                    "(crop the context, or reset the KV cache and re-prefill the last tokens)"
                )
            return
        if positions.shape not in ((T,), (B, T)):
            raise ValueError(
                f"positions must have shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}"
            )
        if positions.is_floating_point():
            raise ValueError("positions must be integers")
        lo, hi = int(positions.min()), int(positions.max())  # explicit positions only
        if lo < 0 or (cfg.pos_emb == "learned" and hi >= cfg.block_size):
            raise ValueError(
                f"positions must be in [0, {cfg.block_size - 1}] for learned position embeddings "
                f"(non-negative for RoPE), got min {lo}, max {hi}"
            )

    def hidden_states(
        self,
        idx: Tensor | None,
        *,
        inputs_embeds: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """The final hidden states (B, T, C), after ``ln_f`` (input of classification heads)."""
        self._check_inputs(idx, inputs_embeds, None, positions)
        return self._trunk(idx, inputs_embeds, None, positions)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (the tied token table counted once).

        ``non_embedding`` leaves out the position table (a lookup, no arithmetic); the token
        table stays, because (tied) it is also the weight of the output layer's matmul.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at context length ``seq_len``.

        6N for the weights (N = ``num_params()``; each weight does a multiply-add, 2
        FLOPs, in the forward pass and twice that in the backward pass) plus
        12 * n_layer * n_embd * seq_len for the attention scores and weighted sums
        (q k^T and a v: 2 * 2 * n_embd * seq_len FLOPs per token and layer forward,
        times 3 with backward), counting the full T x T score matrix as Chowdhery et
        al. 2022 (PaLM, appendix B) do. ``seq_len`` defaults to block_size.
        """
        T = self.config.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    @torch.no_grad()
    def crop_block_size(self, block_size: int) -> None:
        """Shrink the maximum context (e.g. to fine-tune a pretrained model on short inputs)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in [1, {self.config.block_size}]")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        if "wpe" in self.transformer:
            wpe = self.transformer.wpe
            wpe.weight = nn.Parameter(wpe.weight[:block_size].clone())
            wpe.num_embeddings = block_size
