"""The model directory (export_model / load_model) and GPTConfig's strict reading of it.

Every way a directory can be wrong ends in one ``CheckpointError`` (a ``ValueError``: the CLI
prints one line and exits 2) that names the file and what is wrong, never a silently wrong
model; and every tokenizer kind the package has survives an export and a reload.
"""

import json
import math
import shutil
import stat
from pathlib import Path

import pytest
import torch

from minigpt.bpe import train_bpe_from_text
from minigpt.checkpoint import (
    CheckpointError,
    export_model,
    file_record,
    load_model,
    save_checkpoint,
)
from minigpt.cli import main as cli_main
from minigpt.model import GPT, ConfigError, GPTConfig
from minigpt.registry import gpt2_tokenizer
from minigpt.tokenizer import CharTokenizer, Tokenizer

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
TEXT = "the king is dead, long live the queen! what light through yonder window breaks? " * 20


def tokenizer_of(kind: str):
    if kind == "char":
        return CharTokenizer.from_text(TEXT)
    if kind == "bpe":
        specials = ["<|endoftext|>"]
        return Tokenizer(*train_bpe_from_text(TEXT, 300, specials), specials)
    return gpt2_tokenizer()


def tiny(vocab_size: int, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=16,
                         **kw)).eval()


@pytest.fixture
def exported(tmp_path) -> Path:
    tok = tokenizer_of("char")
    return export_model(tiny(tok.vocab_size), tok, tmp_path / "model")


def edit_config(directory: Path, edit) -> Path:
    """Apply ``edit`` to config.json; drop the manifest, whose hash the edit invalidates."""
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "manifest.json").unlink()
    return directory


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
@pytest.mark.slow
def test_export_and_reload_every_tokenizer_kind(kind, tmp_path):
    tok = tokenizer_of(kind)
    model = tiny(tok.vocab_size)
    out = export_model(model, tok, tmp_path / kind)
    again, tok2 = load_model(out)
    assert type(tok2) is type(tok) and tok2.to_dict() == tok.to_dict()
    ids = tok.encode("long live the king")
    assert tok2.encode("long live the king") == ids
    idx = torch.tensor([ids[:16]])
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    assert not again.training


def test_exported_files_are_world_readable_and_recorded(exported, tmp_path):
    for name in ("model.safetensors", "config.json", "manifest.json"):
        assert stat.S_IMODE((exported / name).stat().st_mode) == 0o644, name
    files = json.loads((exported / "manifest.json").read_text())["files"]
    assert files == {name: file_record(exported / name)
                     for name in ("config.json", "model.safetensors")}
    save_checkpoint(tiny(11), None, 3, tmp_path / "ckpt.pt")
    assert stat.S_IMODE((tmp_path / "ckpt.pt").stat().st_mode) == 0o644


def flip_bit(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))


def test_bit_flip_in_a_shipped_model_is_refused(tmp_path):
    """data/checkpoints/manifest.json lists the shipped directories: their hashes are checked."""
    shutil.copy(SHIPPED / "manifest.json", tmp_path / "manifest.json")
    copy = tmp_path / "shakespeare-char"
    shutil.copytree(SHIPPED / "shakespeare-char", copy)
    load_model(copy)  # intact: loads
    flip_bit(copy / "model.safetensors", (copy / "model.safetensors").stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match .*manifest"):
        load_model(copy)


def test_bit_flip_in_an_exported_model_is_refused(exported):
    flip_bit(exported / "model.safetensors", (exported / "model.safetensors").stat().st_size - 7)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(exported)


def test_tokenizer_with_one_extra_character_is_refused(exported):
    n = tokenizer_of("char").vocab_size
    edit_config(exported, lambda c: c["tokenizer"].update(chars=c["tokenizer"]["chars"] + "~"))
    with pytest.raises(CheckpointError,
                       match=f"tokenizer has {n + 1} ids but the model's vocabulary has {n}"):
        load_model(exported)


def test_export_refuses_a_tokenizer_that_does_not_fit(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer has"):
        export_model(tiny(30), tokenizer_of("char"), tmp_path / "m")


def test_huge_sizes_in_config_are_refused_before_allocating(exported):
    edit_config(exported, lambda c: c["model"].update(n_layer=10**9))
    with pytest.raises(CheckpointError, match="n_layer=1000000000 but the weights hold 2"):
        load_model(exported)
    config = json.loads((exported / "config.json").read_text())
    config["model"].update(n_layer=2, mlp_hidden=10**12)  # would allocate terabytes
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="parameters but the weights hold"):
        load_model(exported)


def test_huge_sizes_in_a_training_checkpoint_are_refused(tmp_path):
    tok = tokenizer_of("char")
    model = tiny(tok.vocab_size)
    save_checkpoint(model, None, 1, tmp_path / "ckpt.pt",
                    extra={"tokenizer": json.dumps(tok.to_dict())})
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    config = json.loads(state["model_config"])
    state["model_config"] = json.dumps({**config, "n_layer": 10**9})
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="n_layer=1000000000 but the weights hold 2"):
        load_model(tmp_path / "ckpt.pt")


BAD_VALUES = [
    ("bias", "false", "bias must be true or false"),
    ("rope_theta", math.nan, "rope_theta must be finite"),
    ("rope_theta", "1e4", "rope_theta must be a number"),
    ("dropout", math.inf, "dropout must be finite"),
    ("n_layer", 0, "n_layer must be a positive integer"),
    ("n_embd", -16, "n_embd must be a positive integer"),
    ("vocab_size", 25.0, "vocab_size must be a positive integer"),
    ("n_head", True, "n_head must be a positive integer"),
    ("n_kv_head", 0, "n_kv_head must be a positive integer or None"),
    ("norm", ["layernorm"], "norm must be one of"),
    ("n_layers", 2, r"unknown GPTConfig keys \['n_layers'\]"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES)
def test_config_from_dict_is_strict(key, value, message):
    good = GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16).to_dict()
    with pytest.raises(ConfigError, match=message):
        GPTConfig.from_dict({**good, key: value})


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES[:3] + BAD_VALUES[-1:])
def test_bad_config_json_is_one_line_and_exit_2(key, value, message, exported, capsys):
    edit_config(exported, lambda c: c["model"].update({key: value}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(exported)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)
    assert cli_main(["sample", "--checkpoint", str(exported), "--prompt", "the"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.split(" ")[0] in err


def test_config_json_that_is_not_json(exported):
    (exported / "manifest.json").unlink()
    (exported / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        load_model(exported)


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing; model.safetensors is"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="nope is not a model directory: config.json is"):
        load_model(tmp_path / "nope")
