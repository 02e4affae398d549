"""Experiment tracking: metrics logs that can be read back, compared and plotted (chapter 9).

A run's metrics are one JSON object per line (JSONL), e.g. ``{"iter": 250, "val_loss": 2.1}``:
plain text, append-only, readable by anything, and safe when a run dies mid-write (at most the
last line is lost). ``MetricsLogger`` writes such a file and, when TensorBoard is installed,
the same scalars as TensorBoard events; without TensorBoard it warns once and goes on.
``read_metrics`` / ``columns`` read logs back (the trainer's ``log.jsonl`` too; it is the
package's only log reader), ``plot_losses`` draws one run's train/val curves and
``plot_runs`` / ``compare_runs`` put several runs side by side.

A crash can tear only the last line of an append-only log, so the reader skips a torn last
line with a warning (naming the file and line) and refuses a bad line anywhere else.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

_TB_WARNED = False  # warn about a missing TensorBoard once per process


def _summary_writer(log_dir: str | os.PathLike):
    """A ``torch.utils.tensorboard.SummaryWriter``, or None (one warning) if unavailable."""
    global _TB_WARNED
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the separate `tensorboard` package
        if not _TB_WARNED:
            warnings.warn(f"TensorBoard logging is off ({e}); `pip install tensorboard` to "
                          "enable it. Metrics still go to the JSONL log.", stacklevel=3)
            _TB_WARNED = True
        return None
    return SummaryWriter(log_dir=str(log_dir))


class MetricsLogger:
    """Append metrics to a JSONL file and (optionally) to TensorBoard.

    ``path`` None writes no JSONL (e.g. when the trainer already writes ``log.jsonl``);
    ``tensorboard_dir`` None writes no events. ``log(step, **metrics)`` records one step;
    calling the logger with a record dict holding ``step_key`` does the same, so it can be
    passed as the trainer's callback: ``train(cfg, callback=MetricsLogger(None, "runs/tb"))``.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        *,
        step_key: str = "iter",
    ) -> None:
        self.path = None if path is None else Path(path)
        self.step_key = step_key
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None if self.path is None else open(self.path, "a", encoding="utf-8")
        self.writer = None if tensorboard_dir is None else _summary_writer(tensorboard_dir)

    def log(self, step: int, **metrics: float | int | str | bool | None) -> None:
        """Record ``metrics`` at ``step``: a JSONL line; numbers also as TensorBoard
        scalars."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        if self.step_key in metrics:
            raise ValueError(f"{self.step_key!r} is the step's key; pass it as `step`")
        if self._file is not None:
            self._file.write(json.dumps({self.step_key: step, **metrics}) + "\n")
            self._file.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(name, value, global_step=step)

    def __call__(self, record: dict) -> None:
        """Log a record that holds its step under ``step_key`` (the trainer's callback)."""
        if self.step_key not in record:
            raise ValueError(f"the record has no {self.step_key!r} key: {sorted(record)}")
        rest = {k: v for k, v in record.items() if k != self.step_key}
        self.log(int(record[self.step_key]), **rest)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one record as a JSON line (the trainer's ``log.jsonl``), flushed at once."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike, *, include_final: bool = False) -> list[dict]:
    """The records of a JSONL metrics log, in order.

    Blank lines are skipped. A trainer log ends with a ``{"final": {...}}`` summary; it is
    left out unless ``include_final``. A run killed while writing can tear only the *last*
    line: such a line is skipped with a warning naming the file and line. Any other line that
    is not a JSON object raises a ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no metrics log at {path}")
    lines = [(i, ln) for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if ln.strip()]
    records = []
    for n, (i, line) in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                warnings.warn(f"{path}, line {i}: skipped a torn last line ({e.msg}); the run "
                              "was probably killed while writing it", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg}); delete or fix "
                             "that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {i}: expected a JSON object, got {line[:40]!r}")
        if include_final or "final" not in record:
            records.append(record)
    return records


def final_summary(path: str | os.PathLike) -> dict | None:
    """The trainer's closing ``{"final": {...}}`` summary of a log, or None if it has none."""
    finals = [r["final"] for r in read_metrics(path, include_final=True) if "final" in r]
    return finals[-1] if finals else None


def columns(records: Sequence[dict], keys: Sequence[str] | None = None) -> dict[str, list]:
    """Records as columns: ``{key: [value per record]}``, None where a record lacks the key.

    ``keys`` defaults to every key, in order of first appearance.
    """
    if keys is None:
        keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def _run_records(run, metric: str, x: str) -> tuple[list[float], list[float]]:
    records = run if isinstance(run, list) else read_metrics(run)
    pairs = [(r[x], r[metric]) for r in records if r.get(x) is not None
             and isinstance(r.get(metric), int | float) and math.isfinite(r[metric])]
    if not pairs:
        raise ValueError(f"no records with both {x!r} and {metric!r}")
    xs, ys = zip(*pairs, strict=True)
    return list(xs), list(ys)


def plot_runs(
    runs: Sequence[str | os.PathLike | list[dict]],
    metric: str = "val_loss",
    *,
    x: str = "iter",
    labels: Sequence[str] | None = None,
    ax=None,
    logx: bool = False,
    logy: bool = False,
    title: str | None = None,
):
    """Plot ``metric`` against ``x`` for several runs (log paths or lists of records).

    Labels default to each log's directory name (``out/run-a/log.jsonl`` -> ``run-a``).
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if labels is None:
        labels = [Path(r).parent.name if not isinstance(r, list) else f"run {i}"
                  for i, r in enumerate(runs)]
    if len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for run, label in zip(runs, labels, strict=True):
        xs, ys = _run_records(run, metric, x)
        ax.plot(xs, ys, "o-", ms=3, label=label)
    ax.set(xlabel=x, ylabel=metric, title=title or f"{metric} by run",
           xscale="log" if logx else "linear", yscale="log" if logy else "linear")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def plot_losses(records: list[dict] | str | os.PathLike, ax=None, title: str = "Loss curve"):
    """Plot train and val loss against the step from trainer records (or a log.jsonl path)."""
    import matplotlib.pyplot as plt

    if not isinstance(records, list):
        records = read_metrics(records)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["iter"] for r in records]
    ax.plot(steps, [r["train_loss"] for r in records], "o-", label="train")
    ax.plot(steps, [r["val_loss"] for r in records], "s-", label="validation")
    ax.set(title=title, xlabel="optimiser step", ylabel="cross-entropy loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def compare_runs(
    runs: Sequence[str | os.PathLike], metric: str = "val_loss", *, x: str = "iter"
) -> list[dict]:
    """One row per run log: its name, the last and the best ``metric`` and where it was best."""
    rows = []
    for run in runs:
        xs, ys = _run_records(run, metric, x)
        best = min(range(len(ys)), key=ys.__getitem__)
        rows.append({"run": Path(run).parent.name, f"last_{metric}": ys[-1],
                     f"best_{metric}": ys[best], f"best_{x}": xs[best]})
    return rows


__all__ = ["MetricsLogger", "append_record", "columns", "compare_runs", "final_summary",
           "plot_losses", "plot_runs", "read_metrics"]
