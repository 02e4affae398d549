"""Fine-tuning: PEFT wrappers, the classification pipeline and instruction tuning (tiny models)."""

import ast
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import minigpt
from minigpt import peft
from minigpt.checkpoint import load_model
from minigpt.finetune import (
    ClassificationConfig,
    GPTClassifier,
    MethodConfig,
    accuracy,
    always_ham,
    classification_batches,
    confusion_matrix,
    deduplicate,
    evaluate_classifier,
    load_base,
    load_sms_spam,
    make_classifier,
    mean_sd,
    metrics_at,
    pad_batch,
    precision_recall_f1,
    run_classification,
    spam_scores,
    stratified_split,
    summarize_runs,
    tune_threshold,
    undersample,
)
from minigpt.instruct import (
    IGNORE,
    InstructionConfig,
    collate,
    encode_entries,
    encode_example,
    evaluate_lm,
    format_alpaca,
    format_chat,
    masked_lm_loss,
    run_instruction,
)
from minigpt.model import GPT, GPTConfig
from minigpt.optim import lr_at
from minigpt.pretrained import GPT2_EOT, PretrainedError, save_hf
from minigpt.registry import gpt2_tokenizer
from minigpt.tuning import FitConfig, fit

CFG = GPTConfig(vocab_size=64, block_size=32, n_layer=3, n_head=2, n_embd=16)
C = CFG.n_embd


@pytest.fixture
def base():
    torch.manual_seed(0)
    return GPT(CFG).eval()


@pytest.fixture
def idx():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _grads_only_in(model, idx, expected_names):
    """Backprop a loss; the parameters with gradients are exactly the trainable ones."""
    model.zero_grad()
    model(idx)[0].square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(expected_names(n) for n in trainable), sorted(trainable)


# ------------------------------------------------------------------------------- PEFT
def test_count_parameters_counts_tied_weights_once(base):
    assert peft.count_parameters(base) == base.num_params(non_embedding=False)
    assert peft.count_parameters(peft.freeze(base)) == 0


def test_freeze_all_but_top(base, idx):
    peft.freeze_all_but_top(base, 1)
    _grads_only_in(base, idx, lambda n: n.startswith(("transformer.h.2.", "transformer.ln_f.")))
    block = sum(p.numel() for p in base.transformer.h[2].parameters())
    assert peft.count_parameters(base) == block + 2 * C
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        peft.freeze_all_but_top(base, 4)


