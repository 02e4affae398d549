"""Trainer, checkpoints (atomic, safe, exactly resumable) and the shipped-model format."""

import errno
import io
import json
import os
import random
import signal
import warnings
from pathlib import Path

import pytest
import torch

from minigpt import checkpoint as ckpt_mod
from minigpt import data, ddp
from minigpt import train as train_module
from minigpt.bpe import train_bpe_from_text
from minigpt.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import CharTokenizer, Tokenizer
from minigpt.tracking import plot_losses
from minigpt.tracking import read_metrics as read_log
from minigpt.train import (
    CheckpointWriteError,
    ConfigError,
    StopOnSignal,
    TrainConfig,
    TrainingInterrupted,
    accumulate_gradients,
    concurrent_gradients,
    estimate_loss,
    make_optimizer,
    nats_per_char,
    train,
)


def tiny_config(corpus: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(corpus), n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                max_iters=12, eval_interval=4, eval_iters=2, warmup_iters=2, lr=3e-3,
                dropout=0.1, out_dir=str(out), progress=False, num_threads=1)
    return TrainConfig(**{**base, **kw})


def tiny_model(n_embd=16) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=n_embd))


def test_train_learns_logs_and_exports(corpus, tmp_path):
    out = tmp_path / "run"
    res = train(tiny_config(corpus, out, max_iters=40, eval_interval=20, dropout=0.0, lr=1e-2))
    assert res.iterations == 40 and len(res.losses) == 40
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"] - 0.4
    records = read_log(out / "log.jsonl")
    assert [r["iter"] for r in records] == [0, 20, 40]
    assert {"model.safetensors", "config.json", "log.jsonl", "ckpt.pt"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["config"]["max_iters"] == 40
    model, tok = load_model(out)
    assert not model.training and tok.vocab_size == model.config.vocab_size
    # the exported model reproduces the logged whole-split val loss exactly
    _, _, val = data.prepare_data(TrainConfig(dataset=str(corpus)).data_spec)
    assert estimate_loss(model, val, 16) == pytest.approx(res.val_loss, abs=1e-6)
    assert config["train"]["val_loss"] == res.val_loss
    ax = plot_losses(out / "log.jsonl")
    assert ax.get_xlabel() == "optimiser step"


def test_resume_after_crash_reproduces_losses_exactly(corpus, tmp_path):
    full = train(tiny_config(corpus, tmp_path / "full", grad_accum_steps=2))

    class Crash(Exception):
        pass

    def crash_at_8(record):
        if record["iter"] == 8:  # dies after step 8 ran, before its checkpoint: resume from 4
            raise Crash

    cfg = tiny_config(corpus, tmp_path / "crash", grad_accum_steps=2)
    with pytest.raises(Crash):
        train(cfg, callback=crash_at_8)
    assert read_checkpoint(tmp_path / "crash" / "ckpt.pt")["iteration"] == 4
    torch.manual_seed(123)  # disturb every global RNG: the checkpoint must restore them
    random.random()
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.iterations == 12
    assert resumed.losses == full.losses[4:]
    assert resumed.val_loss == full.val_loss
    assert [r["iter"] for r in read_log(tmp_path / "crash" / "log.jsonl")] == [0, 4, 8, 12]
    again = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))  # a finished run: no-op
    assert again.losses == [] and again.val_loss == full.val_loss
    assert [r["iter"] for r in read_log(tmp_path / "crash" / "log.jsonl")] == [0, 4, 8, 12]


def test_resume_refuses_a_different_model(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "r", max_iters=4))
    with pytest.raises(CheckpointError, match="n_embd=16 in the checkpoint but 32 now"):
        train(tiny_config(corpus, tmp_path / "r", max_iters=8, n_embd=32, resume=True))


