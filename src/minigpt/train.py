"""The trainer: configuration, data preparation, the training loop, evaluation and DDP.

``train(TrainConfig(...))`` tokenises the corpus into token bins (once, cached), builds a
``GPT``, and runs AdamW with warm-up + cosine learning rate, gradient accumulation, gradient
clipping, optional bf16 autocast and ``torch.compile``. It logs to ``out_dir/log.jsonl``,
checkpoints the full training state to ``out_dir/ckpt.pt`` (resumable bit-for-bit on CPU) and
exports the final model to ``out_dir`` in the shipped-model format (``minigpt.checkpoint``).

Under ``torchrun --nproc_per_node=N`` the same code trains with DistributedDataParallel: each
rank samples its own batches (generator seed ``seed + rank``), gradients are averaged across
ranks, and rank 0 alone logs and writes files. The global batch is
``batch_size * grad_accum_steps * world_size`` sequences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from minigpt import data
from minigpt.bpe import train_bpe_from_text
from minigpt.checkpoint import (
    CheckpointError,
    check_model_config,
    export_model,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from minigpt.model import GPT, GPTConfig
from minigpt.optim import AdamW, clip_grad_norm, lr_at, param_groups
from minigpt.tokenizer import CharTokenizer, Tokenizer


@dataclass
class TrainConfig:
    """Every hyper-parameter of a training run (the JSON files in ``configs/`` set these)."""

    # data
    dataset: str = "tinyshakespeare"  # a name registered in minigpt.data, or a UTF-8 text file
    tokenizer: str = "char"  # "char" (one id per character) or "bpe" (byte-level BPE)
    bpe_vocab_size: int = 1024  # for tokenizer="bpe": trained on the training split
    val_fraction: float = 0.1  # the last 10% of the tokens are the validation split
    # model (GPTConfig; vocab_size comes from the tokenizer)
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 64  # context length in tokens
    dropout: float = 0.0  # dropout probability while training
    bias: bool = True  # biases in Linear layers and LayerNorms
    model: dict = field(default_factory=dict)  # further GPTConfig fields, e.g. {"norm": "rmsnorm"}
    # optimisation
    batch_size: int = 12  # sequences per micro-batch (per rank)
    grad_accum_steps: int = 1  # micro-batches per optimiser step
    max_iters: int = 2000  # optimiser steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # floor of the cosine schedule
    warmup_iters: int = 100  # linear warm-up from 0 to lr over this many steps
    lr_decay_iters: int | None = None  # end of the cosine; None: max_iters
    weight_decay: float = 0.1  # Linear weights only (see minigpt.optim.param_groups)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    optimizer: str = "torch"  # "torch" (torch.optim.AdamW, fused/foreach) or "scratch"
    # evaluation, stopping, logging
    eval_interval: int = 250  # estimate train/val loss every this many steps (and at the end)
    eval_iters: int = 20  # batches per estimate (fixed, evenly spaced windows)
    early_stop_patience: int = 0  # stop after this many evals without a better val loss; 0: off
    checkpoint_interval: int = 0  # also checkpoint every this many steps; 0: at evals only
    # system
    seed: int = 1337  # seeds python, numpy, torch and the batch sampler
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # "float32" or "bfloat16" (autocast)
    compile: bool = False  # torch.compile the model
    num_threads: int = 0  # torch intra-op threads; 0: torch's default (one per core)
    out_dir: str = "out/run"  # log.jsonl, ckpt.pt and the exported model go here
    resume: bool = False  # continue from out_dir/ckpt.pt if it exists
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        checks = {
            "tokenizer": self.tokenizer in ("char", "bpe"),
            "optimizer": self.optimizer in ("torch", "scratch"),
            "dtype": self.dtype in ("float32", "bfloat16"),
            "batch_size": self.batch_size >= 1,
            "grad_accum_steps": self.grad_accum_steps >= 1,
            "max_iters": self.max_iters >= 1,
            "eval_interval": self.eval_interval >= 1,
            "eval_iters": self.eval_iters >= 1,
            "val_fraction": 0 < self.val_fraction < 1,
            "warmup_iters": 0 <= self.warmup_iters <= self.decay_iters,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            k = bad[0]
            raise ValueError(f"invalid TrainConfig value {k}={getattr(self, k)!r}; "
                             "see `python -m minigpt train --help` for allowed values")

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a dict (a config file); unknown keys raise a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


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


# ---------------------------------------------------------------------------- data
def bins_dir(cfg: TrainConfig) -> Path:
    """Where the token bins of this dataset + tokenizer live (in the minigpt cache)."""
    name = Path(cfg.dataset).stem if _is_file(cfg.dataset) else cfg.dataset
    tok = "char" if cfg.tokenizer == "char" else f"bpe{cfg.bpe_vocab_size}"
    return data.cache_dir() / "bins" / f"{name}-{tok}-val{cfg.val_fraction:g}"


def _is_file(dataset: str) -> bool:
    return dataset.endswith((".txt", ".md")) or os.sep in dataset or Path(dataset).is_file()


def prepare_data(cfg: TrainConfig, tokenizer=None) -> tuple[object, np.ndarray, np.ndarray]:
    """The tokenizer and the train/val token arrays (memory-mapped bins), built once.

    ``tokenizer`` (e.g. a shipped model's) replaces the one ``cfg`` describes.
    """
    source = Path(cfg.dataset) if _is_file(cfg.dataset) else data.path(cfg.dataset)
    if not source.is_file():
        raise ValueError(f"dataset file {source} does not exist")
    out = bins_dir(cfg)
    if tokenizer is None:
        text = source.read_text(encoding="utf-8")
        if cfg.tokenizer == "char":
            tokenizer = CharTokenizer.from_text(text)
        else:
            tokenizer = _bpe_tokenizer(text[: int(len(text) * (1 - cfg.val_fraction))], cfg, out)
    data.prepare_bin(source, tokenizer, out, val_fraction=cfg.val_fraction)
    return tokenizer, data.load_bin(out / "train.bin"), data.load_bin(out / "val.bin")


def _bpe_tokenizer(train_text: str, cfg: TrainConfig, out: Path):
    """Train a byte-level BPE on the training text (cached as ``tokenizer.json``)."""
    cached = out / "tokenizer.json"
    if cached.is_file():
        return data.load_tokenizer(json.loads(cached.read_text(encoding="utf-8")))
    specials = ["<|endoftext|>"]
    vocab, merges = train_bpe_from_text(train_text, cfg.bpe_vocab_size, specials)
    tokenizer = Tokenizer(vocab, merges, specials)
    out.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(tokenizer.to_dict()), encoding="utf-8")
    os.replace(tmp, cached)
    return tokenizer


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    max_batches: int | None = None,
    dtype: str = "float32",
) -> float:
    """Mean next-token loss over fixed, non-overlapping windows of ``tokens``.

    All ``len(tokens) // block_size`` windows by default (the whole split: reproducible, and
    the better metric); with ``max_batches``, that many batches of windows spread evenly over
    the split. No random numbers are drawn, so evaluating never changes a run.
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
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        windows = torch.from_numpy(np.asarray(tokens)[starts[i : i + batch_size, None] + offsets]
                                   .astype(np.int64)).to(device)
        with _autocast(device, dtype):
            _, loss = model(windows[:, :-1], windows[:, 1:])
        total += loss.item() * windows.size(0)
        count += windows.size(0)
    model.train(was_training)
    return total / count


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- distributed
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, ...), if any.

    Backend nccl on GPUs, gloo on CPUs. Without torchrun: a single process, no group.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "WORLD_SIZE" not in os.environ:
        return Distributed(device=torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, dev, owns)