def test_lora_starts_equal_trains_only_ab_and_counts(base, idx):
    ref = base(idx)[0]
    targets = ("attn.c_attn", "mlp.c_fc")
    lora = peft.add_lora(copy.deepcopy(base), rank=4, alpha=8.0, targets=targets)
    torch.testing.assert_close(lora(idx)[0], ref, rtol=0, atol=0)
    assert isinstance(lora.transformer.h[0].attn.c_attn, peft.LoRALinear)
    assert not isinstance(lora.transformer.h[0].attn.c_proj, peft.LoRALinear)
    _grads_only_in(lora, idx, lambda n: n.endswith(("lora_A", "lora_B")))
    per_block = 4 * (C + 3 * C) + 4 * (C + 4 * C)  # r (in + out) for c_attn and c_fc
    assert peft.count_parameters(lora) == CFG.n_layer * per_block
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        peft.add_lora(copy.deepcopy(base), targets=("q_proj",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        peft.LoRALinear(torch.nn.Linear(4, 4), rank=0)


def test_lora_merge_and_unmerge(base, idx):
    lora = peft.add_lora(copy.deepcopy(base), rank=2, targets=("c_attn", "c_proj"))
    weights = {n: p.detach().clone() for n, p in lora.named_parameters() if "base" in n}
    with torch.no_grad():
        for layer in lora.modules():
            if isinstance(layer, peft.LoRALinear):
                layer.lora_B.normal_()
    adapted = lora(idx)[0]
    assert (adapted - base(idx)[0]).abs().max() > 1e-3  # the update does something
    peft.merge_lora(lora)
    assert all(m.merged for m in lora.modules() if isinstance(m, peft.LoRALinear))
    torch.testing.assert_close(lora(idx)[0], adapted, rtol=1e-5, atol=1e-5)
    layer = lora.transformer.h[1].attn.c_attn
    torch.testing.assert_close(layer.weight, weights["transformer.h.1.attn.c_attn.base.weight"]
                               + layer.lora_B @ layer.lora_A * layer.scaling)
    peft.merge_lora(lora)  # merging twice is a no-op
    peft.unmerge_lora(lora)
    for n, p in lora.named_parameters():
        if "base" in n:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(idx)[0], adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        peft.merge_lora(base)


def test_adapters_start_as_identity_and_train_only_themselves(base, idx):
    ref = base(idx)[0]
    model = peft.add_adapters(copy.deepcopy(base), bottleneck=4)
    torch.testing.assert_close(model(idx)[0], ref, rtol=0, atol=0)
    _grads_only_in(model, idx, lambda n: ".adapter." in n or ".ln_" in n)
    adapter = 2 * C * 4 + 4 + C  # down (C x m + m) and up (m x C + C)
    norms = CFG.n_layer * 4 * C + 2 * C
    assert peft.count_parameters(model) == CFG.n_layer * 2 * adapter + norms
    frozen_norms = peft.add_adapters(copy.deepcopy(base), bottleneck=4, train_norms=False)
    assert peft.count_parameters(frozen_norms) == CFG.n_layer * 2 * adapter
    with torch.no_grad():
        model.transformer.h[0].mlp.adapter.up.weight.normal_()
    assert (model(idx)[0] - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="already has adapters"):
        peft.add_adapters(model)


def test_prompt_tuning_is_a_prefix_of_learned_vectors(base, idx):
    tuned = peft.PromptTuning(copy.deepcopy(base), n_prompt=5, seed=3)
    rows = torch.randint(CFG.vocab_size, (5,), generator=torch.Generator().manual_seed(3))
    # initialised from token embeddings: same as running the base on [those tokens + text]
    full = base(torch.cat([rows.expand(2, -1), idx], dim=1))[0][:, 5:]
    torch.testing.assert_close(tuned(idx)[0], full)
    torch.testing.assert_close(tuned.hidden_states(idx),
                               base.hidden_states(torch.cat([rows.expand(2, -1), idx], 1))[:, 5:])
    assert peft.count_parameters(tuned) == 5 * C
    _grads_only_in(tuned, idx, lambda n: n == "prompt")
    targets = idx.roll(-1, 1)
    logits, loss = tuned(idx, targets)
    torch.testing.assert_close(loss, masked_lm_loss(logits, targets))
    with pytest.raises(ValueError, match="exceed block_size=32"):
        tuned(torch.zeros(1, 28, dtype=torch.long))


# ------------------------------------------------------------------------ classification
def test_classifier_reads_the_last_real_token(base):
    clf = GPTClassifier(base)
    a, b = [5, 6, 7, 8], [9, 10]
    ids, lengths = pad_batch([a, b], pad_id=0, max_len=16)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]] and lengths.tolist() == [4, 2]
    batched = clf(ids, lengths)
    torch.testing.assert_close(batched[1], clf(torch.tensor([b]))[0])
    torch.testing.assert_close(batched[0], clf(torch.tensor([a]))[0])
    with pytest.raises(ValueError, match="lengths must be in"):
        clf(ids, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="empty sequence"):
        pad_batch([[1], []], 0, 4)


@pytest.mark.parametrize("method", ["full", "head", "top", "lora", "adapters", "prompt",
                                    "random-init"])
