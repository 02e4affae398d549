"""The trainer: the training loop, evaluation and a run's bookkeeping (chapter 5).

``train(TrainConfig(...))`` (the config lives in ``minigpt.train_config``) tokenises the
corpus into token bins (``data.prepare_data``, once, cached), builds a ``GPT``, and runs AdamW
with warm-up + cosine learning rate, gradient accumulation, gradient clipping, optional bf16
autocast and ``torch.compile``.

Design choices:

- The loop the book shows (``train``) is the algorithm only; setting up, evaluating, logging,
  checkpointing and the end of a run are methods of ``Run``, each written once.
- No per-step host syncs: the step's loss stays on the device and is read back only at
  logging and evaluation intervals.
- Evaluation is deterministic (fixed windows, no random numbers drawn), so it never changes
  a run; the final number is the loss on the whole validation split.
- ``out_dir/ckpt.pt`` holds the full training state (written atomically), so a resumed run
  is bit-identical on CPU. SIGINT, SIGTERM and SIGHUP finish the current step, save a
  checkpoint and raise ``TrainingInterrupted``; a second signal interrupts at once. A failed
  checkpoint write (disk full) raises ``CheckpointWriteError`` naming the file.
- Logs are JSONL (``minigpt.tracking`` appends and reads them); the finished model is
  exported to ``out_dir`` in the shipped-model format (``minigpt.checkpoint``).
- Under ``torchrun`` the same code trains with DistributedDataParallel (``minigpt.ddp``): each
  rank samples its own batches (generator seed ``seed + rank``), and rank 0 alone prints and
  writes files. The global batch is ``batch_size * grad_accum_steps * world_size`` sequences.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import platform
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from minigpt import data, ddp, optim, tracking
from minigpt.atomic import atomic_write_text
from minigpt.checkpoint import (
    check_model_config,
    export_model,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from minigpt.model import GPT
from minigpt.optim import lr_at, optimizer_step
from minigpt.tokenizer import CharTokenizer, Tokenizer
from minigpt.train_config import ConfigError, TrainConfig

Callback = Callable[[dict], None]  # called with each evaluation's record


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. disk full); the previous one is intact."""


class TrainingInterrupted(Exception):
    """A signal stopped training; a checkpoint of the last finished step was saved."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None) -> None:
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        name = signal.Signals(signum).name if signum else "a signal"
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"interrupted by {name} after step {iteration}: {saved}; "
                         "continue with --set resume=true")


@dataclass
class TrainResult:
    """What ``train`` returns: the final model and the run's numbers."""

    model: GPT
    tokenizer: object
    iterations: int  # optimiser steps done in total (including before a resume)
    losses: list[float]  # training loss of each step run in this call
    history: list[dict]  # the evaluation records (also in log.jsonl)
    val_loss: float  # final loss on the whole validation split
    wall_time: float  # seconds spent in this call, including data preparation
    tokens_per_s: float  # training throughput (all ranks)