def wrap_model(model: torch.nn.Module, dist: Distributed) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when there is more than one process."""
    if dist.world_size == 1:
        return model
    return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)


def accumulate_gradients(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], dtype: str
) -> torch.Tensor:
    """Forward + backward over micro-batches; the gradients are those of the mean loss.

    With DDP, gradients are all-reduced (averaged over ranks) only on the last micro-batch.
    Returns the mean loss of this rank (detached).
    """
    total = torch.zeros(())
    device = next(model.parameters()).device
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync()
        with sync:
            with _autocast(device, dtype):
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        total += loss.detach().float().cpu()
    return total / len(batches)


# ---------------------------------------------------------------------------- the loop
def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: torch's (fused if available, else foreach) or ours."""
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if cfg.optimizer == "scratch":
        return AdamW(groups, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kw)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or resume) a training run; see ``TrainConfig`` for every option.

    ``callback(record)`` is called on the main rank after each evaluation with the logged
    record (iteration, lr, train/val loss, tokens/s) — e.g. for a live plot.
    """
    t_start = time.perf_counter()
    dist = init_distributed(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    elif dist.world_size > 1 and dist.device.type == "cpu":  # share the cores between ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    _seed_everything(cfg.seed)
    tokenizer, train_ids, val_ids = prepare_data(cfg)
    model_cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          dropout=cfg.dropout, bias=cfg.bias, **cfg.model)
    model = GPT(model_cfg).to(dist.device)
    optimizer = make_optimizer(model, cfg)
    out = Path(cfg.out_dir)
    ckpt_path, log_path = out / "ckpt.pt", out / "log.jsonl"
    gen = torch.Generator().manual_seed(cfg.seed + dist.rank)  # per-rank batch sampling
    torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout masks
    start, history, best, bad_evals = 0, [], math.inf, 0
    if cfg.resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        check_model_config(json.loads(state["model_config"]), model_cfg.to_dict())
        start = load_checkpoint(state, model, optimizer)
        extra = state["extra"]
        gen.set_state(extra["generator"][dist.rank])
        history, best, bad_evals = extra["history"], extra["best_val"], extra["bad_evals"]
    elif cfg.resume and dist.main:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    net = wrap_model(model, dist)
    if cfg.compile:
        net = torch.compile(net)

    def checkpoint(it: int) -> None:
        gens = [gen.get_state()]
        if dist.world_size > 1:  # rank 0 saves every rank's sampler state
            gens = [torch.empty_like(gens[0]) for _ in range(dist.world_size)]
            torch_dist.all_gather(gens, gen.get_state())
        if dist.main:
            extra = {"config": json.dumps(cfg.to_dict()), "generator": gens, "history": history,
                     "best_val": best, "bad_evals": bad_evals,
                     "tokenizer": json.dumps(tokenizer.to_dict())}
            save_checkpoint(model, optimizer, it, ckpt_path, extra=extra)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum_steps * dist.world_size
    losses: list[float] = []
    bar = tqdm(range(start, cfg.max_iters), initial=start, total=cfg.max_iters,
               disable=not (cfg.progress and dist.main), desc="train", unit="step")
    t_loop, it = time.perf_counter(), start
    for it in bar:
        lr = lr_at(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters)
        if it % cfg.eval_interval == 0 and it > start or (it == 0 and start == 0):
            record = _evaluate(model, train_ids, val_ids, cfg, it, lr)
            record["tokens_per_s"] = round(tokens_per_step * len(losses)
                                           / max(time.perf_counter() - t_loop, 1e-9), 1)
            history.append(record)
            best, bad_evals = ((record["val_loss"], 0) if record["val_loss"] < best
                               else (best, bad_evals + 1))
            if dist.main:
                _log(log_path, record)
                if callback is not None:
                    callback(record)
            if it > start:
                checkpoint(it)
            if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                if dist.main:
                    bar.write(f"early stop at step {it}: no better val loss in {bad_evals} evals")
                break
        elif cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0 and it > start:
            checkpoint(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [data.get_batch(train_ids, cfg.batch_size, cfg.block_size, dist.device, gen)
                   for _ in range(cfg.grad_accum_steps)]
        loss = accumulate_gradients(net, batches, cfg.dtype)
        if cfg.grad_clip > 0:
            clip_grad_norm(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.world_size > 1:
            torch_dist.all_reduce(loss)
            loss /= dist.world_size
        losses.append(loss.item())
        if len(losses) % 10 == 0 or it == cfg.max_iters - 1:
            elapsed = time.perf_counter() - t_loop
            bar.set_postfix(loss=f"{losses[-1]:.3f}",
                            tok_s=f"{tokens_per_step * len(losses) / elapsed:,.0f}")
    else:
        it = cfg.max_iters
        if start < it:  # not a resume of a finished run
            record = _evaluate(model, train_ids, val_ids, cfg, it,
                               lr_at(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters))
            history.append(record)
            if dist.main:
                _log(log_path, record)
                if callback is not None:
                    callback(record)
            checkpoint(it)
    loop_time = time.perf_counter() - t_loop
    bar.close()
    val_loss = estimate_loss(model, val_ids, cfg.block_size, dtype=cfg.dtype)
    wall = time.perf_counter() - t_start
    tokens_per_s = tokens_per_step * len(losses) / max(loop_time, 1e-9)
    if dist.main:
        summary = {"iterations": it, "val_loss": val_loss, "wall_time": wall,
                   "tokens_per_s": tokens_per_s, "params": model.num_params()}
        _log(log_path, {"final": summary})
        export_model(model, tokenizer, out, train={"config": cfg.to_dict(), **summary})
    if dist.owns_group:
        torch_dist.destroy_process_group()
    return TrainResult(model, tokenizer, it, losses, history, val_loss, wall, tokens_per_s)


def _evaluate(model, train_ids, val_ids, cfg: TrainConfig, it: int, lr: float) -> dict:
    """Train and val loss on fixed windows (``cfg.eval_iters`` batches each)."""
    kw = dict(block_size=cfg.block_size, batch_size=cfg.batch_size, max_batches=cfg.eval_iters,
              dtype=cfg.dtype)
    return {"iter": it, "lr": lr, "train_loss": estimate_loss(model, train_ids, **kw),
            "val_loss": estimate_loss(model, val_ids, **kw)}


def read_log(path: str | os.PathLike) -> list[dict]:
    """The evaluation records of a ``log.jsonl`` (the final summary line left out)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "final" not in r]


def plot_losses(records: list[dict] | str | os.PathLike, ax=None, title: str = "Loss curve"):
    """Plot train and val loss against the step from log records (or a log.jsonl path)."""
    import matplotlib.pyplot as plt

    if not isinstance(records, list):
        records = read_log(records)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["iter"] for r in records]
    ax.plot(steps, [r["train_loss"] for r in records], "o-", label="train")
    ax.plot(steps, [r["val_loss"] for r in records], "s-", label="validation")
    ax.set(title=title, xlabel="optimiser step", ylabel="cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


__all__ = [
    "CheckpointError", "TrainConfig", "TrainResult", "accumulate_gradients", "bins_dir",
    "estimate_loss", "export_model", "init_distributed", "load_checkpoint", "load_model",
    "make_optimizer", "plot_losses", "prepare_data", "read_log", "save_checkpoint", "train",
    "wrap_model",
]