def test_every_method_trains_its_parameters_and_the_head(base, method):
    clf = make_classifier(copy.deepcopy(base), method, MethodConfig(top_blocks=1, n_prompt=4),
                          seed=7)
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    if method not in ("full", "random-init"):
        assert "base.transformer.wte.weight" not in trainable
    if method == "random-init":  # a fresh model, not the pretrained weights
        assert not torch.equal(clf.base.transformer.wte.weight, base.transformer.wte.weight)


def test_metrics_on_a_hand_example():
    y_true = [1, 1, 0, 0, 1, 0, 0]
    y_pred = [1, 0, 0, 1, 1, 0, 0]
    cm = confusion_matrix(y_true, y_pred)
    assert cm == [[3, 1], [1, 2]]
    assert accuracy(cm) == pytest.approx(5 / 7)
    p, r, f1 = precision_recall_f1(cm)
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert f1 == pytest.approx(2 / 3)
    p, r, f1 = precision_recall_f1(confusion_matrix([1, 0], [0, 0]))  # no spam predicted
    assert (p, r, f1) == (0.0, 0.0, 0.0)
    p, r, f1 = precision_recall_f1(confusion_matrix([1, 1, 0], [1, 1, 1]))
    assert (p, r, f1) == (pytest.approx(2 / 3), 1.0, pytest.approx(0.8))
    with pytest.raises(ValueError, match="3 labels but 2 predictions"):
        confusion_matrix([0, 1, 1], [0, 1])


def test_sms_spam_split_is_fixed_and_stratified():
    raw = load_sms_spam()
    assert len(raw) == 5574 and sum(y for _, y in raw) == 747
    data = deduplicate(raw)
    assert len(data) == len({t for t, _ in raw}) == 5171 and sum(y for _, y in data) == 653
    train, val, test = stratified_split(data, seed=0)
    assert [len(s) for s in (train, val, test)] == [3620, 516, 1035]
    assert [sum(y for _, y in s) for s in (train, val, test)] == [457, 65, 131]
    assert stratified_split(data, seed=0) == (train, val, test)
    texts = [{t for t, _ in s} for s in (train, val, test)]
    assert sum(map(len, texts)) == len(set.union(*texts)) == len(data)  # disjoint, complete
    balanced = undersample(train, seed=0)
    assert sum(y for _, y in balanced) == 457 and len(balanced) == 2 * 457


