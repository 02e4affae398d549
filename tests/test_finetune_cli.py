"""``minigpt finetune``: classify and instruct runs end to end on a tiny shipped model.

The one-line errors of bad requests are in ``tests/test_cli.py``
(``test_finetune_errors_are_one_line``).
"""

import json
import subprocess
import sys

import pytest
import torch

from minigpt.checkpoint import export_model, load_model
from minigpt.cli import main as cli_main
from minigpt.finetune import load_sms_spam
from minigpt.instruct import load_instructions
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.tuning import FitConfig


@pytest.fixture(scope="module")
def shipped_base(tmp_path_factory):
    """A tiny exported model whose character tokenizer covers the SMS and instruction data."""
    corpus = "\n".join(t for t, _ in load_sms_spam()) + json.dumps(load_instructions(),
                                                                  ensure_ascii=False)
    tok = CharTokenizer.from_text(corpus)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                          n_embd=16))
    return export_model(model, tok, tmp_path_factory.mktemp("base") / "base"), tok


def test_classify_runs_and_records_its_command(shipped_base, tmp_path):
    base_dir, _ = shipped_base
    out = tmp_path / "spam.json"
    argv = ["finetune", "classify", "--base", str(base_dir), "--methods", "head", "lora",
            "--epochs", "1", "--train-limit", "32", "--test-limit", "64", "--max-len", "16",
            "--out", str(out)]
    assert cli_main(argv) == 0
    record = json.loads(out.read_text())
    assert record["command"] == "minigpt " + " ".join(argv)
    assert [r["method"] for r in record["results"]] == ["head", "lora"]
    assert record["results"][0]["trainable_params"] == 16 * 2 + 2
    assert record["results"][1]["test"]["n"] == record["results"][1]["val"]["n"] == 64
    assert record["results"][1]["fit"] == {**vars(FitConfig(lr=3e-3)), "betas": [0.9, 0.999]}


def test_instruct_clamps_max_len_and_saves_a_loadable_model(shipped_base, tmp_path, capsys):
    base_dir, tok = shipped_base
    saved, out = tmp_path / "sft", tmp_path / "sft.json"
    # no --max-len: the default (256) is longer than this model's context (64)
    assert cli_main(["finetune", "instruct", "--base", str(base_dir), "--train-limit", "16",
                     "--template", "chat", "--epochs", "1", "--lr", "1e-2",
                     "--test-limit", "8", "--lora-rank", "2", "--save", str(saved),
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["config"]["max_len"] == 64 and result["lora_rank"] == 2
    assert result["train_examples"] == 16 and result["after"]["loss"] < result["before"]["loss"]
    model, tokenizer = load_model(saved)  # a plain GPT: LoRA merged into the weights
    base, _ = load_model(base_dir)
    assert model.state_dict().keys() == base.state_dict().keys()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
                           for k in changed)
    assert tokenizer.encode("hi") == tok.encode("hi")
    assert json.loads((saved / "finetune.json").read_text())["results"][0]["lora_rank"] == 2
    capsys.readouterr()
    assert cli_main(["sample", "--checkpoint", str(saved), "--prompt", "User: hi",
                     "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("User: hi")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(t for t, _ in load_sms_spam()[:300]), encoding="utf-8")
    assert cli_main(["eval", "--checkpoint", str(saved), "--dataset", str(text)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["val_loss"] > 0


def test_running_the_finetune_module_points_to_the_command():
    """``python -m minigpt.finetune`` (the old entry point) says which command to run."""
    done = subprocess.run([sys.executable, "-m", "minigpt.finetune", "classify", "--base", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "python -m minigpt finetune" in done.stderr

