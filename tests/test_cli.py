"""``minigpt`` / ``python -m minigpt``: train / eval / sample / finetune, config resolution,
help with defaults, and one-line errors."""

import argparse
import dataclasses
import importlib.metadata
import importlib.resources
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import minigpt
from minigpt.checkpoint import MANIFEST, export_model, file_record, read_checkpoint
from minigpt.cli import build_parser, load_config, main, resolve_config
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer
from minigpt.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = importlib.resources.files(minigpt) / "configs"


def tiny_config(tmp_path: Path, **kw) -> Path:
    """A config for a one-layer model on a small text file (both written into tmp_path)."""
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be that is the question\n" * 200, encoding="utf-8")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"dataset": str(text), "n_layer": 1, "n_head": 2, "n_embd": 16,
                               "block_size": 16, "batch_size": 4, "max_iters": 6,
                               "eval_interval": 3, "eval_iters": 2, "warmup_iters": 1,
                               "num_threads": 1, **kw}))
    return cfg


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A tiny model trained through the CLI on a small text file."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_config(tmp_path)), "--set", f"out_dir={out}",
                 "--set", "progress=false", "--set", "model.norm=\"rmsnorm\""]) == 0
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny model directory with a character tokenizer of 'to be or not'."""
    tok = CharTokenizer.from_text("to be or not")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                          n_embd=16))
    return export_model(model, tok, tmp_path_factory.mktemp("model") / "tiny")


def test_train_eval_sample(run_dir, capsys):
    capsys.readouterr()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["norm"] == "rmsnorm" and config["train"]["config"]["max_iters"] == 6
    text = config["train"]["config"]["dataset"]  # a local file: named explicitly
    assert main(["eval", "--checkpoint", str(run_dir), "--data", text]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["val_loss"] == round(config["train"]["val_loss"], 4)
    assert main(["eval", "--checkpoint", str(run_dir / "ckpt.pt"), "--data", text]) == 0
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
    names = sorted(p.name.removesuffix(".json") for p in SHIPPED.iterdir()
                   if p.name.endswith(".json"))
    assert {"nanogpt_cpu", "shakespeare_char", "shakespeare_char_long"} <= set(names)
    for name in names:
        cfg = load_config(name, [])
        assert isinstance(cfg, TrainConfig)


def test_config_names_resolve_from_the_package_then_the_working_directory(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./configs/ here: the package's own configs
    shipped = resolve_config("shakespeare_char")
    assert shipped == SHIPPED / "shakespeare_char.json"
    assert Path(str(shipped)).is_relative_to(Path(minigpt.__file__).parent)
    assert json.loads(shipped.read_text(encoding="utf-8"))["dataset"] == "tinyshakespeare"
    assert load_config("shakespeare_char", []).out_dir == "out/shakespeare_char"
    (tmp_path / "configs").mkdir()  # a project's own configs/ comes first
    (tmp_path / "configs" / "shakespeare_char.json").write_text(
        '{"max_iters": 7, "warmup_iters": 1}')
    assert resolve_config("shakespeare_char") == Path.cwd() / "configs" / "shakespeare_char.json"
    assert load_config("shakespeare_char", []).max_iters == 7


@pytest.mark.slow
def test_help_explains_every_option(capsys):
    out = subprocess.run([sys.executable, "-m", "minigpt", "train", "--help"], cwd="/",
                         capture_output=True, text=True, check=True).stdout
    for f in dataclasses.fields(TrainConfig):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{f.name} ="))
        assert len(line.split("   ", 1)) == 2, f"no explanation for {f.name}"
    assert main(["sample"]) == 2  # argparse's own errors: one line, status 2 as well
    err = capsys.readouterr().err
    assert err == "error: the following arguments are required: --checkpoint (see minigpt " \
        "sample --help)\n"


# ------------------------------------------------------------------ typed --set values (#12)
@pytest.mark.parametrize(
    "setting, message",
    [
        ("max_iters=2.5", "max_iters expects an integer, got '2.5'"),
        ("max_iters=fifty", "max_iters expects an integer, got 'fifty'"),
        ("lr=3e-3x", "lr expects a number, got '3e-3x'"),
        ("lr=nan", "lr expects a number"),
        ("resume=yes", "resume expects true or false, got 'yes'"),
        ("progress=1", "progress expects true or false, got 1"),
        ("lr_decay_iters=soon", "lr_decay_iters expects an integer or null"),
        ("model.n_kv_head=2.0", "model.n_kv_head expects an integer or null"),
        ("model.rope_theta=big", "model.rope_theta expects a number"),
        ("model.norm=batchnorm", "norm must be one of"),
        ("model.n_layer=3", "set n_layer as a top-level key"),
        ("model.nope=1", "unknown config key 'model.nope'"),
        ("model=[1]", "model expects a JSON object"),
        ("dataset=null", "dataset expects a string"),
        ("device=tpu", "device='tpu'"),
    ],
)
def test_set_rejects_a_value_of_the_wrong_type_in_one_line(setting, message, capsys):
    assert main(["train", "--config", "nanogpt_cpu", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "setting, key, value",
    [
        ("resume=False", "resume", False), ("resume=false", "resume", False),
        ("resume=True", "resume", True), ("progress=False", "progress", False),
        ("compile=true", "compile", True), ("max_iters=50", "max_iters", 50),
        ("lr=3e-3", "lr", 3e-3), ("lr=1", "lr", 1.0), ("out_dir=out/x", "out_dir", "out/x"),
        ('out_dir="out/y"', "out_dir", "out/y"), ("lr_decay_iters=null", "lr_decay_iters", None),
        ("lr_decay_iters=None", "lr_decay_iters", None),
        ("lr_decay_iters=700", "lr_decay_iters", 700),
    ],
)
def test_set_converts_to_the_field_type(setting, key, value):
    cfg = load_config("nanogpt_cpu", [setting])
    got = getattr(cfg, key)
    assert got == value and type(got) is type(value)


def test_set_model_fields_are_typed():
    cfg = load_config("nanogpt_cpu", ["model.norm=rmsnorm", "model.n_kv_head=None",
                                      "model.rope_theta=500", 'model.mlp="swiglu"'])
    assert cfg.model == {"norm": "rmsnorm", "n_kv_head": None, "rope_theta": 500.0,
                         "mlp": "swiglu"}
    assert load_config("nanogpt_cpu", ['model={"pos_emb": "rope"}']).model == {"pos_emb": "rope"}


def test_config_file_values_are_type_checked(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bias": "false"}))
    assert main(["train", "--config", str(bad)]) == 2
    assert "bias expects true or false, got 'false'" in capsys.readouterr().err


def test_resume_false_does_not_resume(run_dir, capsys):
    cfg = str(run_dir.parent / "tiny.json")
    common = ["train", "--config", cfg, "--set", f"out_dir={run_dir}", "--set", "progress=false"]
    capsys.readouterr()
    # a checkpoint is there: starting over needs --force (never a silent overwrite) ...
    assert main([*common, "--set", "resume=False", "--set", "max_iters=3"]) == 2
    assert "--force" in capsys.readouterr().err
    assert read_checkpoint(run_dir / "ckpt.pt")["iteration"] == 6
    # ... and with it, resume=False starts from step 0 (a resume would do nothing: 6 > 3)
    assert main([*common, "--set", "resume=False", "--set", "max_iters=3", "--force"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    assert read_checkpoint(run_dir / "ckpt.pt")["iteration"] == 3


def test_device_and_model_keys_are_checked_before_data_preparation(tmp_path, monkeypatch,
                                                                   capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(cache))
    base = ["train", "--config", "nanogpt_cpu", "--set", f"out_dir={tmp_path / 'o'}"]
    if not torch.cuda.is_available():
        assert main([*base, "--set", "device=cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main([*base, "--set", "model.n_kv_head=3"]) == 2  # must divide n_head
    assert "n_kv_head=3 must divide" in capsys.readouterr().err
    assert not cache.exists()  # no data was read or tokenised


@pytest.mark.slow
def test_help_shows_defaults_and_types():
    out = subprocess.run([sys.executable, "-m", "minigpt", "train", "--help"], cwd="/",
                         capture_output=True, text=True, check=True).stdout
    assert "max_iters = 2000   (an integer)" in out
    assert "resume = false   (true or false)" in out
    assert "lr_decay_iters = null   (an integer or null)" in out


def test_training_prints_the_validation_loss_at_each_evaluation(run_dir, capsys):
    cfg = str(run_dir.parent / "tiny.json")
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--set", f"out_dir={run_dir.parent / 'p'}"]) == 0
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "val loss" in ln]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("step")] == [
        "step 0", "step 3", "step 6"]


# ------------------------------------------------------------------ untrusted model folders
def test_eval_never_reads_a_local_file_named_by_a_model_config(run_dir, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n" * 100)
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["config"]["dataset"] = str(secret)
    (run_dir / "config.json").write_text(json.dumps(config))
    # a crafted folder comes with a manifest that matches its crafted config
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["files"]["config.json"] = file_record(run_dir / "config.json")
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    cache = tmp_path / "cache"
    before = sorted(p for p in cache.rglob("*"))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "not a registered dataset" in err and "--data PATH" in err
    assert err.count("\n") == 1
    assert sorted(p for p in cache.rglob("*")) == before  # nothing written to the cache
    assert not any("secret" in p.name for p in cache.rglob("*"))
    # sample never reads the dataset at all
    assert main(["sample", "--checkpoint", str(run_dir), "--max-new-tokens", "3"]) == 0
    assert sorted(p for p in cache.rglob("*")) == before


# ------------------------------------------------------------------ signals and faults
@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                       (signal.SIGHUP, 129)])
def test_signal_during_train_saves_a_checkpoint_and_exits_in_one_line(tmp_path, sig, code):
    cfg = tiny_config(tmp_path, max_iters=10**6, eval_interval=5, eval_iters=1,
                      progress=False)
    out = tmp_path / "run"
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "minigpt", "train", "--config", str(cfg),
                             "--set", f"out_dir={out}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # SIGHUP not ignored (nohup)
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)  # two evaluations logged: training is under way
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"stopped: interrupted by {sig.name} after step ")
    step = int(stderr.split("after step ")[1].split(":")[0])
    assert read_checkpoint(out / "ckpt.pt")["iteration"] == step >= 5
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_during_a_checkpoint_names_the_file_and_keeps_the_old_one(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny_config(tmp_path, max_iters=12, eval_interval=5, eval_iters=1, progress=False)
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_disk_full(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 1:
            return real_save(obj, f, *a, **kw)
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    assert main(["train", "--config", str(cfg), "--set", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"could not write the checkpoint {out / 'ckpt.pt'}" in err
    assert "No space left on device" in err and "previous checkpoint is intact" in err
    assert read_checkpoint(out / "ckpt.pt")["iteration"] == 5  # the old one, whole
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"]


# ------------------------------------------------------------------ help, version, bad options
def subcommands(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def option_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help text as ``--help`` prints it, by its first option string."""
    blocks: dict[str, str] = {}
    name = None
    for line in parser.format_help().splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            blocks[name] = line
        elif name and line.startswith("      "):
            blocks[name] += line
        else:
            name = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_help_shows_the_default_of_every_option_of_every_command():
    commands = subcommands(build_parser())
    assert set(commands) == {"train", "sample", "eval", "finetune"}
    for name, parser in commands.items():
        shown, checked = option_help(parser), 0
        for action in parser._actions:
            if not action.option_strings or action.default is argparse.SUPPRESS:
                continue  # positionals, --help and required options have no default
            text = shown[action.option_strings[0]]
            assert f"(default: {action.default!r}" in text or (
                f"(default: {action.default}" in text), f"{name}: {text}"
            checked += 1
        assert checked >= 2, name


