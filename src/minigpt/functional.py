"""Softmax, log-softmax and cross-entropy written from scratch (chapter 1).

A language model turns a vector of scores (logits) ``z`` over the vocabulary into a
probability distribution with the softmax, and is trained by minimising the cross-entropy,
the average negative log-probability of the true next token. Both are written here with
plain tensor operations, in the numerically stable form that libraries use:

* softmax subtracts the row maximum before exponentiating (the result is unchanged,
  because softmax is invariant to adding a constant, but ``exp`` can no longer overflow);
* log-softmax uses the log-sum-exp identity, so no probability is ever rounded to 0 and
  then passed to ``log``.

Everything is differentiable with autograd and is tested equal to ``torch.softmax``,
``torch.log_softmax`` and ``torch.nn.functional.cross_entropy`` (``tests/test_functional.py``).
Training code uses the library versions, which are fused and faster.
"""

from __future__ import annotations

import torch

_REDUCTIONS = ("mean", "sum", "none")


def _check_floating(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; "
            f"convert it first, e.g. {name}.float()"
        )


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``: ``exp(x_i) / sum_j exp(x_j)``, computed as ``exp(x_i - max x)``.

    Entries equal to ``-inf`` get probability 0 (as in an attention mask); a slice whose
    entries are all ``-inf`` has no distribution and gives ``nan``, as ``torch.softmax`` does.
    """
    _check_floating(x, "x")
    # The shift does not change the result, so it carries no gradient.
    shifted = x - x.amax(dim=dim, keepdim=True).detach()
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Log of the softmax along ``dim``: ``x_i - logsumexp(x)``, never ``log`` of a rounded 0.

    ``logsumexp(x) = m + log(sum_j exp(x_j - m))`` with ``m = max x``, so the sum is at least 1.
    """
    _check_floating(x, "x")
    shifted = x - x.amax(dim=dim, keepdim=True).detach()
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy between ``softmax(logits)`` and the target ids: ``-log p(target)``.

    ``logits`` has shape ``(N, V)`` or ``(B, T, V)`` (scores over a vocabulary of ``V``);
    ``targets`` holds integer ids with the leading shape, ``(N,)`` or ``(B, T)``. Positions
    whose target equals ``ignore_index`` contribute nothing (e.g. padding or prompt tokens).
    ``reduction`` is ``"mean"`` (over the non-ignored positions), ``"sum"`` or ``"none"``
    (per-position losses, 0 at ignored positions, shaped like ``targets``).
    """
    _check_floating(logits, "logits")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must have shape (N, V) or (B, T, V), got {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match logits shape "
            f"{tuple(logits.shape)}: targets must have shape {tuple(logits.shape[:-1])} "
            "(one id per row of logits)"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must hold integer token ids, got dtype {targets.dtype}; use targets.long()"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    vocab = logits.shape[-1]
    logp = log_softmax(logits.reshape(-1, vocab), dim=-1)
    flat = targets.reshape(-1).long()
    keep = flat != ignore_index
    bad = keep & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"target id {int(flat[bad][0])} is outside the vocabulary 0..{vocab - 1} "
            f"(and is not ignore_index={ignore_index})"
        )
    picked = logp.gather(1, torch.where(keep, flat, 0).unsqueeze(1)).squeeze(1)
    nll = torch.where(keep, -picked, torch.zeros_like(picked))
    if reduction == "none":
        return nll.reshape(targets.shape)
    if reduction == "sum":
        return nll.sum()
    # The mean is over the kept positions; with none kept it is 0/0 = nan, as in PyTorch.
    return nll.sum() / keep.sum()
