"""minigpt against nanoGPT on this machine: whole training runs and one GPT-2-small step.

    python bench/vs_nanogpt.py --nanogpt PATH [--pairs 3] [--only train|step]

``PATH`` is a checkout of nanoGPT (github.com/karpathy/nanoGPT); its code is run from there,
never copied here. Two comparisons, each run as A/B pairs in turn (A = nanoGPT, B = minigpt)
so that a drift in the machine's speed hits both; the ratio A/B of each pair is recorded and
the median quoted:

- ``train``: nanoGPT's published CPU recipe for character-level Tiny Shakespeare (4 layers,
  4 heads, 128 wide, context 64, batch 12, 2,000 steps, 20 evaluation batches every 250
  steps) against ``python -m minigpt train`` with the same shapes and steps, each a whole
  process from start to exit (data already prepared). Both final models are then scored on
  the whole validation split by ``minigpt.train.estimate_loss``; nanoGPT's checkpoint loads
  into ``minigpt.model.GPT`` because the parameter names are the same.
- ``step``: one GPT-2-small (124M) training step, 1 x 1,024 tokens, forward + backward +
  clipping + AdamW, in one process for both models (median over steps, pairs alternated).

The result goes to ``data/bench/vs_nanogpt.json``; each comparison records the CPU model, core
count and torch version it ran on, and the load average before each run (``--only`` replaces
one comparison and keeps the other). Time only on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine

from minigpt.atomic import atomic_write_text
from minigpt.cli import load_config
from minigpt.data import prepare_data
from minigpt.model import GPT, GPTConfig
from minigpt.optim import optimizer_step
from minigpt.train import estimate_loss, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
NANOGPT_CPU_ARGS = [  # nanoGPT's README, "I only have a macbook" (CPU)
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
    "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
]


def timed(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Run a whole process; wall seconds and the 1-minute load average before it."""
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "load_before": round(load, 2)}


def prepare_nanogpt_data(nanogpt: Path) -> None:
    """nanoGPT's own prepare.py over our verified copy of Tiny Shakespeare."""
    folder = nanogpt / "data" / "shakespeare_char"
    if (folder / "train.bin").is_file():
        return
    tokenizer, _, _ = prepare_data(load_config("nanogpt_cpu", []).data_spec)
    corpus = Path(os.environ.get("MINIGPT_DATA_MIRROR", "")) / "tinyshakespeare" / "input.txt"
    if not corpus.is_file():
        sys.exit("set MINIGPT_DATA_MIRROR, or copy Tiny Shakespeare's input.txt to "
                 f"{folder}/input.txt, then run again")
    shutil.copyfile(corpus, folder / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True)


def nanogpt_val_loss(ckpt: Path, val_ids) -> float:
    """Whole-split validation loss of a nanoGPT checkpoint, scored by minigpt."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    a = state["model_args"]
    model = GPT(GPTConfig(vocab_size=a["vocab_size"], block_size=a["block_size"],
                          n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"],
                          dropout=0.0, bias=a["bias"], gelu_approx="none"))  # nn.GELU()
    weights = {k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    return estimate_loss(model, val_ids, a["block_size"])


def compare_training(nanogpt: Path, pairs: int, config: str, overrides: list[str]) -> dict:
    prepare_nanogpt_data(nanogpt)
    _, _, val_ids = prepare_data(load_config(config, []).data_spec)
    work = Path(tempfile.mkdtemp(prefix="vs_nanogpt_"))
    env = dict(os.environ)
    a_cmd = [sys.executable, "train.py", *NANOGPT_CPU_ARGS, f"--out_dir={work / 'nanogpt'}"]
    b_cmd = [sys.executable, "-m", "minigpt", "train", "--config", config, "--force",
             "--set", f"out_dir={work / 'minigpt'}", "--set", "progress=false",
             *(arg for o in overrides for arg in ("--set", o))]
    runs = []
    for _ in range(pairs):
        a, b = timed(a_cmd, nanogpt, env), timed(b_cmd, ROOT, env)
        runs.append({"nanogpt": a, "minigpt": b, "ratio": round(a["wall_s"] / b["wall_s"], 3)})
        print(f"train pair: nanoGPT {a['wall_s']} s, minigpt {b['wall_s']} s", flush=True)
    ours = json.loads((work / "minigpt" / "config.json").read_text())["train"]
    result = {
        "nanogpt_command": " ".join(["python", "train.py", *NANOGPT_CPU_ARGS]),
        "minigpt_command": " ".join(["python -m minigpt train --config", config,
                                     *(f"--set {o}" for o in overrides)]), "pairs": runs,
        "speedup_median": statistics.median(r["ratio"] for r in runs),
        "nanogpt_val_loss": round(nanogpt_val_loss(work / "nanogpt" / "ckpt.pt", val_ids), 4),
        "minigpt_val_loss": round(ours["val_loss"], 4),
    }
    shutil.rmtree(work, ignore_errors=True)
    return result


def load_nanogpt_model(nanogpt: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step_time(model, optimizer, x, y, steps: int, dtype: str = "float32") -> float:
    """Median seconds of forward + backward + clip + AdamW over ``steps`` steps."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
            _, loss = model(x, y)
        loss.backward()
        optimizer_step(optimizer, 6e-4, 1.0)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare_step(nanogpt: Path, pairs: int, dtype: str, steps: int = 3) -> dict:
    nano = load_nanogpt_model(nanogpt)
    torch.manual_seed(0)
    a_model = nano.GPT(nano.GPTConfig(vocab_size=50257, dropout=0.0, bias=True))
    a_opt = a_model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    b_model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
                            n_embd=768, dropout=0.0, bias=True))
    b_opt = make_optimizer(b_model, load_config("gpt2_small", []))
    x, y = torch.randint(0, 50257, (2, 1, 1024))
    step_time(a_model, a_opt, x, y, 1), step_time(b_model, b_opt, x, y, 1, dtype)  # warm up
    runs = []
    for _ in range(pairs):
        a = step_time(a_model, a_opt, x, y, steps)  # nanoGPT: fp32, its only mode on a CPU
        b = step_time(b_model, b_opt, x, y, steps, dtype)
        runs.append({"nanogpt_s": round(a, 3), "minigpt_s": round(b, 3),
                     "ratio": round(a / b, 3)})
        print(f"step pair: nanoGPT {a:.3f} s, minigpt {b:.3f} s", flush=True)
    return {"shape": "GPT-2 small, 1 x 1024 tokens, AdamW", "minigpt_dtype": dtype,
            "nanogpt_dtype": "float32", "pairs": runs,
            "speedup_median": statistics.median(r["ratio"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs per comparison")
    parser.add_argument("--only", choices=["train", "step"], help="run one comparison")
    parser.add_argument("--config", default="shakespeare_char",
                        help="minigpt config for the training comparison")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of that config (repeatable), e.g. dtype=bfloat16")
    parser.add_argument("--step-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="minigpt's precision in the step comparison (bfloat16: autocast)")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "bench" / "vs_nanogpt.json")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        sys.exit(f"{args.nanogpt} is not a nanoGPT checkout (no train.py); "
                 "git clone https://github.com/karpathy/nanoGPT")
    # --only re-measures one comparison and keeps the other one already in the file
    result = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    if args.only in (None, "train"):
        result["train"] = {"machine": machine(),
                           **compare_training(args.nanogpt, args.pairs, args.config, args.set)}
    if args.only in (None, "step"):
        step = compare_step(args.nanogpt, args.pairs, args.step_dtype)
        result["step"] = {"machine": machine(), **step}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