def _toy_spam(n=160, seed=0):
    """Messages of 5-8 letters; 'spam' ends in z: learnable only from the last real token."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        n = 5 + i % 4
        text = "".join(chr(97 + int(c)) for c in torch.randint(0, 20, (n,), generator=g))
        out.append((text[:-1] + "z", 1) if i % 5 == 0 else (text, 0))
    return out


def test_run_classification_learns_a_toy_task():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=27, block_size=16, n_layer=1, n_head=2, n_embd=16))
    cfg = ClassificationConfig(method="full", epochs=6, batch_size=8, lr=3e-3, max_len=16)
    result = run_classification(model, lambda t: [ord(c) - 97 for c in t], 26, cfg,
                                data=_toy_spam())
    assert result["trainable_params"] == result["total_params"] == peft.count_parameters(
        GPTClassifier(model))
    assert result["train_examples"] == 2 * 22  # 70% of 32 spam, balanced by ham
    assert result["test"]["n"] == 32 and result["test"]["accuracy"] >= 0.9
    assert result["losses"][-1] < result["losses"][0]
    # the threshold was tuned on validation and applied to the test split
    assert result["test"]["threshold"] == result["val"]["threshold"] == result["threshold"]
    assert result["test_argmax"]["threshold"] == 0.5
    cfg.val_limit = 0  # no validation split: nothing to tune on, the argmax threshold
    assert run_classification(model, lambda t: [ord(c) - 97 for c in t], 26, cfg,
                              data=_toy_spam())["threshold"] == 0.5


def test_threshold_at_one_half_is_the_argmax(base):
    clf = make_classifier(copy.deepcopy(base), "full", seed=0)
    data = [([int(t) for t in torch.randint(0, 64, (n,))], n % 2) for n in range(3, 20)]
    batches = classification_batches(data, 5, 0, 32)
    scores, labels = spam_scores(clf, batches)
    assert labels == [y for _, y in data] and all(0 < s < 1 for s in scores)
    with torch.no_grad():
        argmax = [p for ids, lengths, _ in batches for p in clf(ids, lengths).argmax(-1).tolist()]
    assert evaluate_classifier(clf, batches)["confusion"] == confusion_matrix(labels, argmax)


def test_tune_threshold_maximises_f1_between_scores():
    scores = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.3, 0.2]
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    t = tune_threshold(scores, labels)
    assert t == pytest.approx(0.825)  # halfway between the last spam and the first ham
    assert metrics_at(scores, labels, t)["f1"] == 1.0
    assert metrics_at(scores, labels, 0.5)["f1"] == pytest.approx(2 / 3)  # P 3/6, R 1
    # no candidate beats 0.5: it is kept (ties go to the candidate nearest 0.5)
    assert tune_threshold([0.9, 0.1], [1, 0]) == 0.5


def test_always_ham_baseline_and_mean_sd():
    m = always_ham([0] * 7 + [1])
    assert m["accuracy"] == 7 / 8 and (m["precision"], m["recall"], m["f1"]) == (0, 0, 0)
    assert m["confusion"] == [[7, 0], [1, 0]]
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample sd: n - 1 in the denominator
    assert mean_sd([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_sd([])
    rows = [{"method": m, "threshold": t, "test": {"f1": f}}
            for m, t, f in [("lora", 0.5, 0.7), ("head", 0.6, 0.4), ("lora", 0.7, 0.9)]]
    summary = summarize_runs(rows, keys=("f1",))
    assert list(summary) == ["lora", "head"] and summary["lora"]["runs"] == 2
    assert summary["lora"]["f1"] == pytest.approx((0.8, 0.1414213), abs=1e-6)
    assert summary["lora"]["threshold"] == pytest.approx((0.6, 0.1414213), abs=1e-6)
    assert summary["head"]["f1"] == (0.4, 0.0)


# --------------------------------------------------------------------------------- bases
SHIPPED = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?<|endoftext|>"


@pytest.mark.parametrize("name", ["shakespeare-char", "shakespeare-bpe"])
def test_load_base_of_a_shipped_model_uses_its_tokenizer(name):
    model, tokenizer, eos = load_base(SHIPPED / name)
    ours, tok = load_model(SHIPPED / name)
    assert tokenizer.encode(TEXT[:50]) == tok.encode(TEXT[:50])
    assert eos == getattr(tok, "special_tokens", {}).get("<|endoftext|>", 0)  # char: 0
    assert model.state_dict().keys() == ours.state_dict().keys()


def test_load_base_of_a_hugging_face_directory_uses_its_tokenizer_files(tmp_path):
    """A directory written by save_hf from our BPE model brings that BPE, not GPT-2's."""
    ours, tok = load_model(SHIPPED / "shakespeare-bpe")
    model, tokenizer, eos = load_base(save_hf(ours, tmp_path / "hf", tok))
    assert tokenizer.encode(TEXT) == tok.encode(TEXT)
    assert eos == tok.special_tokens["<|endoftext|>"] != GPT2_EOT
    assert model.config.vocab_size == tok.vocab_size
    # without tokenizer files (weights only): GPT-2's tokenizer, as for a hub name
    _, tokenizer, eos = load_base(save_hf(ours, tmp_path / "bare"))
    assert tokenizer.encode(TEXT) == gpt2_tokenizer().encode(TEXT) and eos == GPT2_EOT
    (tmp_path / "hf" / "merges.txt").unlink()  # half a tokenizer is an error, not GPT-2's
    with pytest.raises(PretrainedError, match="has no merges.txt"):
        load_base(tmp_path / "hf")