def test_help_of_finetune_is_a_regular_command(capsys):
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minigpt finetune") and "--base BASE" in out
    assert "(default: 2)" in out and "(default: alpaca)" in out


def test_version_comes_from_the_package_metadata(capsys, monkeypatch):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"minigpt {minigpt.__version__}"
    installed = importlib.metadata.version("minigpt")
    assert minigpt.__version__ == installed
    # a source checkout that is not installed: the version in its pyproject.toml
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    try:
        importlib.reload(minigpt)
        assert minigpt.__version__ == f"{installed}+source"
    finally:
        monkeypatch.undo()
        importlib.reload(minigpt)
    assert minigpt.__version__ == installed


BAD_SAMPLE = [
    (["--device", "tpu"], "'tpu' is not a device"),
    (["--threads", "-1"], "--threads: must be >= 0, got -1"),
    (["--num-samples", "0"], "--num-samples: must be >= 1, got 0"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 0"),
    (["--top-k", "0"], "top_k must be an integer >= 1"),
    (["--top-k", "five"], "invalid int value: 'five'"),
    (["--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--repetition-penalty", "0"], "repetition_penalty must be"),
    (["--prompt", "XYZ"], "not in this tokenizer's vocabulary"),
    (["--prompt", ""], "the prompt is empty"),
    (["--seed", "x"], "invalid int value: 'x'"),
    (["--checkpoint", "no/such/dir"], "config.json is missing"),
]
BAD_EVAL = [
    (["--device", "cuda:x"], "'cuda:x' is not a device"),
    (["--threads", "-2"], "--threads: must be >= 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--data", "no_such_dataset"], "unknown data file 'no_such_dataset'"),
    (["--checkpoint", "no/such/dir"], "config.json is missing"),
]