def test_checkpoint_roundtrip_file_object_and_weights_only():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, 11, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    buf = io.BytesIO()
    save_checkpoint(model, opt, 7, buf, extra={"note": "hi"})
    buf.seek(0)
    raw = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)  # no code, plain data
    assert raw["extra"] == {"note": "hi"}
    other = tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    opt2 = make_optimizer(other, TrainConfig())
    assert load_checkpoint(buf, other, opt2) == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_checkpoint_restores_rng_states():
    model = tiny_model()
    buf = io.BytesIO()
    save_checkpoint(model, None, 0, buf)
    expected = (torch.rand(3), random.random(), __import__("numpy").random.rand())
    buf.seek(0)
    load_checkpoint(buf, tiny_model())
    got = (torch.rand(3), random.random(), __import__("numpy").random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_corrupt_and_foreign_checkpoints_give_clear_errors(tmp_path):
    model = tiny_model()
    good = tmp_path / "good.pt"
    save_checkpoint(model, None, 3, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(truncated, model)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(garbage, model)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a minigpt checkpoint"):
        load_checkpoint(foreign, model)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", model)


def test_mismatched_checkpoint_names_what_differs(tmp_path):
    f = tmp_path / "c.pt"
    save_checkpoint(tiny_model(16), None, 1, f)
    with pytest.raises(CheckpointError, match=r"n_embd=16 in the checkpoint but 32 now"):
        load_checkpoint(f, tiny_model(32))
    state = read_checkpoint(f)
    state["model_config"] = None  # a bare state dict: shapes are still checked, by name
    with pytest.raises(CheckpointError, match=r"transformer.wte.weight has shape \(11, 16\)"):
        load_checkpoint(state, tiny_model(32))


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    f = tmp_path / "ckpt.pt"
    model = tiny_model()
    save_checkpoint(model, None, 1, f)
    before = f.read_bytes()
    real_save = torch.save

    def dying_save(obj, path):
        real_save(obj, path)
        with open(path, "r+b") as fh:
            fh.truncate(100)  # half-written file ...
        raise KeyboardInterrupt  # ... and the process is interrupted

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, None, 2, f)
    assert f.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left
    assert read_checkpoint(f)["iteration"] == 1


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path)


def test_gradient_accumulation_equals_big_batch():
    model = tiny_model()
    x = torch.randint(0, 11, (8, 8))
    y = torch.randint(0, 11, (8, 8))
    accumulate_gradients(model, [(x[:4], y[:4]), (x[4:], y[4:])], "float32")
    g_accum = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    accumulate_gradients(model, [(x, y)], "float32")
    for a, p in zip(g_accum, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("n_micro", [2, 3])
def test_concurrent_micro_batches_give_the_same_bits(n_micro):
    model = tiny_model()  # its token table is tied to the output layer: two gradient paths
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 11, (2, 4 * n_micro, 8), generator=g)
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 4 * n_micro, 4)]
    seq_loss = accumulate_gradients(model, batches, "float32")
    seq = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    par_loss = accumulate_gradients(model, batches, "float32", threads=2)
    assert torch.equal(seq_loss, par_loss)
    for a, p in zip(seq, model.parameters(), strict=True):
        assert torch.equal(a, p.grad)
    # into gradients already there, as backward() adds to them
    accumulate_gradients(model, batches, "float32")
    twice = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batches, "float32")
    concurrent_gradients(model, batches, "float32", threads=n_micro)
    for a, p in zip(twice, model.parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_training_with_micro_batch_threads_repeats_the_one_thread_run(corpus, tmp_path):
    kw = dict(dropout=0.0, batch_size=2, grad_accum_steps=2, max_iters=8)
    one = train(tiny_config(corpus, tmp_path / "one", **kw))
    two = train(tiny_config(corpus, tmp_path / "two", micro_batch_threads=2, **kw))
    assert one.losses == two.losses and one.val_loss == two.val_loss
    for a, b in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw, need", [
    (dict(grad_accum_steps=1), "grad_accum_steps >= 2"),
    (dict(grad_accum_steps=2, dropout=0.1), "dropout=0"),
    (dict(grad_accum_steps=2, dropout=0.0, compile=True), "compile=false"),
])
def test_micro_batch_threads_says_what_it_needs(corpus, tmp_path, kw, need):
    with pytest.raises(ConfigError, match=f"micro_batch_threads=2 needs {need}"):
        tiny_config(corpus, tmp_path, micro_batch_threads=2, **kw)


def test_micro_batch_threads_refuse_ddp(corpus, tmp_path, monkeypatch):
    two_ranks = ddp.Distributed(rank=0, world_size=2)
    monkeypatch.setattr(ddp, "init_distributed", lambda device: two_ranks)
    cfg = tiny_config(corpus, tmp_path, dropout=0.0, grad_accum_steps=2, micro_batch_threads=2)
    with pytest.raises(ConfigError, match="under torchrun set micro_batch_threads=1"):
        train(cfg)


def test_estimate_loss_is_deterministic_and_covers_the_split():
    model = tiny_model()
    tokens = torch.randint(0, 11, (8 * 10 + 1,)).numpy()
    whole = estimate_loss(model, tokens, 8, batch_size=3)
    assert whole == estimate_loss(model, tokens, 8, batch_size=3)
    assert whole == estimate_loss(model, tokens, 8, batch_size=3, threads=2)  # 2 at once
    x = torch.from_numpy(tokens[:-1].astype("int64")).view(10, 8)
    y = torch.from_numpy(tokens[1:].astype("int64")).view(10, 8)
    with torch.no_grad():
        assert whole == pytest.approx(model(x, y)[1].item(), rel=1e-6)
    assert model.training


