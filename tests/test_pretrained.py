"""GPT-2 weights to and from the Hugging Face layout, checked against ``transformers`` itself."""

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from minigpt.bpe import train_bpe_from_text
from minigpt.checkpoint import CheckpointError, load_model
from minigpt.model import GPT, gpt2_config, param_count
from minigpt.pretrained import (
    PretrainedError,
    from_pretrained,
    hf_config,
    load_hf,
    load_tokenizer,
    save_hf,
    to_hf_state_dict,
)
from minigpt.pretrained import download as pretrained_download
from minigpt.registry import gpt2_tokenizer
from minigpt.registry import path as data_path
from minigpt.tokenizer import Tokenizer

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64,
            bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 saved by transformers (model.safetensors + config.json)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY))
    directory = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(directory)
    return directory


def _hf(directory):
    return GPT2LMHeadModel.from_pretrained(directory).eval()


def _greedy(step, idx, n):
    for _ in range(n):
        nxt = step(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def test_load_matches_transformers(hf_dir):
    hf, ours = _hf(hf_dir), from_pretrained(hf_dir)
    idx = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx)[0]
        assert (expected - got).abs().max() <= 1e-5
        prompt = idx[:, :5]
        ours_gen = _greedy(lambda x: ours(x)[0], prompt, 20)
        hf_gen = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_gen, hf_gen)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert not ours.training


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"


def test_from_pretrained_loads_minigpt_directories():
    """One entry point for every directory: minigpt's own export as well as GPT-2's layout."""
    model = from_pretrained(SHIPPED / "shakespeare-char")
    same, _ = load_model(SHIPPED / "shakespeare-char")
    idx = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], same(idx)[0])
    assert not model.training