@pytest.mark.parametrize("command, extra, message",
                         [("sample", *case) for case in BAD_SAMPLE]
                         + [("eval", *case) for case in BAD_EVAL])
def test_sample_and_eval_reject_bad_input_in_one_line(model_dir, command, extra, message,
                                                      capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert main([command, "--checkpoint", str(model_dir), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed before the check: not even the prompt
    assert err.startswith("error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_an_absent_device_is_one_line(model_dir, command, capsys):
    assert main([command, "--checkpoint", str(model_dir), "--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "CUDA is not available" in err


def test_sample_is_seeded_by_default_and_draws_several(model_dir, capsys):
    args = ["sample", "--checkpoint", str(model_dir), "--prompt", "to", "--max-new-tokens", "12",
            "--device", "cpu", "--threads", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # the default seed: repeatable
    assert main([*args, "--num-samples", "3"]) == 0
    samples = capsys.readouterr().out.split("---\n")
    assert len(samples) == 3 and samples[0] == first  # sample i uses seed + i
    assert all(s.startswith("to") and len(s) == len("to") + 12 + 1 for s in samples)
    assert main([*args, "--seed", "1"]) == 0
    assert capsys.readouterr().out == samples[1]
    assert torch.get_num_threads() == 1


def test_eval_takes_device_and_threads(run_dir, capsys):
    text = json.loads((run_dir / "config.json").read_text())["train"]["config"]["dataset"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--data", text, "--device", "cpu",
                 "--threads", "1", "--batch-size", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0


# ------------------------------------------------------------------ finetune errors
@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache, without touching the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))


def _bad_config_dir(tmp_path: Path) -> Path:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    return tmp_path / "bad"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "classify"], "the following arguments are required: --base"),
        (["finetune", "summarise", "--base", "gpt2"], "invalid choice: 'summarise'"),
        (["finetune", "classify", "--base", "{missing}"], "is not a directory"),
        (["finetune", "classify", "--base", "{empty}"], "config.json is missing"),
        (["finetune", "classify", "--base", "{bad}"], "is not a JSON model config"),
        (["finetune", "classify", "--base", "gpt2"], "cannot load 'gpt2': no network"),
        (["finetune", "instruct", "--base", "no-such/model"], "cannot load 'no-such/model'"),
        (["finetune", "classify", "--base", "{model}", "--save", "x"], "--save is for instruct"),
        (["finetune", "instruct", "--base", "{model}", "--lora-rank", "-1"],
         "--lora-rank must be >= 0"),
        (["finetune", "classify", "--base", "{model}", "--epochs", "0"],
         "epochs, batch_size and max_len must be >= 1, got 0"),
        (["finetune", "classify", "--base", "{model}", "--methods", "magic"],
         "invalid choice: 'magic'"),
    ],
)
def test_finetune_errors_are_one_line(argv, message, offline, model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty",
             "bad": _bad_config_dir(tmp_path), "model": model_dir}
    argv = [a.format(**paths) for a in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # failed before reading any data