def test_nats_per_char_is_the_same_total_over_characters():
    text = "to be or not to be, that is the question " * 20
    char = CharTokenizer.from_text(text)
    ids = char.encode(text)
    assert nats_per_char(1.5, ids, char) == pytest.approx(1.5)  # one character per token
    vocab, merges = train_bpe_from_text(text, 300, ["<|endoftext|>"])
    bpe = Tokenizer(vocab, merges, ["<|endoftext|>"])
    ids = bpe.encode(text)
    assert len(ids) < len(text) / 2  # merges made tokens of several characters
    # same total nats, spread over the characters instead of the tokens
    assert nats_per_char(2.0, ids, bpe) == pytest.approx(2.0 * len(ids) / len(text))


@pytest.mark.parametrize("loss, ids", [(float("nan"), [1]), (-1.0, [1]), (1.0, [])])
def test_nats_per_char_rejects_bad_input(loss, ids):
    char = CharTokenizer.from_text("ab")
    with pytest.raises(ValueError, match="nats_per_token|no characters"):
        nats_per_char(loss, ids, char)


def test_early_stopping(corpus, tmp_path):
    # lr = 0: the val loss never improves after the first evaluation
    res = train(tiny_config(corpus, tmp_path / "es", lr=0.0, min_lr=0.0, max_iters=40,
                            eval_interval=2, early_stop_patience=2))
    assert res.iterations == 4 and len(res.losses) == 4


@pytest.mark.parametrize("kw", [{"optimizer": "scratch"}, {"dtype": "bfloat16"},
                                {"tokenizer": "bpe", "bpe_vocab_size": 300}])
def test_train_options(corpus, tmp_path, kw):
    res = train(tiny_config(corpus, tmp_path / "o", max_iters=4, **kw))
    assert len(res.losses) == 4 and all(map(lambda v: v == v, res.losses))  # no NaN
    model, tok = load_model(tmp_path / "o")
    assert tok.decode(tok.encode("the king")) == "the king"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(corpus, tmp_path, monkeypatch,
                                                       has_bf16):
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: has_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(corpus, tmp_path / "o", max_iters=4, dtype="bfloat16"))
    said = [str(w.message) for w in caught if "bf16 instructions" in str(w.message)]
    if has_bf16:
        assert said == []
    else:
        assert len(said) == 1 and "set dtype=float32" in said[0]


@pytest.mark.parametrize("has_bf16, resolved", [(True, "bfloat16"), (False, "float32")])
def test_dtype_auto_trains_and_saves_the_resolved_dtype(corpus, tmp_path, monkeypatch,
                                                         has_bf16, resolved):
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: has_bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "bf16 instructions" warning either way
        auto = train(tiny_config(corpus, tmp_path / "o", max_iters=3, dtype="auto"))
    saved = json.loads((tmp_path / "o" / "config.json").read_text())["train"]["config"]
    assert saved["dtype"] == resolved
    same = train(tiny_config(corpus, tmp_path / "r", max_iters=3, dtype=resolved))
    assert auto.losses == same.losses and auto.val_loss == same.val_loss  # the same steps
    assert train_module.auto_dtype(torch.device("cpu")) == resolved


