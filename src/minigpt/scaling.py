"""Scaling laws and compute budgets (chapter 9).

Language-model loss falls as a power law in model size N, data D and compute C until some
other factor limits it (Kaplan et al. 2020); for a fixed compute budget C ~ 6 N D there is a
best split between N and D, about 20 training tokens per parameter (Hoffmann et al. 2022,
"Chinchilla"). This module holds the arithmetic (``training_flops``, ``compute_optimal``,
the Chinchilla parametric loss), a robust fit of ``L(N) = a * N**-alpha + c``
(``fit_power_law``, numpy only), a matmul FLOP/s probe, and a small sweep that trains several
model sizes on the same token budget with ``minigpt.train`` and records the loss curves.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minigpt.model import GPTConfig, param_count
from minigpt.tracking import read_metrics
from minigpt.train import TrainConfig, train

# Kaplan et al. 2020, eq. (1.1): L(N) = (N_c / N) ** alpha_N, N = non-embedding parameters.
KAPLAN_ALPHA_N = 0.076
KAPLAN_N_C = 8.8e13
# Kaplan et al. 2020, eq. (1.2) and (1.3): data and (compute-efficient) compute exponents.
KAPLAN_ALPHA_D = 0.095
KAPLAN_ALPHA_C_MIN = 0.050


@dataclass(frozen=True)
class ChinchillaFit:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022, eq. 10)."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n_params: float, n_tokens: float) -> float:
        """Predicted loss (nats/token on their data) of N parameters trained on D tokens."""
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """The (N, D) minimising ``loss`` under ``6 N D = flops`` (Hoffmann et al., eq. 4).

        Setting the derivative to zero gives N = G (C/6)^(beta/(alpha+beta)), D = (C/6) / N,
        with G = (alpha A / (beta B))^(1/(alpha+beta)).
        """
        _check_positive(flops=flops)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** (self.beta / (self.alpha + self.beta))
        return n, flops / 6 / n


HOFFMANN = ChinchillaFit()


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, int | float | np.floating | np.integer) and v > 0
                and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


# ---------------------------------------------------------------------------- compute arithmetic
def training_flops(n_params: float, n_tokens: float) -> float:
    """Training compute C ~ 6 N D: 2 FLOPs per weight and token forward, 4 backward."""
    _check_positive(n_params=n_params, n_tokens=n_tokens)
    return 6.0 * n_params * n_tokens


def compute_optimal(
    flops: float, tokens_per_param: float = 20.0
) -> tuple[float, float]:
    """Compute-optimal (N, D) for a budget of ``flops`` with D = tokens_per_param * N.

    From C = 6 N D = 6 r N^2: N = sqrt(C / (6 r)), D = r N. The default r = 20 is the
    Chinchilla rule of thumb (Hoffmann et al. 2022, table 3: about 20 tokens per
    parameter).
    """
    _check_positive(flops=flops, tokens_per_param=tokens_per_param)
    n = math.sqrt(flops / (6.0 * tokens_per_param))
    return n, tokens_per_param * n


def non_embedding_params(config: GPTConfig) -> int:
    """Kaplan et al.'s N: all parameters except the token and position embedding tables."""
    return param_count(config, non_embedding=True) - config.vocab_size * config.n_embd


