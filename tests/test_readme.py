"""The README's speed figures are the ones in the benchmark files it cites.

The README quotes whole-run times and ratios against nanoGPT. Those numbers are made by
``bench/sweep_char.py`` and ``bench/vs_nanogpt.py``; this test rebuilds each quoted phrase
from the JSON files, so re-running a benchmark without updating the README fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
SWEEP_DEFAULT = "+ 2 micro-batches in 2 threads (= shakespeare_char)"
SWEEP_BASELINE = "nanogpt-cpu (baseline)"


def span(times: list[float]) -> str:
    """'95-102 s': the range of wall times, in whole seconds."""
    return f"{min(times):.0f}-{max(times):.0f} s"


def sweep_phrases() -> list[str]:
    rows = {r["name"]: r for r in json.loads(
        (ROOT / "data" / "sweeps" / "shakespeare_char.json").read_text())}
    ours, base = rows[SWEEP_DEFAULT], rows[SWEEP_BASELINE]
    assert ours["cpu"] == base["cpu"] == "AMD EPYC"  # the README names this machine
    return [f"{span(ours['wall_times_s'])} against {span(base['wall_times_s'])}",
            f"validation loss of {ours['val_loss']:.2f} against {base['val_loss']:.2f}"]


def vs_nanogpt_phrases() -> list[str]:
    bench = json.loads((ROOT / "data" / "bench" / "vs_nanogpt.json").read_text())
    train, step = bench["train"], bench["step"]
    ours = [p["minigpt"]["wall_s"] for p in train["pairs"]]
    theirs = [p["nanogpt"]["wall_s"] for p in train["pairs"]]
    command = train["minigpt_command"].removeprefix("python -m ").replace('"', "")
    return [train["machine"]["cpu"], command,
            f"{span(ours)} against {span(theirs)}",
            f"a median of {train['speedup_median']:.2f}x nanoGPT's speed over "
            f"{len(train['pairs'])} pairs",
            f"{train['minigpt_val_loss']:.2f} against {train['nanogpt_val_loss']:.2f}",
            f"{step['speedup_median']:.2f}x nanoGPT's with --step-dtype {step['minigpt_dtype']}"]


@pytest.mark.parametrize("phrase", sweep_phrases() + vs_nanogpt_phrases())
def test_readme_quotes_the_benchmark_files(phrase):
    assert phrase in README.replace("`", ""), f"README.md should say: {phrase!r}"