# ---------------------------------------------------------------------------- evaluation
def _autocast(device: torch.device, dtype: str):
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16);
    True where torch cannot tell, and on other CPUs (ARM's bf16 is not probed)."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    checks = [check for check in checks if check is not None]
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return not (x86 and checks) or any(check() for check in checks)


def auto_dtype(device: torch.device) -> str:
    """What ``dtype="auto"`` trains in: "bfloat16" where the hardware multiplies bf16
    matrices (a CUDA GPU that supports it, or a CPU with ``cpu_has_bf16``), else "float32"."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_bf16() else "float32"


@functools.cache
def _thread_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="minigpt-micro-batch")


def _map_in_threads(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> list:
    """``[fn(item) for item in items]``, ``threads`` items at a time in worker threads, in
    order. Each worker runs torch on the caller's intra-op thread count (a thread keeps
    its own count otherwise), so every item gets the same kernels as in the caller."""
    if threads == 1:
        return [fn(item) for item in items]
    intra_op = torch.get_num_threads()

    def call(item: Any) -> Any:
        torch.set_num_threads(intra_op)
        return fn(item)

    return list(_thread_pool(threads).map(call, items))


def estimate_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    max_batches: int | None = None,
    dtype: str = "float32",
    threads: int = 1,
) -> float:
    """Mean next-token loss over fixed, non-overlapping windows of ``tokens``.

    All ``len(tokens) // block_size`` windows by default (the whole split: reproducible, and
    the better metric); with ``max_batches``, that many batches of windows spread evenly over
    the split. No random numbers are drawn, so evaluating never changes a run. With
    ``threads`` > 1, that many batches are computed at once, their losses added in batch
    order: the same bits as one by one.
    """
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of {block_size}")
    starts = np.arange(n_windows) * block_size
    if max_batches is not None and n_windows > max_batches * batch_size:
        starts = starts[np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(int)]
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    offsets = np.arange(block_size + 1)

    @torch.no_grad()  # grad mode is per thread
    def batch_loss(i: int) -> torch.Tensor:  # summed over the batch's windows
        windows = torch.from_numpy(np.asarray(tokens)[starts[i : i + batch_size, None] + offsets]
                                   .astype(np.int64)).to(device)
        with _autocast(device, dtype):
            _, loss = model(windows[:, :-1], windows[:, 1:])
        return loss.double() * windows.size(0)

    losses = _map_in_threads(batch_loss, range(0, len(starts), batch_size), threads)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for loss in losses:  # in batch order
        total += loss
    model.train(was_training)
    return total.item() / len(starts)


def nats_per_char(nats_per_token: float, tokens: Sequence[int],
                  tokenizer: CharTokenizer | Tokenizer) -> float:
    """A mean loss per token of ``tokens`` converted to nats per character of their text.

    Loss per token depends on the tokenizer (a BPE token carries several characters); per
    character it does not, so models with different tokenizers compare on the same split:
    total nats (``nats_per_token * len(tokens)``) over the characters the tokens decode to.
    Divide by ln 2 for bits per character.
    """
    if not math.isfinite(nats_per_token) or nats_per_token < 0:
        raise ValueError(f"nats_per_token must be a finite loss >= 0, got {nats_per_token!r}")
    n_chars = len(tokenizer.decode([int(t) for t in tokens]))
    if n_chars == 0:
        raise ValueError("the tokens decode to no characters; pass a non-empty split")
    return nats_per_token * len(tokens) / n_chars


# ---------------------------------------------------------------------------- one step
def accumulate_gradients(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: str,
    threads: int = 1,
) -> torch.Tensor:
    """Forward + backward over micro-batches; the gradients are those of the mean loss.

    Under DDP, gradients are all-reduced (averaged over ranks) only on the last
    micro-batch. With ``threads`` > 1 the micro-batches run at once, that many at a time
    (``concurrent_gradients``), for the same gradients. Returns this rank's mean loss,
    detached and left on the device (reading it back would make the CPU wait for the GPU
    at every step).
    """
    if threads > 1 and len(batches) > 1:
        return concurrent_gradients(model, batches, dtype, threads)
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        with ddp.sync_gradients(model, sync=i == len(batches) - 1):
            with _autocast(device, dtype):
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        total += loss.detach().float()
    return total / len(batches)


def concurrent_gradients(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    dtype: str,
    threads: int,
) -> torch.Tensor:
    """``accumulate_gradients`` with ``threads`` micro-batches computed at once.

    A small model's matrices are too small to keep several cores busy inside one
    operation; one micro-batch per thread, each on its own core, keeps them busy.
    Each thread returns its micro-batch's gradients, which are added into ``.grad``
    in micro-batch order: the same additions, so the same bits, as the loop.
    Not for DDP (its gradient hooks need ``backward``), nor with dropout (the threads
    would draw their masks from one generator in a racy order).
    """
    if isinstance(model, DDP):
        raise ValueError("concurrent_gradients cannot drive DDP's gradient hooks: "
                         "use accumulate_gradients with threads=1 under torchrun")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        x, y = batch
        with _autocast(device, dtype):
            _, loss = model(x, y)
        g = torch.autograd.grad(loss / len(batches), params, allow_unused=True)
        return loss.detach().float(), g

    results = _map_in_threads(grads, batches, threads)  # in micro-batch order
    with torch.no_grad():
        for i, p in enumerate(params):
            for _, g in results:
                if g[i] is not None:
                    p.grad = g[i] if p.grad is None else p.grad.add_(g[i])
    total = torch.zeros((), device=device)
    for loss, _ in results:
        total += loss
    return total / len(batches)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``optim.make_optimizer`` with the run's settings (the one AdamW set-up fine-tuning
    shares): decay groups, torch's fused AdamW or ours (``optimizer="scratch"``)."""
    betas = (cfg.beta1, cfg.beta2)
    scratch = cfg.optimizer == "scratch"
    return optim.make_optimizer(model, cfg.lr, cfg.weight_decay, betas, scratch=scratch)


