"""Optimisation pieces written from scratch: AdamW, the learning-rate schedule, gradient clipping.

Design choices:

* Each from-scratch piece is tested equal to its PyTorch counterpart, and training runs the
  library's version: ``make_optimizer`` builds ``torch.optim.AdamW`` by default (fused /
  foreach kernels are faster) and this ``AdamW`` when asked for (``scratch=True``);
  ``optimizer_step`` clips with ``torch.nn.utils.clip_grad_norm_``.
* Weight decay: biases, normalisation weights and embeddings are NOT decayed
  (``param_groups``). nanoGPT decays every 2-D tensor, embeddings included; decaying an
  embedding pulls the rows of rare tokens towards zero only because they are rarely updated,
  which is not a prior we want. Frozen parameters (``requires_grad=False``, as the methods of
  ``minigpt.peft`` leave the base) are in no group: the optimiser never sees them.
* One optimisation step for everything: pretraining and fine-tuning both call
  ``optimizer_step`` (set the scheduled rate, clip the global gradient norm, step, zero the
  gradients), so the two loops cannot drift apart.
* No ``minigpt`` imports: this module is the bottom of the package.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    Per parameter, with gradient ``g`` at step ``t``::

        p <- p - lr * wd * p                       # decay, independent of the gradient
        m <- b1 * m + (1 - b1) * g                 # first moment
        v <- b2 * v + (1 - b2) * g**2              # second moment
        p <- p - lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError("eps and weight_decay must be >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # the signature torch.optim.Optimizer defines
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    # a float tensor step, like torch's: state dicts interchange
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                bias1 = 1 - b1**t
                bias2 = 1 - b2**t
                denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matrices of Linear layers) and the rest.

    Not decayed: biases, normalisation weights (LayerNorm/RMSNorm) and embeddings. A parameter
    shared by two modules (the tied ``lm_head``/``wte``) is listed once, by its first owner.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Linear) and name == "weight":
                decay.append(p)
            else:
                no_decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_at(
    it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int
) -> float:
    """Learning rate at iteration ``it``: linear warm-up, cosine decay, then ``min_lr``.

    ``it < warmup_iters``: ``max_lr * it / warmup_iters`` (starts at 0);
    ``warmup_iters <= it <= cosine_cycle_iters``: cosine from ``max_lr`` to ``min_lr``;
    after that: ``min_lr``.
    """
    if it < 0:
        raise ValueError(f"iteration must be >= 0, got {it}")
    if warmup_iters < 0 or cosine_cycle_iters < warmup_iters:
        raise ValueError(
            f"need 0 <= warmup_iters <= cosine_cycle_iters, got {warmup_iters}, "
            f"{cosine_cycle_iters}"
        )
    if it < warmup_iters:
        return max_lr * it / warmup_iters
    if it > cosine_cycle_iters or cosine_cycle_iters == warmup_iters:
        return min_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (as ``torch.nn.utils.clip_grad_norm_`` does).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.detach(), 2) for g in grads]), 2
    )
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(scale.to(g.dtype))
    return total


def make_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Sequence[float] = (0.9, 0.999),
    *,
    scratch: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, weight_decay)``: torch's (fused if it can) or ours.

    Only trainable parameters are optimised; raises ``ValueError`` if there are none.
    """
    groups = [g for g in param_groups(model, weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    kw = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=1e-8)
    if scratch:
        return AdamW(groups, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kw)


def optimizer_step(
    optimizer: torch.optim.Optimizer, lr: float, grad_clip: float
) -> None:
    """One update from the accumulated gradients: set ``lr`` in every group, clip the
    global gradient norm to ``grad_clip`` (0: no clipping), step, zero the gradients.
    Clipping is torch's ``clip_grad_norm_``, our ``clip_grad_norm`` in library code."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