# -------------------------------------------------------------------------- instructions
ENTRY = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def test_templates():
    prompt, response = format_alpaca(ENTRY)
    assert prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    assert "### Input" not in prompt and response == "Blue."
    prompt, _ = format_alpaca({**ENTRY, "input": "sky"})
    assert "### Input:\nsky\n\n### Response:\n" in prompt
    assert format_chat({**ENTRY, "input": "sky"}, "Customer", "Agent") == (
        "Customer: Name a colour.\nsky\nAgent: ", "Blue.")


def test_encode_and_collate_mask_the_prompt():
    encode = lambda s: [ord(c) % 50 for c in s]  # noqa: E731
    ids, labels = encode_example("ab", "cde", encode, eos_id=63)
    assert ids == [47, 48, 49, 0, 1, 63]
    assert labels == [IGNORE, IGNORE, 49, 0, 1, 63]
    short = ([1, 2, 3], [IGNORE, 2, 3])
    inputs, targets = collate([(ids, labels), short], pad_id=60, max_len=8)
    assert inputs.tolist() == [[47, 48, 49, 0, 1], [1, 2, 60, 60, 60]]
    assert targets.tolist() == [[IGNORE, 49, 0, 1, 63], [2, 3, IGNORE, IGNORE, IGNORE]]
    inputs, targets = collate([(ids, labels)], pad_id=60, max_len=3)  # cut to 4 tokens
    assert inputs.tolist() == [[47, 48, 49]] and targets.tolist() == [[IGNORE, 49, 0]]
    with pytest.raises(ValueError, match="differ in length"):
        collate([([1, 2], [1])], 0, 4)
    # examples whose response does not fit in max_len are dropped
    kept = encode_entries([ENTRY, {**ENTRY, "instruction": "x" * 300}], format_chat, encode,
                          63, max_len=40)
    assert len(kept) == 1


def test_masked_positions_contribute_nothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    targets = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, IGNORE, IGNORE]])
    loss = masked_lm_loss(logits, targets)
    loss.backward()
    mask = targets == IGNORE
    assert torch.all(logits.grad[mask] == 0) and torch.all(logits.grad[~mask].abs().sum(-1) > 0)
    changed = logits.detach().clone()
    changed[mask] = torch.randn(int(mask.sum()), 11, generator=g) * 100
    assert masked_lm_loss(changed, targets) == loss.detach()
    manual = -torch.stack([logits[0, 2].log_softmax(-1)[3], logits[0, 3].log_softmax(-1)[4],
                           logits[1, 1].log_softmax(-1)[1], logits[1, 2].log_softmax(-1)[2]])
    torch.testing.assert_close(loss, manual.mean())