def test_cpu_has_bf16_probes_only_x86(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(train_module.platform, "machine", lambda: "x86_64")
    assert not train_module.cpu_has_bf16()
    monkeypatch.setattr(train_module.platform, "machine", lambda: "arm64")
    assert train_module.cpu_has_bf16()  # not probed: no warning


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['n_layers'\]"):
        TrainConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float16")


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shakespeare-char", "shakespeare-bpe"])
def test_shipped_model_matches_manifest_and_reproduces_val_loss(name):
    import hashlib

    entry = json.loads((SHIPPED / "manifest.json").read_text())[name]
    assert entry["command"].startswith("python ")
    for fname, info in entry["files"].items():
        blob = (SHIPPED / name / fname).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == info["sha256"], fname
        assert len(blob) == info["bytes"]
    model, tok = load_model(SHIPPED / name)
    cfg = TrainConfig.from_dict(json.loads((SHIPPED / name / "config.json").read_text())
                                ["train"]["config"])
    _, _, val = data.prepare_data(cfg.data_spec, tokenizer=tok)
    val_loss = estimate_loss(model, val, model.config.block_size)
    assert val_loss == pytest.approx(entry["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_shipped_bpe_model_beats_1_60_nats_per_char():
    # issue 15: the base model of chapters 6-9 must reach <= 1.60 nats per character
    entry = json.loads((SHIPPED / "manifest.json").read_text())["shakespeare-bpe"]
    _, tok = load_model(SHIPPED / "shakespeare-bpe")
    cfg = TrainConfig.from_dict(json.loads((SHIPPED / "shakespeare-bpe" / "config.json")
                                           .read_text())["train"]["config"])
    _, _, val = data.prepare_data(cfg.data_spec, tokenizer=tok)
    assert nats_per_char(entry["val_loss"], val, tok) <= 1.60


@pytest.fixture
def hangup_not_ignored():
    """SIGHUP at its default (a run under nohup ignores it, and the trainer respects that)."""
    old = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGHUP, old)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(
        corpus, tmp_path, sig, hangup_not_ignored):
    full = train(tiny_config(corpus, tmp_path / "full"))

    def signal_at_4(record):
        if record["iter"] == 4:
            os.kill(os.getpid(), sig)  # as if from outside, between two steps

    cfg = tiny_config(corpus, tmp_path / "sig")
    with pytest.raises(TrainingInterrupted, match=f"interrupted by {sig.name} after step 5") as e:
        train(cfg, callback=signal_at_4)
    assert e.value.signum == sig and e.value.iteration == 5
    assert read_checkpoint(tmp_path / "sig" / "ckpt.pt")["iteration"] == 5
    assert signal.getsignal(sig) is not None  # the handlers were restored ...
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # ... to the defaults
    torch.manual_seed(99)  # disturb the global RNGs: the checkpoint restores them
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.losses == full.losses[5:]
    assert resumed.val_loss == full.val_loss
    assert resumed.history == [{**r, "tokens_per_s": resumed.history[i]["tokens_per_s"]}
                               for i, r in enumerate(full.history)]


def test_disk_full_while_checkpointing_keeps_the_old_checkpoint(corpus, tmp_path, monkeypatch):
    out = tmp_path / "full"
    real_save = torch.save

    def fill_disk_at_8(record):
        if record["iter"] == 8:
            def no_space(obj, f, *a, **kw):
                Path(f).write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(torch, "save", no_space)

    with pytest.raises(CheckpointWriteError) as e:
        train(tiny_config(corpus, out), callback=fill_disk_at_8)
    monkeypatch.setattr(torch, "save", real_save)
    assert str(e.value).startswith(f"could not write the checkpoint {out / 'ckpt.pt'}: No space")
    assert read_checkpoint(out / "ckpt.pt")["iteration"] == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_no_host_sync_per_training_step(corpus, tmp_path, monkeypatch):
    """Tensors are read back (.item, .tolist, .cpu, float) per evaluation, not per step."""
    counts = {"n": 0}
    for name in ("item", "tolist", "cpu", "__float__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, **kw):
            counts["n"] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counting)

    def syncs(steps: int) -> int:
        counts["n"] = 0
        train(tiny_config(corpus, tmp_path / f"s{steps}", max_iters=steps, eval_interval=steps))
        return counts["n"]

    assert syncs(8) == syncs(24)  # two evaluations each; 16 more steps, no more syncs


def test_config_types_are_checked_when_built():
    with pytest.raises(ConfigError, match="resume expects true or false, got 'False'"):
        TrainConfig(resume="False")
    with pytest.raises(ConfigError, match="max_iters expects an integer, got 2.5"):
        TrainConfig(max_iters=2.5)
    with pytest.raises(ConfigError, match="model.rope_theta expects a number, got nan"):
        TrainConfig(model={"rope_theta": float("nan")})
    with pytest.raises(ConfigError, match="model.n_layer is not a GPTConfig field"):
        TrainConfig(model={"n_layer": 2})
    assert TrainConfig(lr=1).lr == 1.0 and type(TrainConfig(lr=1).lr) is float


def test_config_value_errors_say_the_rule():
    with pytest.raises(ConfigError, match=r"warmup_iters=100: it must be between 0 and "
                                          r"max_iters \(60\)"):
        TrainConfig(max_iters=60)
    with pytest.raises(ConfigError, match=r"between 0 and lr_decay_iters \(50\)"):
        TrainConfig(max_iters=500, lr_decay_iters=50)
    with pytest.raises(ConfigError,
                       match="dtype='fp16': it must be 'float32', 'bfloat16' or 'auto'"):
        TrainConfig(dtype="fp16")


def test_a_second_signal_interrupts_at_once_and_ignored_signals_stay_ignored(monkeypatch):
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM  # recorded, the process goes on
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGHUP, old)
