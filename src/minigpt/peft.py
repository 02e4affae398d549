"""Parameter-efficient fine-tuning: adapt a frozen ``GPT`` by training few new parameters (ch. 7).

Each method wraps an existing model instance without touching ``minigpt.model``'s code:

* ``freeze_all_but_top`` trains only the top k blocks and the final norm (the
  "feature extraction" end of Howard & Ruder 2018's spectrum);
* ``add_lora`` replaces chosen ``nn.Linear`` layers by ``LoRALinear``: W x + (alpha/r) B A x with
  A (r, in) random, B (out, r) zero (Hu et al. 2021); ``merge_lora`` folds B A into W for
  inference, ``unmerge_lora`` takes it out again;
* ``add_adapters`` inserts a bottleneck ``Adapter`` after each block's attention and MLP
  (Houlsby et al. 2019): h + W_up gelu(W_down h), W_up zero-initialised;
* ``PromptTuning`` prepends n learned vectors to the token embeddings (Lester et al. 2021).

Design choices:

* All of them freeze every pre-existing parameter (``requires_grad=False``); the optimiser
  (``minigpt.optim.make_optimizer``) then sees only the new ones. A classification head put on
  top (``minigpt.finetune.GPTClassifier``) is always trained.
* LoRA and adapters start as the identity (B = 0, W_up = 0), so the wrapped model computes
  exactly what the base model does until the first update.
* ``remove_lora`` folds the updates in for good and puts the plain ``nn.Linear`` layers back:
  the result is an ordinary ``GPT`` with the base model's parameter names, saved and loaded
  like any other.
* Arguments are checked where a wrapper is built; ``forward`` only computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigpt.model import GPT, GPTConfig


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module``; return it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    seen = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in seen if p.requires_grad or not trainable_only)


def freeze_all_but_top(model: GPT, k: int) -> GPT:
    """Freeze ``model`` except its top ``k`` Transformer blocks and the final norm."""
    n = len(model.transformer.h)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}] (the model has {n} blocks), got {k}")
    freeze(model)
    for module in [*model.transformer.h[n - k :], model.transformer.ln_f]:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: Wx + b + (alpha/r) BAx.

    A (rank, in) starts Kaiming-uniform random and B (out, rank) at zero, so the layer
    starts equal to ``base``. For GPT-2's fused ``c_attn`` (q, k, v stacked: out = 3C)
    one LoRA pair gives a single rank-r update to the stacked matrix; Hu et al. adapt
    W_q and W_v separately.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = freeze(base)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear does
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """The update (alpha/r) B A, shaped like ``base.weight`` (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y + update * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha/r) B A: inference then costs what the base layer costs."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - (alpha/r) B A: base weights plus a separate update again."""
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def check_lora_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the ``nn.Linear`` layers whose names end with one of ``targets``; raise
    ``ValueError`` (listing the model's linear layers) if there are none."""
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.endswith(tuple(targets))]
    if not chosen:
        linears = sorted({n.split(".")[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear matches targets {targets}; the model's linear layers "
                         f"are named {linears}")
    return chosen


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
             targets: tuple[str, ...] = ("attn.c_attn",),
             dropout: float = 0.0) -> nn.Module:
    """Freeze ``model``; wrap every ``nn.Linear`` whose name ends with a target in LoRA.

    Targets are name suffixes: ``"attn.c_attn"`` (fused q/k/v), ``"attn.c_proj"``,
    ``"mlp.c_fc"``, ``"mlp.c_proj"``, or just ``"c_proj"`` for both projections.
    """
    chosen = check_lora_targets(model, targets)
    freeze(model)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), rank, alpha, dropout)
        setattr(parent, child, layer)
    return model