def matmul_flops_per_s(
    size: int = 512,
    seconds: float = 1.0,
    dtype=torch.float32,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Measured FLOP/s of this machine on square ``size`` matrix products (2 size^3 each):
    at least three products, for at least ``seconds`` of ``clock``."""
    if size < 1 or seconds <= 0:
        raise ValueError(f"need size >= 1 and seconds > 0, got {size} and {seconds}")
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    n, start = 0, clock()
    while (elapsed := clock() - start) < seconds or n < 3:
        a @ b
        n += 1
    return 2.0 * size**3 * n / elapsed


def mfu(n_params: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation of a measured training run: 6 N tokens/s over a peak rate.

    The FLOP rate training achieves (``6 * n_params * tokens_per_s``) is a fraction of the
    machine's matmul peak: small matrices, attention, norms, the optimiser and memory traffic
    all cost time that does no weight FLOPs. Cost estimates divide by peak x MFU.
    """
    _check_positive(n_params=n_params, tokens_per_s=tokens_per_s,
                    peak_flops_per_s=peak_flops_per_s)
    return 6.0 * n_params * tokens_per_s / peak_flops_per_s


def training_seconds(flops: float, peak_flops_per_s: float, utilisation: float) -> float:
    """Wall time of ``flops`` of training at ``utilisation`` (MFU) of ``peak_flops_per_s``."""
    _check_positive(flops=flops, peak_flops_per_s=peak_flops_per_s, utilisation=utilisation)
    if utilisation > 1:
        raise ValueError(f"utilisation is a fraction of the peak (<= 1), got {utilisation!r}")
    return flops / (peak_flops_per_s * utilisation)


# ---------------------------------------------------------------------------- the fit
def power_law(n, a: float, alpha: float, c: float):
    """``a * n**-alpha + c`` (elementwise on arrays)."""
    return a * np.asarray(n, dtype=float) ** -alpha + c


def _fit_fixed_c(logn: np.ndarray, loss: np.ndarray, c: float) -> tuple[float, float, float]:
    """Least squares of log(L - c) = log a - alpha log n; returns (a, alpha, squared error)."""
    y = np.log(loss - c)
    slope, intercept = np.polyfit(logn, y, 1)
    a, alpha = math.exp(intercept), -slope
    return a, alpha, float(np.sum((a * np.exp(-alpha * logn) + c - loss) ** 2))


def fit_power_law(
    n: Sequence[float], loss: Sequence[float], *, steps: int = 50
) -> tuple[float, float, float]:
    """Fit ``loss ~ a * n**-alpha + c`` by least squares; return ``(a, alpha, c)``.

    A grid over the irreducible loss c in [0, min(loss)) with, for each c, a straight-line fit
    in log space (log(L - c) is linear in log n), then Gauss-Newton steps on all three
    parameters in the original space, accepted only when they lower the squared error.
    """
    n_arr, l_arr = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if n_arr.shape != l_arr.shape or n_arr.ndim != 1 or len(n_arr) < 3:
        raise ValueError("need two 1-D sequences of equal length >= 3 "
                         "(there are three unknowns: a, alpha, c)")
    if not (np.all(np.isfinite(n_arr)) and np.all(np.isfinite(l_arr))
            and np.all(n_arr > 0) and np.all(l_arr > 0)):
        raise ValueError("sizes and losses must be positive and finite")
    if len(np.unique(n_arr)) < 3:
        raise ValueError("need at least three distinct sizes to fit a power law with an offset")
    logn = np.log(n_arr)
    lo = float(l_arr.min())
    grid = lo * (1 - np.geomspace(1, 1e-4, 400))  # dense near min(loss), where fits get sharp
    best = min((_fit_fixed_c(logn, l_arr, c) + (c,) for c in grid), key=lambda t: t[2])
    a, alpha, sse, c = best
    theta = np.array([math.log(a), alpha, c])  # Gauss-Newton on (log a, alpha, c)
    for _ in range(steps):
        pw = np.exp(theta[0] - theta[1] * logn)
        r = pw + theta[2] - l_arr
        jac = np.stack([pw, -logn * pw, np.ones_like(pw)], axis=1)
        delta = np.linalg.lstsq(jac, -r, rcond=None)[0]
        for scale in (1.0, 0.5, 0.25, 0.125):
            cand = theta + scale * delta
            err = float(np.sum((np.exp(cand[0] - cand[1] * logn) + cand[2] - l_arr) ** 2))
            if err < sse and cand[2] < lo:
                theta, sse = cand, err
                break
        else:
            break
    return math.exp(theta[0]), float(theta[1]), float(theta[2])


# ---------------------------------------------------------------------------- a measured sweep
# Model shapes of the sweeps: (n_layer, n_head, n_embd), growing ~3x in non-embedding params.
SWEEP_SIZES: dict[str, tuple[int, int, int]] = {
    "xxs": (1, 2, 16),
    "xs": (2, 2, 24),
    "s": (2, 4, 32),
    "m": (3, 4, 48),
    "l": (4, 4, 64),
    "xl": (4, 4, 96),
    "xxl": (5, 4, 128),
}
SWEEP_FIELDS = ("name", "n_layer", "n_head", "n_embd", "params", "non_embedding_params",
                "iter", "tokens", "flops", "train_loss", "val_loss", "final")


def sweep(
    sizes: dict[str, tuple[int, int, int]],
    tokens: int,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    block_size: int = 64,
    evals: int = 8,
    **train_kw,
) -> list[dict]:
    """Train every size on the same ``tokens`` budget with ``minigpt.train``; return the rows.

    Each run logs to ``out_dir/<name>/log.jsonl``; each evaluation becomes a row (compute
    ``flops = 6 * non_embedding_params * tokens``), and the final whole-split validation loss
    a last row with ``final=True``. ``train_kw`` sets further ``TrainConfig`` fields (the
    defaults: byte-level BPE with 512 tokens on Tiny Shakespeare, lr 2e-3, no dropout, one
    thread). The trainer sets torch's thread count for the whole process. A run whose
    directory already holds a finished run of the same configuration is read, not retrained.
    """
    steps = max(1, tokens // (batch_size * block_size))
    kw = dict(dataset="tinyshakespeare", tokenizer="bpe", bpe_vocab_size=512, lr=2e-3,
              min_lr=2e-4, warmup_iters=max(1, steps // 20), eval_iters=10, progress=False,
              num_threads=1)  # tiny matrices: a second thread costs more than it brings
    kw.update(train_kw)
    rows = []
    for name, (n_layer, n_head, n_embd) in sizes.items():
        cfg = TrainConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          batch_size=batch_size, max_iters=steps,
                          eval_interval=max(1, steps // evals),
                          out_dir=str(Path(out_dir) / name), **kw)
        if not _finished(cfg):
            train(cfg)
        rows += run_rows(name, cfg.out_dir)
    return rows


def _finished(cfg) -> bool:
    """Whether ``cfg.out_dir`` holds a completed run of exactly this configuration."""
    config = Path(cfg.out_dir) / "config.json"
    if not config.is_file():
        return False
    done = json.loads(config.read_text(encoding="utf-8")).get("train", {})
    ignore = ("progress", "out_dir")  # neither changes the result
    same = {k: v for k, v in done.get("config", {}).items() if k not in ignore}
    return (same == {k: v for k, v in cfg.to_dict().items() if k not in ignore}
            and done.get("iterations") == cfg.max_iters)


def run_rows(name: str, run_dir: str | Path) -> list[dict]:
    """Sweep rows of one finished trainer run (its ``config.json`` and ``log.jsonl``)."""
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    config, train_cfg = GPTConfig.from_dict(saved["model"]), saved["train"]["config"]
    n = non_embedding_params(config)
    tokens_per_iter = train_cfg["batch_size"] * train_cfg["block_size"] * train_cfg[
        "grad_accum_steps"]
    base = dict(name=name, n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                params=param_count(config, non_embedding=False), non_embedding_params=n)
    rows = []
    for rec in read_metrics(run_dir / "log.jsonl"):
        seen = rec["iter"] * tokens_per_iter
        rows.append({**base, "iter": rec["iter"], "tokens": seen, "flops": 6.0 * n * seen,
                     "train_loss": rec["train_loss"], "val_loss": rec["val_loss"],
                     "final": False})
    final = saved["train"]
    seen = final["iterations"] * tokens_per_iter
    rows.append({**base, "iter": final["iterations"], "tokens": seen, "flops": 6.0 * n * seen,
                 "train_loss": rows[-1]["train_loss"], "val_loss": final["val_loss"],
                 "final": True})
    return rows


def write_sweep_csv(rows: list[dict], path: str | Path, command: str = "") -> Path:
    """Write sweep rows as CSV; ``command`` (how they were made) goes in a ``#`` header line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if command:
            f.write(f"# {command}\n")
        writer = csv.DictWriter(f, fieldnames=SWEEP_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
    return path


def read_sweep_csv(path: str | Path) -> list[dict]:
    """Rows of a sweep CSV (``#`` lines skipped), numbers parsed, ``final`` as a bool."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if not line.startswith("#")]
    rows = []
    for raw in csv.DictReader(lines):
        row: dict = {"name": raw["name"], "final": raw["final"] == "True"}
        for k in SWEEP_FIELDS:
            if k not in row:
                row[k] = float(raw[k]) if k in ("flops", "train_loss", "val_loss") else int(raw[k])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- IsoFLOP profiles
# Exponent a of the compute-optimal size N*(C) ~ C^a. Kaplan et al. 2020 (section 6.1): 0.73;
# Hoffmann et al. 2022 (table 2), their approaches 1, 2 and 3: 0.50, 0.49, 0.46.
KAPLAN_N_OPT_EXPONENT = 0.73
HOFFMANN_N_OPT_EXPONENTS = (0.50, 0.49, 0.46)


@dataclass(frozen=True)
class IsoFLOPFit:
    """A parabola in ln N through the losses of one compute budget (Hoffmann et al.'s
    approach 2): ``loss = c2 (ln N)^2 + c1 ln N + c0``, lowest at ``n_opt``."""

    flops: float
    c2: float
    c1: float
    c0: float

    @property
    def n_opt(self) -> float:
        """The size at the parabola's minimum: ln N* = -c1 / (2 c2)."""
        return math.exp(-self.c1 / (2 * self.c2))

    @property
    def loss_opt(self) -> float:
        """The fitted loss at ``n_opt``."""
        return float(self.loss(self.n_opt))

    def loss(self, n):
        """The fitted loss at size(s) ``n``."""
        x = np.log(np.asarray(n, dtype=float))
        return self.c2 * x**2 + self.c1 * x + self.c0


def fit_isoflop(n: Sequence[float], loss: Sequence[float], flops: float,
                neighbours: int | None = None) -> IsoFLOPFit:
    """Least-squares parabola in ln N through the final losses of models of sizes ``n``,
    each trained with the same compute ``flops``; its minimum is the best size N*(C).

    A parabola describes a profile only near its minimum: with ``neighbours=k`` the fit uses
    the best run and up to k sizes on each side of it (None: every run).
    """
    n_arr, l_arr = _positive_pairs(n, loss, minimum=3)
    _check_positive(flops=flops)
    if neighbours is not None:
        if neighbours < 1:
            raise ValueError(f"neighbours must be >= 1 (or None), got {neighbours}")
        order = np.argsort(n_arr)
        n_arr, l_arr = n_arr[order], l_arr[order]
        best = int(np.argmin(l_arr))
        keep = slice(max(0, best - neighbours), best + neighbours + 1)
        n_arr, l_arr = n_arr[keep], l_arr[keep]
        if len(np.unique(n_arr)) < 3:
            raise ValueError(f"the best size at C={flops:.3g} has too few neighbours for a "
                             "parabola: add sizes on both sides of it")
    c2, c1, c0 = np.polyfit(np.log(n_arr), l_arr, 2)
    if c2 <= 0:
        raise ValueError(f"the losses at C={flops:.3g} do not curve upwards in ln N, so they "
                         "have no minimum: add sizes on both sides of the best one")
    return IsoFLOPFit(float(flops), float(c2), float(c1), float(c0))


def fit_power(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Fit ``y = k * x**e`` by least squares on ln y against ln x; return ``(k, e)``,
    e.g. the exponent of N*(C) from the optima of several IsoFLOP profiles."""
    x_arr, y_arr = _positive_pairs(x, y, minimum=2)
    e, ln_k = np.polyfit(np.log(x_arr), np.log(y_arr), 1)
    return math.exp(ln_k), float(e)


def _positive_pairs(x: Sequence[float], y: Sequence[float], minimum: int):
    x_arr, y_arr = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x_arr.shape != y_arr.shape or x_arr.ndim != 1 or len(np.unique(x_arr)) < minimum:
        raise ValueError(f"need two 1-D sequences of equal length with at least {minimum} "
                         "distinct x values")
    if not (np.all(np.isfinite(x_arr)) and np.all(np.isfinite(y_arr))
            and np.all(x_arr > 0) and np.all(y_arr > 0)):
        raise ValueError("values must be positive and finite")
    return x_arr, y_arr


__all__ = [
    "HOFFMANN", "KAPLAN_ALPHA_C_MIN", "KAPLAN_ALPHA_D", "KAPLAN_ALPHA_N", "KAPLAN_N_C",
    "SWEEP_SIZES", "ChinchillaFit", "compute_optimal", "fit_power_law", "matmul_flops_per_s",
    "mfu", "non_embedding_params", "power_law", "read_sweep_csv", "run_rows", "sweep",
    "training_flops", "training_seconds", "write_sweep_csv",
]
__all__ += ["HOFFMANN_N_OPT_EXPONENTS", "IsoFLOPFit", "KAPLAN_N_OPT_EXPONENT", "fit_isoflop",
            "fit_power"]
