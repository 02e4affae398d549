"""Softmax, log-softmax and cross-entropy written from scratch (chapter 1).

A language model turns a vector of scores (logits) ``z`` over the vocabulary into a
probability distribution with the softmax, and is trained by minimising the cross-entropy,
the average negative log-probability of the true next token. Both are written here with
plain tensor operations, in the numerically stable form that libraries use:

* softmax subtracts the row maximum before exponentiating (the result is unchanged,
  because softmax is invariant to adding a constant, but ``exp`` can no longer overflow);
* log-softmax uses the log-sum-exp identity, so no probability is ever rounded to 0 and
  then passed to ``log``.

Design choices:

* Everything is differentiable with autograd and is tested equal to ``torch.softmax``,
  ``torch.log_softmax`` and ``torch.nn.functional.cross_entropy``
  (``tests/test_functional.py``). Training code uses the library versions, which are
  fused and faster; these are the ones chapter 1 explains.
* The shift by the maximum is detached: it does not change the result, so it needs no
  gradient.
* Argument checks live in ``_check_*`` helpers called on the first line, so that each
  displayed function shows only its formula. ``cross_entropy`` checks that the targets are
  in the vocabulary (a device sync), which is fine for a teaching function; the model's
  training path does not call it.
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
    """Softmax along ``dim``: ``exp(x_i) / sum_j exp(x_j)``, computed stably as
    ``exp(x_i - max x) / sum_j exp(x_j - max x)``.

    Entries equal to ``-inf`` get probability 0 (as in an attention mask); a slice
    whose entries are all ``-inf`` has no distribution and gives ``nan``, as in torch.
    """
    _check_floating(x, "x")
    # The shift does not change the result, so it carries no gradient.
    shifted = x - x.amax(dim=dim, keepdim=True).detach()   # largest entry is 0
    e = shifted.exp()                                       # in (0, 1]: no overflow
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Log of the softmax along ``dim``: ``x_i - logsumexp(x)``, never ``log`` of a 0.

    ``logsumexp(x) = m + log(sum_j exp(x_j - m))`` with ``m = max x``: the sum is >= 1.
    """
    _check_floating(x, "x")
    shifted = x - x.amax(dim=dim, keepdim=True).detach()   # x - m
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def _check_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
) -> None:
    """Raise a ValueError unless ``cross_entropy`` can use these arguments."""
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
    vocab, flat = logits.shape[-1], targets.reshape(-1).long()
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        raise ValueError(
            f"target id {int(flat[bad][0])} is outside the vocabulary 0..{vocab - 1} "
            f"(and is not ignore_index={ignore_index})"
        )


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy between ``softmax(logits)`` and the target ids: ``-log p(target)``.

    ``logits``: ``(N, V)`` or ``(B, T, V)``, scores over a vocabulary of ``V``;
    ``targets``: integer ids of shape ``(N,)`` or ``(B, T)``. Positions whose target is
    ``ignore_index`` count for nothing (padding, prompt tokens). ``reduction``:
    ``"mean"`` (over the counted positions), ``"sum"`` or ``"none"`` (per-position
    losses shaped like ``targets``, 0 where ignored).
    """
    _check_cross_entropy(logits, targets, ignore_index, reduction)
    logp = log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)   # (N, V)
    flat = targets.reshape(-1).long()                                   # (N,)
    keep = flat != ignore_index                                         # counted
    safe = torch.where(keep, flat, 0).unsqueeze(1)                      # (N, 1)
    picked = logp.gather(1, safe).squeeze(1)                            # log p(y)
    nll = torch.where(keep, -picked, torch.zeros_like(picked))          # (N,)
    if reduction == "none":
        return nll.reshape(targets.shape)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / keep.sum()  # no position counted: 0/0 = nan, as in PyTorch
