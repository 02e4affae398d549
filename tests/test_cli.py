"""``python -m minigpt``: train / eval / sample, config resolution and clear errors."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.cli import CONFIG_DIRS, load_config, main
from minigpt.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A tiny model trained through the CLI on a small text file."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question\n" * 200, encoding="utf-8")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"dataset": str(text), "n_layer": 1, "n_head": 2, "n_embd": 16,
                               "block_size": 16, "batch_size": 4, "max_iters": 6,
                               "eval_interval": 3, "eval_iters": 2, "warmup_iters": 1,
                               "num_threads": 1}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--set", f"out_dir={out}",
                 "--set", "progress=false", "--set", "model.norm=\"rmsnorm\""]) == 0
    return out


def test_train_eval_sample(run_dir, capsys):
    capsys.readouterr()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["norm"] == "rmsnorm" and config["train"]["config"]["max_iters"] == 6
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_loss"] == round(config["train"]["val_loss"], 4)
    assert main(["eval", "--checkpoint", str(run_dir / "ckpt.pt")]) == 0
    assert json.loads(capsys.readouterr().out) == result  # same weights, same data
    args = ["sample", "--checkpoint", str(run_dir), "--prompt", "to be", "--max-new-tokens", "20",
            "--seed", "3", "--top-k", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("to be") and len(first) == len("to be") + 20 + 1
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded: repeatable


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "no_such_config"], "no config named 'no_such_config'"),
        (["train", "--config", "missing.json"], "does not exist"),
        (["train", "--config", "nanogpt_cpu", "--set", "n_layers=3"],
         "unknown config key 'n_layers'"),
        (["train", "--config", "nanogpt_cpu", "--set", "lr"], "--set takes key=value"),
        (["train", "--config", "nanogpt_cpu", "--set", "dtype=float16"], "dtype"),
        (["eval", "--checkpoint", "no/such/dir"], "config.json is missing"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("error:")


def test_corrupt_checkpoint_exit_2(tmp_path, capsys):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"garbage" * 10)
    assert main(["sample", "--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.json"))
    assert {"nanogpt_cpu", "shakespeare_char", "shakespeare_char_long"} <= set(names)
    for name in names:
        cfg = load_config(name, [])
        assert isinstance(cfg, TrainConfig)
    assert ROOT / "configs" in CONFIG_DIRS  # found from the package in an editable install


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "minigpt", "train", "--help"], cwd="/",
                         capture_output=True, text=True, check=True).stdout
    for f in dataclasses.fields(TrainConfig):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{f.name} ="))
        assert len(line.split("   ", 1)) == 2, f"no explanation for {f.name}"
    with pytest.raises(SystemExit) as exc:  # argparse's own errors: status 2 as well
        main(["sample"])
    assert exc.value.code == 2
