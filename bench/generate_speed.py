"""Decoding speed: tokens/s of ``minigpt.generate`` with and without the KV cache, against
Hugging Face ``transformers`` ``generate(use_cache=True, do_sample=False)`` on the same shapes.

Run from the repository root (``--hf`` needs ``transformers``, a bench-only dependency):

    python bench/generate_speed.py --out data/bench/generate_speed.json   # what chapter 6 reads
    python bench/generate_speed.py --models char --lengths 128 512 --repeats 5 --hf

``cached`` decodes with the KV cache through ``minigpt.engine`` (the default), ``module`` with
the KV cache through the model's modules (``engine=False``).

Batch 1, greedy, an 8-token prompt; every timing is the median of ``--repeats`` runs after a
warm-up, stored with its spread (min and max), and ours/HF is the median of the per-pair ratios
of interleaved runs. Models:

* ``char``: the shipped Shakespeare character model's shape (``data/checkpoints/shakespeare-char``
  if it exists, else a 4-layer 128-wide stand-in), loaded weights when present;
* ``gpt2``: GPT-2 small (124M), random weights.

Both frameworks get a context of prompt + longest length, so neither has to slide a window and
they do exactly the same arithmetic. The uncached loop costs O(n^2) in the number of generated
tokens, so it is timed only up to ``--uncached-max`` tokens. Writes a table to stdout,
``bench/out/generate_speed.png`` (tokens/s, and the cache's speed-up, against length) and, with
``--out``, a JSON file with the rows, the command and the machine (CPU, cores, torch, load).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine, summary

from minigpt.atomic import atomic_write_text
from minigpt.checkpoint import load_model
from minigpt.generate import generate
from minigpt.model import GPT, GPTConfig, gpt2_config

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN = 8


def shipped_config(name: str, context: int) -> tuple[GPTConfig, Path | None]:
    """A shipped model's config (``shakespeare-char`` or ``-bpe``) with the context widened to
    ``context`` tokens; a 4-layer 128-wide stand-in when the checkpoint is missing."""
    ckpt = ROOT / "data" / "checkpoints" / f"shakespeare-{name}"
    if (ckpt / "config.json").is_file():
        model, _ = load_model(ckpt)
        cfg = model.config.to_dict()
    else:
        ckpt = None
        cfg = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128).to_dict()
    cfg.update(block_size=max(cfg["block_size"], context), dropout=0.0)
    return GPTConfig(**cfg), ckpt


def build_models(name: str, context: int, with_hf: bool):
    """Our GPT and (``with_hf``) a Hugging Face GPT2LMHeadModel of the same shapes (eval)."""
    if name == "gpt2":
        cfg, ckpt = gpt2_config("gpt2", block_size=max(1024, context)), None
    else:
        cfg, ckpt = shipped_config(name, context)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    if ckpt is not None:  # the trained weights; positions past the trained context stay random
        trained, _ = load_model(ckpt)
        state = trained.state_dict()
        wpe = state.get("transformer.wpe.weight")
        if wpe is not None:
            full = ours.transformer.wpe.weight.detach().clone()
            full[: wpe.size(0)] = wpe
            state["transformer.wpe.weight"] = full
        ours.load_state_dict(state)
    if not with_hf:
        return ours, None, ckpt
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=None, eos_token_id=None,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    return ours, hf, ckpt


def run_times(fns: dict, repeats: dict) -> dict:
    """Wall times of each function over its repeats; the runs are interleaved (A B C A B C ...)
    so that a change in the machine's load hits every variant alike."""
    times: dict = {name: [] for name in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r < repeats[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over interleaved pairs of b_i / a_i: a speed ratio that holds when the machine's
    speed drifts between pairs (a ratio of two medians would not)."""
    return statistics.median(y / x for x, y in zip(a, b, strict=True))


def bench_model(name: str, lengths: list[int], repeats: int, uncached_max: int,
                with_hf: bool) -> list[dict]:
    ours, hf, ckpt = build_models(name, PROMPT_LEN + max(lengths), with_hf)
    print(f"\n## {name}: {ours.num_params() / 1e6:.1f}M parameters, "
          f"{'weights from ' + str(ckpt.relative_to(ROOT)) if ckpt else 'random weights'}")
    prompt = torch.randint(0, ours.config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator()
                           .manual_seed(0))

    def variants(n: int) -> dict:
        def run_ours(cache: bool, engine: bool = True) -> None:
            out = generate(ours, prompt, n, temperature=0, use_cache=cache, engine=engine)
            assert len(out[0]) == n

        def run_hf() -> None:
            with torch.inference_mode():
                out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  use_cache=True, max_new_tokens=n, min_new_tokens=n)
            assert out.size(1) == PROMPT_LEN + n

        fns = {"cached": lambda: run_ours(True), "module": lambda: run_ours(True, False)}
        if with_hf:
            fns["hf"] = run_hf
        if n <= uncached_max:
            fns["uncached"] = lambda: run_ours(False)
        return fns

    warm_up = variants(16)
    run_times(warm_up, {k: 1 for k in warm_up})
    rows = []
    for n in lengths:
        fns = variants(n)
        times = run_times(fns, {k: repeats for k in fns})
        row = {"model": name, "params": ours.num_params(), "tokens": n}
        row.update({k: summary([n / t for t in ts], 2) for k, ts in times.items()})
        row["engine_speedup"] = round(paired_ratio(times["cached"], times["module"]), 3)
        line = (f"{n:5d} tokens | minigpt cached {row['cached']['median']:8.1f} tok/s"
                f" | module path {row['module']['median']:8.1f} tok/s")
        if "uncached" in row:
            row["speedup"] = round(paired_ratio(times["cached"], times["uncached"]), 3)
            line += (f" | uncached {row['uncached']['median']:8.1f} tok/s"
                     f" | cache speed-up {row['speedup']:.2f}x")
        if with_hf:
            row["ours/hf"] = round(paired_ratio(times["cached"], times["hf"]), 3)
            line += f" | HF cached {row['hf']['median']:8.1f} tok/s | ours/HF {row['ours/hf']:.2f}x"
        rows.append(row)
        print(line, flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == name]
        n = [r["tokens"] for r in rs]
        ax1.plot(n, [r["cached"]["median"] for r in rs], "o-", label=f"{name}: minigpt, KV cache")
        if "hf" in rs[0]:
            ax1.plot(n, [r["hf"]["median"] for r in rs], "s--", label=f"{name}: HF generate")
        un = [r for r in rs if "uncached" in r]
        ax1.plot([r["tokens"] for r in un], [r["uncached"]["median"] for r in un], "x:",
                 label=f"{name}: minigpt, no cache")
        ax2.plot([r["tokens"] for r in un], [r["speedup"] for r in un], "o-", label=name)
    ax1.set(xscale="log", yscale="log", xlabel="generated tokens", ylabel="tokens / s",
            title="Greedy decoding speed, batch 1 (medians)")
    ax2.set(xscale="log", xlabel="generated tokens", ylabel="cached / uncached time",
            title="KV-cache speed-up against length")
    ax1.legend(fontsize=7)
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["bpe", "gpt2"],
                    choices=["char", "bpe", "gpt2"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 32, 64, 128, 256, 1016])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uncached-max", type=int, default=128,
                    help="longest uncached run (the uncached loop is O(n^2))")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, prompt {PROMPT_LEN} tokens, "
          f"medians of {args.repeats} runs")
    result = {"command": "python bench/generate_speed.py "
              + shlex.join(sys.argv[1:] if argv is None else argv),
              "machine": machine(), "prompt_tokens": PROMPT_LEN, "rows": []}
    start = time.perf_counter()
    for name in args.models:
        result["rows"] += bench_model(name, args.lengths, args.repeats, args.uncached_max,
                                      args.hf)
    plot(result["rows"], ROOT / "bench" / "out" / "generate_speed.png")
    result["load_average_after"] = machine()["load_average_1_5_15"]
    result["wall_seconds"] = round(time.perf_counter() - start)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out} in {result['wall_seconds']} s")


if __name__ == "__main__":
    main()
