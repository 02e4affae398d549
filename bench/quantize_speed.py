"""Int8 dynamic quantization on this CPU: file size, decoding speed, and the loss it costs.

    python bench/quantize_speed.py                      # shipped BPE model + GPT-2 small
    python bench/quantize_speed.py --threads 1 --batch-sizes 1 4 16 64

For each model: float32, torch's ``quantize_dynamic`` and the from-scratch ``Int8Linear``
(``minigpt.quantize``), the ``state_dict`` size, greedy KV-cache decoding speed at batch 1 and
(shipped model only; GPT-2 small is randomly initialised) the validation loss. Then decoding
throughput and per-token latency against the batch size. Run from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from minigpt import data
from minigpt.checkpoint import load_model
from minigpt.model import GPT, gpt2_config
from minigpt.quantize import decode_speed, quantize_model, state_dict_bytes
from minigpt.train import estimate_loss


def val_tokens(model_dir: Path, tokenizer):
    """The validation split of the shipped model's corpus, tokenised by its tokenizer."""
    import json

    train_cfg = json.loads((model_dir / "config.json").read_text())["train"]["config"]
    out = Path(tempfile.mkdtemp())
    data.prepare_bin(data.path(train_cfg["dataset"]), tokenizer, out,
                     val_fraction=train_cfg["val_fraction"])
    return data.load_bin(out / "val.bin")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="data/checkpoints/shakespeare-bpe")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--skip-gpt2", action="store_true", help="leave out GPT-2 small (124M)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shipped, tokenizer = load_model(args.model_dir)
    models = {"shipped": shipped}
    if not args.skip_gpt2:
        models["gpt2 (random)"] = GPT(gpt2_config("gpt2")).eval()
    val = val_tokens(Path(args.model_dir), tokenizer)
    print(f"threads={args.threads}  new_tokens={args.new_tokens}")
    print(f"{'model':<14} {'variant':<14} {'MB':>8} {'tok/s':>8} {'ms/tok':>8} {'val loss':>9}")
    for name, model in models.items():
        variants = {"float32": model, "torch int8": quantize_model(model, "torch"),
                    "scratch int8": quantize_model(model, "scratch"),
                    "torch int8+head": quantize_model(model, "torch", include_lm_head=True)}
        for vname, m in variants.items():
            speed = decode_speed(m, 1, args.new_tokens, repeats=2)
            loss = (f"{estimate_loss(m, val, m.config.block_size, max_batches=20):9.4f}"
                    if name == "shipped" else f"{'-':>9}")
            print(f"{name:<14} {vname:<14} {state_dict_bytes(m) / 1e6:8.2f} "
                  f"{speed['tokens_per_s']:8.1f} {speed['ms_per_token']:8.2f} {loss}")
    print("\nbatched decoding (shipped model): throughput vs latency")
    q = quantize_model(shipped, "torch")
    for b in args.batch_sizes:
        f, i = decode_speed(shipped, b, args.new_tokens), decode_speed(q, b, args.new_tokens)
        print(f"batch {b:>3}: float {f['tokens_per_s']:8.0f} tok/s {f['ms_per_token']:7.2f} ms/step"
              f" | int8 {i['tokens_per_s']:8.0f} tok/s {i['ms_per_token']:7.2f} ms/step")


if __name__ == "__main__":
    main()