def test_gpt2_config_claiming_huge_sizes_is_refused_before_allocating(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    for key, value, message in [("n_layer", 10**9, "n_layer=1000000000 but the weights hold 2"),
                                ("n_embd", "32", "n_embd must be a positive integer"),
                                ("n_head", -2, "n_head must be a positive integer")]:
        bad = tmp_path / key
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
        (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
        with pytest.raises(CheckpointError, match=message):
            load_hf(bad)


def test_save_hf_writes_special_ids_inside_the_vocabulary(tmp_path):
    """transformers warns about a bos/eos id outside the vocabulary (GPT-2's 50256 of 300)."""
    torch.manual_seed(0)
    small = GPT(gpt2_config("gpt2", vocab_size=300, block_size=32, n_layer=1, n_head=2,
                            n_embd=16))
    save_hf(small, tmp_path)
    loaded = GPT2Config.from_pretrained(tmp_path).to_dict()
    ids = {k: v for k, v in loaded.items() if k.endswith("_token_id")}
    assert {"bos_token_id", "eos_token_id"} <= ids.keys()
    assert all(v is None or 0 <= v < 300 for v in ids.values()), ids
    assert hf_config(gpt2_config("gpt2"))["eos_token_id"] == 50256


@pytest.mark.parametrize("kind", ["own-bpe", "gpt2"])
@pytest.mark.slow
def test_save_hf_writes_tokenizer_files_transformers_reads(kind, tmp_path):
    text = "the king is dead, long live the queen! " * 40
    if kind == "gpt2":
        tok = gpt2_tokenizer()
    else:
        specials = ["<|endoftext|>"]
        tok = Tokenizer(*train_bpe_from_text(text, 300, specials), specials)
    torch.manual_seed(0)
    model = GPT(gpt2_config("gpt2", vocab_size=tok.vocab_size, block_size=32, n_layer=1,
                            n_head=2, n_embd=16))
    save_hf(model, tmp_path, tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    sample = "The queen is dead; long live the king?  Yes.\n"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)
    eot = tok.special_tokens["<|endoftext|>"]
    assert hf_tok.eos_token_id == eot
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == eot


def test_export_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    ours = GPT(gpt2_config("gpt2", vocab_size=90, block_size=48, n_layer=2, n_head=4, n_embd=64))
    ours.eval()
    save_hf(ours, tmp_path)
    hf = _hf(tmp_path)
    idx = torch.randint(0, 90, (2, 48))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() <= 1e-5
    # round trip through our own loader is exact
    again = load_hf(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_conv1d_weights_are_transposed(hf_dir):
    raw = load_file(hf_dir / "model.safetensors")
    ours = load_hf(hf_dir)
    block = ours.transformer.h[1]
    assert torch.equal(block.attn.c_attn.weight, raw["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(block.mlp.c_proj.weight, raw["transformer.h.1.mlp.c_proj.weight"].t())
    assert torch.equal(block.ln_2.weight, raw["transformer.h.1.ln_2.weight"])
    exported = to_hf_state_dict(ours)
    assert "lm_head.weight" not in exported
    assert exported.keys() == raw.keys()


def test_released_file_layout(hf_dir, tmp_path):
    """OpenAI's files on the hub: no 'transformer.' prefix, mask buffers, and a tied lm_head."""
    raw = load_file(hf_dir / "model.safetensors")
    released = {k.removeprefix("transformer."): v for k, v in raw.items()}
    for i in range(2):
        released[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        released[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    released["lm_head.weight"] = raw["transformer.wte.weight"].clone()
    save_file(released, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    a, b = load_hf(hf_dir), load_hf(tmp_path)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def _edited_copy(hf_dir, tmp_path, edit):
    state = load_file(hf_dir / "model.safetensors")
    edit(state)
    tmp_path.mkdir()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    return tmp_path


def test_bad_weights_name_the_key(hf_dir, tmp_path):
    def drop(s):
        del s["transformer.h.1.mlp.c_fc.bias"]

    with pytest.raises(PretrainedError, match=r"missing key 'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        load_hf(_edited_copy(hf_dir, tmp_path / "a", drop))

    def reshape(s):
        s["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 31)

    with pytest.raises(PretrainedError, match=r"shape mismatch for 'transformer\.h\.0\.attn"):
        load_hf(_edited_copy(hf_dir, tmp_path / "b", reshape))

    def extra(s):
        s["transformer.h.2.ln_1.weight"] = torch.ones(32)

    with pytest.raises(PretrainedError, match=r"unexpected key 'transformer\.h\.2\.ln_1\.weight'"):
        load_hf(_edited_copy(hf_dir, tmp_path / "c", extra))

    def untied(s):
        s["lm_head.weight"] = torch.zeros(100, 32)

    with pytest.raises(PretrainedError, match="lm_head.weight differs"):
        load_hf(_edited_copy(hf_dir, tmp_path / "d", untied))


def test_bad_config_and_directory(hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing; model.safetensors is"):
        from_pretrained(tmp_path)
    with pytest.raises(PretrainedError, match="is not a directory"):
        from_pretrained(tmp_path / "nope")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["activation_function"] = "relu"
    bad = tmp_path / "relu"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    with pytest.raises(PretrainedError, match="activation_function='relu'"):
        load_hf(bad)
    with pytest.raises(PretrainedError, match="norm='layernorm'"):
        hf_config(gpt2_config("gpt2", norm="rmsnorm"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "HF_ENDPOINT"])
def test_offline_gives_one_clear_error(how, tmp_path, monkeypatch):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(PretrainedError, match="set HF_ENDPOINT to a reachable mirror") as info:
        from_pretrained("gpt2", cache_dir=tmp_path)
    assert "not in the Hugging Face cache" in str(info.value)


@pytest.fixture
def cached_gpt2(hf_dir, tmp_path, monkeypatch):
    """No network, and a Hugging Face cache (``tmp_path``, the hub's layout) whose "gpt2"
    snapshot holds ``hf_dir``'s weights and config; returns the snapshot folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--openai-community--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((hf_dir / name).read_bytes())
    return snapshot


def test_offline_loads_from_the_hub_cache(cached_gpt2, tmp_path):
    """A model in the Hugging Face cache loads without a network (cache layout of the hub)."""
    model = from_pretrained("gpt2", cache_dir=tmp_path)
    assert model.config.n_layer == 2 and model.config.block_size == 64


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_gpt2_sizes_match_transformers(name):
    cfg = gpt2_config(name)
    hf = hf_config(cfg)
    with torch.device("meta"):
        n_hf = GPT2LMHeadModel(GPT2Config(**hf)).num_parameters()
    assert param_count(cfg, non_embedding=False) == n_hf
    assert n_hf == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168,
                    "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}[name]


def test_shipped_model_exported_to_hf_loads_back_with_identical_logits(tmp_path):
    """Chapter 8's offline path: shakespeare-bpe -> save_hf -> from_pretrained/load_tokenizer."""
    ours, tok = load_model(SHIPPED / "shakespeare-bpe")
    save_hf(ours, tmp_path, tok)
    back, back_tok = from_pretrained(tmp_path), load_tokenizer(tmp_path)
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n<|endoftext|>"
    assert back_tok.encode(text) == tok.encode(text)
    assert back_tok.special_tokens == tok.special_tokens
    idx = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours.eval()(idx)[0])
        assert (_hf(tmp_path)(idx).logits - ours(idx)[0]).abs().max() <= 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == tok.special_tokens["<|endoftext|>"]


def test_load_tokenizer_needs_the_tokenizer_files(hf_dir, tmp_path):
    with pytest.raises(PretrainedError, match="has no vocab.json or merges.txt"):
        load_tokenizer(hf_dir)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(PretrainedError, match="not a GPT-2-style tokenizer"):
        load_tokenizer(tmp_path)


def test_offline_download_brings_cached_tokenizer_files(cached_gpt2, tmp_path):
    """GPT-2 from the hub cache: weights and tokenizer through the same two calls."""
    directory = pretrained_download("gpt2", cache_dir=tmp_path)
    with pytest.raises(PretrainedError, match="no vocab.json"):
        load_tokenizer(directory)
    (cached_gpt2 / "vocab.json").write_bytes(data_path("gpt2-encoder").read_bytes())
    (cached_gpt2 / "merges.txt").write_bytes(data_path("gpt2-vocab").read_bytes())
    tok = load_tokenizer(pretrained_download("gpt2", cache_dir=tmp_path))
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]


def test_exact_gelu_round_trips_through_the_hf_layout(tmp_path):
    """gelu_approx="none" is transformers' "gelu"; GPT-2's tanh form is "gelu_new"."""
    torch.manual_seed(0)
    ours = GPT(gpt2_config("gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                           block_size=64, gelu_approx="none")).eval()
    with torch.no_grad():  # pre-activations of order 1, where the two GELUs differ most
        ours.lm_head.weight.mul_(10)
        for block in ours.transformer.h:
            block.mlp.c_fc.weight.mul_(5)
            block.mlp.c_proj.weight.mul_(1000)
    save_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu"
    back = from_pretrained(tmp_path)
    assert back.config.gelu_approx == "none"
    idx = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])
        assert (_hf(tmp_path)(idx).logits - ours(idx)[0]).abs().max() <= 1e-5
        tanh = GPT(gpt2_config("gpt2", n_layer=2, n_head=2, n_embd=32, vocab_size=100,
                               block_size=64)).eval()
        tanh.load_state_dict(ours.state_dict())
        assert (tanh(idx)[0] - ours(idx)[0]).abs().max() > 1e-4  # the two GELUs differ