class StopOnSignal:
    """Within the block, SIGINT/SIGTERM/SIGHUP only record ``signum``; a second one interrupts.

    The loop polls ``requested``: every step in one process; under DDP every ``every`` steps,
    agreed between ranks (a collective), so all ranks stop at the same step.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self, every: int = 10) -> None:
        self.signum, self.every, self._old = 0, every, {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (getattr(signal, n) for n in self.NAMES if hasattr(signal, n)):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGHUP under nohup
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def requested(self, dist: ddp.Distributed, it: int) -> bool:
        if dist.world_size == 1:
            return bool(self.signum)
        return (it + 1) % self.every == 0 and ddp.any_rank(bool(self.signum), dist)


# ---------------------------------------------------------------------------- a run
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """The state of one training run and everything the loop does besides the step."""

    cfg: TrainConfig
    dist: ddp.Distributed
    tokenizer: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    model: GPT
    optimizer: torch.optim.Optimizer
    net: torch.nn.Module  # model, wrapped for DDP / torch.compile
    gen: torch.Generator  # this rank's batch sampler
    callback: Callback | None = None
    iteration: int = 0  # optimiser steps done
    history: list[dict] = field(default_factory=list)
    best: float = math.inf
    bad_evals: int = 0
    losses: list[torch.Tensor] = field(default_factory=list)  # this call's, on the device
    bar: tqdm | None = None
    t_start: float = field(default_factory=time.perf_counter)  # includes data preparation
    t_loop: float = field(default_factory=time.perf_counter)  # training steps only

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)

    @classmethod
    def start(cls, cfg: TrainConfig, callback: Callback | None = None) -> Run:
        """Devices, data, model and optimiser; resumes ``out_dir/ckpt.pt`` if ``cfg.resume``."""
        t_start = time.perf_counter()
        dist = ddp.init_distributed(cfg.device)  # checks the device before reading data
        if cfg.micro_batch_threads > 1 and dist.world_size > 1:
            raise ConfigError("micro_batch_threads > 1 is for one process (DDP's gradient "
                              "hooks need backward); under torchrun set micro_batch_threads=1")
        ddp.set_threads(dist, cfg.num_threads, cfg.micro_batch_threads)
        if cfg.dtype == "auto":  # the run (and the config it saves) uses the resolved dtype
            cfg = replace(cfg, dtype=auto_dtype(dist.device))
        if cfg.dtype == "bfloat16" and dist.device.type == "cpu" and not cpu_has_bf16():
            warnings.warn("dtype=bfloat16 on a CPU without bf16 instructions (AMX or "
                          "AVX512-BF16 in lscpu's flags): its matrix products take a slow "
                          "generic path, many times slower than float32; set "
                          "dtype=float32", stacklevel=2)
        _seed_everything(cfg.seed)
        tokenizer, train_ids, val_ids = data.prepare_data(cfg.data_spec)
        model = GPT(cfg.model_config(tokenizer.vocab_size)).to(dist.device)
        optimizer = make_optimizer(model, cfg)
        net = ddp.wrap_model(model, dist)
        net = torch.compile(net) if cfg.compile else net
        gen = torch.Generator().manual_seed(cfg.seed + dist.rank)  # per-rank batch sampling
        torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout masks
        run = cls(cfg, dist, tokenizer, train_ids, val_ids, model, optimizer, net, gen,
                  callback, t_start=t_start)
        run.resume()
        if dist.main:
            atomic_write_text(run.out / "log.jsonl",
                                       "".join(json.dumps(r) + "\n" for r in run.history))
        run.bar = tqdm(total=cfg.max_iters, initial=run.iteration, desc="train", unit="step",
                       disable=not (cfg.progress and dist.main))
        run.t_loop = time.perf_counter()
        return run

    def resume(self) -> None:
        """Continue from ``out_dir/ckpt.pt`` when ``cfg.resume`` and the file exists."""
        ckpt = self.out / "ckpt.pt"
        if not (self.cfg.resume and ckpt.is_file()):
            if self.cfg.resume and self.dist.main:
                print(f"no checkpoint at {ckpt}; starting from scratch")
            return
        state = read_checkpoint(ckpt)
        check_model_config(json.loads(state["model_config"]), self.model.config.to_dict())
        self.iteration = load_checkpoint(state, self.model, self.optimizer)
        extra = state["extra"]
        self.gen.set_state(extra["generator"][self.dist.rank])
        self.history, self.best = extra["history"], extra["best_val"]
        self.bad_evals = extra["bad_evals"]

    def lr(self, it: int) -> float:
        cfg = self.cfg
        return lr_at(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters)

    def evaluate(self, it: int) -> bool:
        """At an evaluation step: estimate, log, call back, checkpoint. True: stop early."""
        if self.history and self.history[-1]["iter"] >= it:  # done before a resume
            return False
        cfg, steps = self.cfg, len(self.losses)
        kw = dict(block_size=cfg.block_size, batch_size=cfg.batch_size,
                  max_batches=cfg.eval_iters, dtype=cfg.dtype, threads=cfg.micro_batch_threads)
        elapsed = max(time.perf_counter() - self.t_loop, 1e-9)
        record = {"iter": it, "lr": self.lr(it),
                  "train_loss": estimate_loss(self.model, self.train_ids, **kw),
                  "val_loss": estimate_loss(self.model, self.val_ids, **kw),
                  "tokens_per_s": round(self.tokens_per_step * steps / elapsed, 1)}
        self.history.append(record)
        better = record["val_loss"] < self.best
        self.best, self.bad_evals = (record["val_loss"], 0) if better else (
            self.best, self.bad_evals + 1)
        if self.dist.main:
            tracking.append_record(self.out / "log.jsonl", record)
            if self.bar is not None and not self.bar.disable:
                self.bar.write(f"step {it}: train loss {record['train_loss']:.4f}, "
                               f"val loss {record['val_loss']:.4f}")
            if self.callback is not None:
                self.callback(record)
        if it > 0:
            self.checkpoint(it)
        stop = bool(cfg.early_stop_patience) and self.bad_evals >= cfg.early_stop_patience
        if stop and self.dist.main:
            tqdm.write(f"early stop at step {it}: no better val loss in {self.bad_evals} evals")
        return stop

    @property
    def tokens_per_step(self) -> int:
        cfg = self.cfg
        return cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * self.dist.world_size

    def checkpoint(self, it: int) -> None:
        """Save the full training state at step ``it`` (rank 0 writes; all ranks take part)."""
        gens = ddp.gather(self.gen.get_state(), self.dist)
        if not self.dist.main:
            return
        path = self.out / "ckpt.pt"
        extra = {"config": json.dumps(self.cfg.to_dict()), "generator": gens,
                 "history": self.history, "best_val": self.best, "bad_evals": self.bad_evals,
                 "tokenizer": json.dumps(self.tokenizer.to_dict())}
        try:
            save_checkpoint(self.model, self.optimizer, it, path, extra=extra)
        except OSError as e:
            raise CheckpointWriteError(f"could not write the checkpoint {path}: "
                                       f"{e.strerror or e}; the previous checkpoint is intact "
                                       "(free some space, then resume)") from None

    def step_done(self, it: int, loss: torch.Tensor) -> None:
        """Record a step's loss (kept on the device); the progress bar reads it every 10 steps."""
        self.iteration = it + 1
        self.losses.append(ddp.mean_over_ranks(loss, self.dist))
        self.bar.update(1)
        if not self.bar.disable and (len(self.losses) % 10 == 0 or it == self.cfg.max_iters - 1):
            elapsed = max(time.perf_counter() - self.t_loop, 1e-9)
            self.bar.set_postfix(loss=f"{self.losses[-1].item():.3f}",
                                 tok_s=f"{self.tokens_per_step * len(self.losses) / elapsed:,.0f}")

    def finish(self) -> TrainResult:
        """Final whole-split validation loss, summary line, exported model."""
        self.bar.close()
        loop_time = max(time.perf_counter() - self.t_loop, 1e-9)
        val_loss = estimate_loss(self.model, self.val_ids, self.cfg.block_size,
                                 dtype=self.cfg.dtype, threads=self.cfg.micro_batch_threads)
        losses = torch.stack(self.losses).tolist() if self.losses else []
        tokens_per_s = self.tokens_per_step * len(losses) / loop_time
        wall = time.perf_counter() - self.t_start
        if self.dist.main:
            summary = {"iterations": self.iteration, "val_loss": val_loss, "wall_time": wall,
                       "tokens_per_s": tokens_per_s, "params": self.model.num_params()}
            tracking.append_record(self.out / "log.jsonl", {"final": summary})
            export_model(self.model, self.tokenizer, self.out,
                         train={"config": self.cfg.to_dict(), **summary})
        ddp.finish(self.dist)
        return TrainResult(self.model, self.tokenizer, self.iteration, losses, self.history,
                           val_loss, wall, tokens_per_s)


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Run (or resume) a training run; see ``TrainConfig`` for every option.

    ``callback(record)`` is called on the main rank after each evaluation with the
    logged record (iteration, lr, train/val loss, tokens/s), e.g. for a live plot.
    """
    with StopOnSignal() as stop:
        run = Run.start(cfg, callback)  # data, model, optimiser; resumes a checkpoint
        cfg = run.cfg  # with dtype="auto" resolved
        for it in range(run.iteration, cfg.max_iters):
            if it % cfg.eval_interval == 0:
                if run.evaluate(it):  # estimate, log, call back, checkpoint
                    break  # early stopping
            elif cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0:
                run.checkpoint(it)
            batches = [data.get_batch(run.train_ids, cfg.batch_size, cfg.block_size,
                                      run.dist.device, run.gen)
                       for _ in range(cfg.grad_accum_steps)]
            loss = accumulate_gradients(run.net, batches, cfg.dtype,
                                        cfg.micro_batch_threads)
            optimizer_step(run.optimizer, run.lr(it), cfg.grad_clip)  # lr, clip, step
            run.step_done(it, loss)  # the loss stays on the device
            if stop.requested(run.dist, it):
                run.checkpoint(it + 1)
                raise TrainingInterrupted(stop.signum, it + 1, run.out / "ckpt.pt")
        else:
            run.evaluate(cfg.max_iters)  # the final evaluation and checkpoint
        return run.finish()


__all__ = [
    "CheckpointWriteError", "ConfigError", "Run", "StopOnSignal", "TrainConfig", "TrainResult",
    "TrainingInterrupted", "accumulate_gradients", "concurrent_gradients", "cpu_has_bf16",
    "estimate_loss", "make_optimizer", "nats_per_char", "train",
]
