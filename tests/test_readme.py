"""The speed figures the README and the shipped configs quote are those of the files they cite.

The README quotes whole-run times and ratios against nanoGPT, and two configs' descriptions
quote their measured runs. Those numbers are made by ``bench/sweep_char.py``,
``bench/vs_nanogpt.py`` and the shipped checkpoint's training; these tests rebuild each
quoted phrase from the JSON files, so re-running a benchmark without updating the text fails.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from minigpt.cli import load_config

ROOT = Path(__file__).resolve().parents[1]
README = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
SWEEP_DEFAULT = "+ 2 micro-batches in 2 threads (= shakespeare_char)"
SWEEP_BASELINE = "nanogpt-cpu (baseline)"
AMX_ROW = ("long recipe, 6 layers, ctx 128, bf16, RoPE, no biases, exact GELU, 4,800 steps, "
           "weight decay 0.2")


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


def config_phrases() -> list[tuple[str, str]]:
    sweep = {r["name"]: r for r in json.loads(
        (ROOT / "data" / "sweeps" / "shakespeare_char.json").read_text())}
    amx = sweep[AMX_ROW]
    shipped = json.loads((ROOT / "data" / "checkpoints" / "manifest.json").read_text())
    long_run = shipped["shakespeare-char"]
    assert long_run["command"].startswith("python -m minigpt train --config shakespeare_char_long")
    seed1, seed2 = (sweep[f"shakespeare_char_amx, seed {n}"] for n in (1, 2))
    return [("shakespeare_char_amx",
             f"measured {amx['val_loss']:.3f} (whole split) in {amx['wall_time_s']:.0f} s"),
            ("shakespeare_char_amx", f"{seed1['val_loss']:.3f} and {seed2['val_loss']:.3f} "
                                     "with seeds 1 and 2"),
            ("shakespeare_char_long",
             f"measured {long_run['val_loss']:.3f} in {long_run['wall_time_s']:.0f} s")]


def long_run_phrases() -> list[str]:
    """The two ten-minute recipes, as the configs' descriptions quote them."""
    phrases = [phrase.replace(" (whole split)", "").removeprefix("measured ")
               for _, phrase in config_phrases()]
    amx = load_config("shakespeare_char_amx", [])
    shape = f"{amx.n_layer} layers, {amx.block_size} characters of context"
    return [shape] + [p.replace("with seeds 1 and 2", "with two other seeds") for p in phrases]


@pytest.mark.parametrize("phrase",
                         sweep_phrases() + vs_nanogpt_phrases() + long_run_phrases())
def test_readme_quotes_the_benchmark_files(phrase):
    assert phrase in README.replace("`", ""), f"README.md should say: {phrase!r}"


@pytest.mark.parametrize(("config", "phrase"), config_phrases())
def test_config_descriptions_quote_their_runs(config, phrase):
    file = ROOT / "src" / "minigpt" / "configs" / f"{config}.json"
    assert phrase in json.loads(file.read_text())["description"], f"{file.name}: {phrase!r}"


def test_the_amx_config_is_the_run_its_description_quotes():
    """shakespeare_char_amx = the sweep row's command (shakespeare_char_long + its --set),
    but for dtype "auto", which trains in bf16, as the row did, on a CPU with bf16."""
    row = {r["name"]: r for r in json.loads(
        (ROOT / "data" / "sweeps" / "shakespeare_char.json").read_text())}[AMX_ROW]
    args = shlex.split(row["command"])
    assert args[:6] == ["python", "-m", "minigpt", "train", "--config", "shakespeare_char_long"]
    overrides = [a for flag, a in zip(args[6::2], args[7::2], strict=True) if flag == "--set"]
    measured = load_config("shakespeare_char_long", overrides).to_dict()
    shipped = load_config("shakespeare_char_amx", []).to_dict()
    assert measured["dtype"] == row["dtype"] == "bfloat16"
    assert {k: v for k, v in shipped.items() if measured[k] != v} == {
        "out_dir": "out/shakespeare_char_amx", "dtype": "auto"}
