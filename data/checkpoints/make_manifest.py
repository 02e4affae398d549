"""Copy a finished training run into data/checkpoints/NAME and record it in manifest.json.

    python data/checkpoints/make_manifest.py NAME RUN_DIR "python -m minigpt train ..." OUT_DIR

The run may have written to any RUN_DIR (e.g. via --set out_dir=...); the stored config gets
OUT_DIR (the config file's own relative out_dir) instead, so no machine path is recorded.

Copies model.safetensors, config.json and log.jsonl (not the resumable ckpt.pt) and records,
per file, its SHA-256 and size (``minigpt.checkpoint.file_record``, the format
``load_model`` verifies on every load of a directory listed here), plus the command that
trained it, the final loss on the whole validation split, the wall time and the throughput
(from config.json's "train" entry). Every file is written atomically (``minigpt.atomic``);
at the end the copy is loaded once, which checks it against the new manifest entry.
"""

import json
import sys
from pathlib import Path

from minigpt.atomic import atomic_write, atomic_write_text
from minigpt.checkpoint import file_record, load_model

HERE = Path(__file__).resolve().parent
FILES = ("model.safetensors", "config.json", "log.jsonl")


def main(name: str, run_dir: str, command: str, out_dir: str) -> None:
    dest = HERE / name
    for f in FILES:
        atomic_write(dest / f, lambda tmp, f=f: tmp.write_bytes(Path(run_dir, f).read_bytes()))
    # out_dir only says where the run wrote its files; store the config file's relative one
    config = json.loads((dest / "config.json").read_text())
    config["train"]["config"]["out_dir"] = out_dir
    atomic_write_text(dest / "config.json", json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    train = config["train"]
    manifest_file = HERE / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    manifest[name] = {
        "command": command,
        "val_loss": train["val_loss"],
        "iterations": train["iterations"],
        "params": train["params"],
        "wall_time_s": round(train["wall_time"], 1),
        "tokens_per_s": round(train["tokens_per_s"]),
        "files": {f: file_record(dest / f) for f in FILES},
    }
    atomic_write_text(manifest_file, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    load_model(dest)  # verifies the copy against the entry just written


if __name__ == "__main__":
    main(*sys.argv[1:5])