def _lora_layers(model: nn.Module) -> list[LoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA layers; call add_lora(model, ...) first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (same outputs, no extra inference cost)."""
    for layer in _lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: subtract each update from its base weight again."""
    for layer in _lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA update and put the plain ``nn.Linear`` back, in place.

    The result has the base model's parameter names (and no LoRA parameters), so it is saved
    and loaded like the model ``add_lora`` started from.
    """
    for layer in _lora_layers(model):
        layer.merge()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base)
    return model


class Adapter(nn.Module):
    """Houlsby et al.'s bottleneck: h + W_up gelu(W_down h + b_down) + b_up.

    W_up and b_up start at zero, so the adapter starts as the identity map.
    """

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapter starts as the identity map
        nn.init.zeros_(self.up.bias)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(F.gelu(self.down(h)))


class Adapted(nn.Module):
    """A sub-layer followed by an adapter: ``adapter(sublayer(*args))``, before the residual add."""

    def __init__(self, sublayer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.sublayer, self.adapter = sublayer, adapter

    def forward(self, *args, **kwargs) -> Tensor:
        return self.adapter(self.sublayer(*args, **kwargs))


def add_adapters(model: GPT, bottleneck: int = 16, train_norms: bool = True) -> GPT:
    """Freeze ``model``; put an ``Adapter`` after every block's attention and MLP.

    As Houlsby et al. do, the LayerNorms are trained too unless ``train_norms=False``.
    """
    freeze(model)
    C = model.config.n_embd
    for block in model.transformer.h:
        if isinstance(block.attn, Adapted):
            raise ValueError("the model already has adapters")
        block.attn = Adapted(block.attn, Adapter(C, bottleneck))
        block.mlp = Adapted(block.mlp, Adapter(C, bottleneck))
        if train_norms:
            for p in [*block.ln_1.parameters(), *block.ln_2.parameters()]:
                p.requires_grad_(True)
    if train_norms:
        for p in model.transformer.ln_f.parameters():
            p.requires_grad_(True)
    return model


class PromptTuning(nn.Module):
    """A frozen GPT behind ``n_prompt`` learned input vectors (a "soft prompt").

    The prompt occupies positions 0..n_prompt-1 and the text follows it, so a text of T
    tokens needs n_prompt + T <= block_size. The vectors start as the embeddings of
    randomly drawn vocabulary tokens (Lester et al. found this better than random
    vectors). ``forward`` and ``hidden_states`` return outputs for the text positions
    only, like the base model's.
    """

    def __init__(self, base: GPT, n_prompt: int, seed: int = 0) -> None:
        super().__init__()
        if not 0 < n_prompt < base.config.block_size:
            raise ValueError(f"n_prompt must be in [1, block_size-1], got {n_prompt}")
        self.base = freeze(base)
        rows = torch.randint(base.config.vocab_size, (n_prompt,),
                             generator=torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(base.transformer.wte.weight[rows].detach().clone())

    @property
    def config(self) -> GPTConfig:
        return self.base.config

    def _inputs(self, idx: Tensor) -> Tensor:
        """The prompt vectors, then the token embeddings of ``idx``: (B, P + T, C)."""
        check_prompt_room(self.prompt.size(0), idx.size(1), self.config.block_size)
        tokens = self.base.transformer.wte(idx)
        prompt = self.prompt.expand(idx.size(0), -1, -1).to(tokens.dtype)
        return torch.cat([prompt, tokens], dim=1)

    def hidden_states(self, idx: Tensor) -> Tensor:
        """Final hidden states (B, T, C) of the text tokens (prompt dropped)."""
        hidden = self.base.hidden_states(None, inputs_embeds=self._inputs(idx))
        return hidden[:, self.prompt.size(0) :]

    def forward(self, idx: Tensor,
                targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) of the text tokens, and the LM loss if targets are given."""
        logits, _ = self.base(None, inputs_embeds=self._inputs(idx))
        logits = logits[:, self.prompt.size(0) :]
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                               ignore_index=-100)
        return logits, loss


def check_prompt_room(n_prompt: int, T: int, block_size: int) -> None:
    """Raise ``ValueError`` unless a soft prompt of ``n_prompt`` vectors and ``T`` tokens fit
    in the context."""
    if n_prompt + T > block_size:
        raise ValueError(f"{n_prompt} prompt vectors + {T} tokens exceed block_size="
                         f"{block_size}; truncate the text to at most {block_size - n_prompt} "
                         "tokens")