def test_evaluate_lm_changes_nothing_and_weights_by_tokens(base):
    before = copy.deepcopy(base.state_dict())
    a = collate([([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])], 0, 16)
    b = collate([([5, 6, 7, 8, 9], [IGNORE, 6, 7, 8, 9])], 0, 16)
    base.train()
    result = evaluate_lm(base, [a, b])
    assert not base.training and all(p.grad is None for p in base.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    la, lb = (masked_lm_loss(base(x)[0], y).item() for x, y in (a, b))
    assert result["tokens"] == 6
    assert result["loss"] == pytest.approx((2 * la + 4 * lb) / 6, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item())


def test_run_instruction_lowers_the_response_loss(base):
    entries = [{"instruction": f"Say {w}.", "input": "", "output": w}
               for w in ["abc", "abd", "abe", "acd"] * 10]
    encode = lambda s: [ord(c) % 60 for c in s]  # noqa: E731
    cfg = InstructionConfig(template="chat", epochs=3, batch_size=8, lr=1e-2, max_len=31)
    result = run_instruction(base, encode, 63, cfg, entries=entries)
    assert result["after"]["loss"] < result["before"]["loss"] - 1.0
    assert result["train_examples"] == 34


# ------------------------------------------------------------------ the shared fit loop
class Probe(nn.Module):
    """A Linear (decayed), a LayerNorm (not decayed) and a frozen Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.ln, self.frozen = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.ln(self.fc(x)))


def test_fit_decays_only_linear_weights_along_the_schedule():
    torch.manual_seed(0)
    model = Probe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # zero gradients: Adam's update is 0, so each step only applies p *= 1 - lr_t * wd
    batches = [torch.randn(2, 4) for _ in range(8)]
    cfg = FitConfig(lr=0.5, weight_decay=0.2, warmup=0.25, min_lr=0.1)
    losses = fit(model, batches, lambda m, x: (m(x) * 0).sum(), cfg)
    assert losses == [0.0] * 8 and not model.training
    shrink = 1.0
    for it in range(8):
        shrink *= 1 - lr_at(it, 0.5, 0.05, 2, 8) * 0.2
    assert abs(shrink - (1 - 0.5 * 0.2) ** 8) > 0.05  # the schedule matters here
    after = model.state_dict()
    torch.testing.assert_close(after["fc.weight"], before["fc.weight"] * shrink)
    for k in ("fc.bias", "ln.weight", "ln.bias", "frozen.weight", "frozen.bias"):
        assert torch.equal(after[k], before[k]), k


def test_fit_clips_gradients():
    def run(grad_clip):
        torch.manual_seed(0)
        model = Probe()
        w0 = model.fc.weight.detach().clone()
        batches = [torch.randn(2, 4) for _ in range(3)]
        cfg = FitConfig(lr=0.1, weight_decay=0.0, warmup=0.0, grad_clip=grad_clip)
        fit(model, batches, lambda m, x: m(x).square().sum(), cfg)
        return (model.fc.weight - w0).abs().max().item()

    # clipped far below Adam's eps (1e-8), the steps nearly vanish; unclipped, ~lr each
    assert run(0.0) > 0.1 and run(1e-12) < 0.01


def test_fit_config_is_checked_when_made():
    with pytest.raises(ValueError, match="bad FitConfig value for warmup, grad_clip"):
        FitConfig(warmup=1.0, grad_clip=-1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(peft.freeze(Probe()), [torch.randn(2, 4)], lambda m, x: m(x).sum())
    with pytest.raises(ValueError, match="unknown method 'lorax'"):
        ClassificationConfig(method="lorax")
    with pytest.raises(ValueError, match="unknown template"):
        InstructionConfig(template="yaml")


def test_remove_lora_leaves_a_plain_model_with_the_same_outputs(base, idx):
    lora = peft.add_lora(copy.deepcopy(base), rank=2, targets=("c_attn", "c_fc"))
    with torch.no_grad():
        for layer in lora.modules():
            if isinstance(layer, peft.LoRALinear):
                layer.lora_B.normal_()
    adapted = lora(idx)[0]
    plain = peft.remove_lora(lora)
    assert not any(isinstance(m, peft.LoRALinear) for m in plain.modules())
    assert plain.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(plain(idx)[0], adapted, rtol=1e-5, atol=1e-5)


def test_fine_tuning_modules_import_one_way_at_the_top():
    """No function imports a module; instruct and tuning never import finetune; only the
    command line imports finetune_cli."""
    src = Path(minigpt.__file__).parent
    for name in ("finetune", "finetune_cli", "instruct", "peft", "optim", "tuning"):
        tree = ast.parse((src / f"{name}.py").read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not nested, f"{name}.{fn.name} imports inside the function"
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {f"minigpt.{a.name}" for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module == "minigpt" for a in n.names}
        if name not in ("finetune", "finetune_cli"):
            assert "minigpt.finetune" not in imported, name
        assert "minigpt.finetune_cli" not in imported, name
