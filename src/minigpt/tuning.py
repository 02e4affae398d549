"""The fine-tuning loop that classification and instruction tuning share (chapter 7).

Design choices:

* Pretraining's optimisation, unchanged: AdamW over ``optim.param_groups`` (no weight decay
  on biases, norms and embeddings; frozen parameters left out), warm-up then cosine decay
  (``optim.lr_at``), global gradient-norm clipping, all through ``optim.optimizer_step``.
* ``fit`` takes the whole list of batches (every epoch, already shuffled by the caller), so it
  knows the number of steps and can lay the schedule over the run. Epochs, shuffling and
  the loss belong to the task (``minigpt.finetune``, ``minigpt.instruct``), not to the loop.
* ``FitConfig`` checks its values when it is made; ``fit`` itself only trains.
* Losses stay on the device during the loop and are read once at the end (no host sync per
  step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn
from tqdm.auto import tqdm

from minigpt.optim import lr_at, make_optimizer, optimizer_step


@dataclass(frozen=True)
class FitConfig:
    """Optimisation of one fine-tuning run; the defaults are pretraining's, at a smaller lr."""

    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.1  # on nn.Linear weights only (optim.param_groups)
    warmup: float = 0.1  # fraction of the steps spent warming up linearly from 0
    min_lr: float = 0.1  # the cosine ends at min_lr * lr
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decays

    def __post_init__(self) -> None:
        checks = {
            "lr": math.isfinite(self.lr) and self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup": 0 <= self.warmup < 1,
            "min_lr": 0 <= self.min_lr <= 1,
            "grad_clip": self.grad_clip >= 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            raise ValueError(
                f"bad FitConfig value for {', '.join(wrong)}: need lr > 0, weight_decay >= 0,"
                f" 0 <= warmup < 1, 0 <= min_lr <= 1, grad_clip >= 0, betas in [0, 1); got "
                f"{self}"
            )


def fit(
    model: nn.Module,
    batches: Sequence,
    loss_fn: Callable[[nn.Module, object], Tensor],
    cfg: FitConfig = FitConfig(),
    progress: bool = False,
) -> list[float]:
    """Train the trainable parameters of ``model`` on ``batches``, one step per batch.

    Returns the loss of every step; leaves the model in eval mode.
    """
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    steps = len(batches)
    warmup = round(cfg.warmup * steps)
    losses = []
    model.train()
    for it, batch in enumerate(tqdm(batches, disable=not progress, desc="fit")):
        loss = loss_fn(model, batch)
        loss.backward()
        lr = lr_at(it, cfg.lr, cfg.min_lr * cfg.lr, warmup, steps)
        optimizer_step(optimizer, lr, cfg.grad_clip)
        losses.append(loss.detach())
    model.eval()
    return [loss.item() for loss in losses]
