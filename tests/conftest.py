"""Shared test toolkit: tiny models, small corpora, an isolated cache, and the ``slow`` marker.

Fixtures here are the ones several test files need; a test file keeps a fixture of its own
only when it is about that file's subject. ``pytest -m "not slow"`` is the quick loop: it
skips the notebooks (nbval) and the tests marked ``slow`` (subprocesses, DDP, real training).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from minigpt.model import GPT, GPTConfig

WORDS = (
    "the king is dead long live the queen my lord speak thou art a fool what light "
    "through yonder window breaks now is the winter of our discontent"
).split()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes seconds (skip with -m 'not slow')")
    _share_cores()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's default): one worker per core, at most 4 (each notebook
    kernel holds its own torch and models in memory, and the nine notebooks are the long
    pole: more workers mostly wait)."""
    return max(1, min(os.cpu_count() or 1, 4))


def _share_cores() -> None:
    """Under pytest-xdist, split the cores between the workers: each worker's torch, and the
    notebook kernels it starts (they inherit ``OMP_NUM_THREADS``), get cores / workers
    threads, so that workers do not oversubscribe the machine (which slows OpenMP down
    several-fold). Results do not depend on the thread count (README)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _is_notebook(item: pytest.Item) -> bool:
    return item.nodeid.startswith("book/") or type(item).__name__.startswith("IPyNb")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every notebook cell (nbval) is slow: a notebook runs for tens of seconds. The
    notebooks run first, the later (longer) chapters before the earlier ones, so that with
    several workers the unit tests fill the gaps instead of a long notebook ending the run
    alone; cells keep their order within a notebook."""
    for item in items:
        if _is_notebook(item):
            item.add_marker(pytest.mark.slow)
    chapters = sorted({item.nodeid.split("::")[0] for item in items if _is_notebook(item)},
                      reverse=True)
    rank = {name: i for i, name in enumerate(chapters)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


@pytest.fixture(autouse=True)
def _interruptible() -> Iterator[None]:
    """pytest-xdist workers ignore SIGINT (the controller handles Ctrl-C), and a process
    started with SIGINT ignored keeps it ignored (``minigpt.train.StopOnSignal`` respects
    that, as under ``nohup``). Tests run with Python's default SIGINT handler, as in a
    terminal; their subprocesses inherit the default action."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def tiny_config() -> GPTConfig:
    """A GPT small enough that a forward pass takes microseconds."""
    return GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tiny_model(tiny_config: GPTConfig) -> GPT:
    """A seeded, untrained tiny GPT in eval mode."""
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``MINIGPT_CACHE_DIR`` for this test only."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def cache(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated cache and no mirror: registered files come from the network or nowhere."""
    monkeypatch.delenv("MINIGPT_DATA_MIRROR", raising=False)
    return isolated_cache


@pytest.fixture
def corpus(tmp_path: Path, isolated_cache: Path) -> Path:
    """A 600-line text file of Shakespeare-ish words (seeded), with an isolated cache."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(600)]
    file = tmp_path / "tiny.txt"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return file
