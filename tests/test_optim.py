"""From-scratch AdamW, lr schedule and gradient clipping match PyTorch."""

import math

import pytest
import torch
from torch import nn

from minigpt.optim import (
    AdamW,
    clip_grad_norm,
    lr_at,
    make_optimizer,
    optimizer_step,
    param_groups,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.head.weight = nn.Parameter(torch.randn(7, 5))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.ln(self.emb(x)))))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 7, (3, 6), generator=g)
    y = torch.randint(0, 7, (3, 6), generator=g)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_equals_torch(weight_decay, foreach):
    torch.manual_seed(0)
    a = Tiny()
    b = Tiny()
    b.load_state_dict(a.state_dict())
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    opt_a = AdamW(param_groups(a, weight_decay), **kw)
    opt_b = torch.optim.AdamW(param_groups(b, weight_decay), foreach=foreach, **kw)
    assert len(opt_a.param_groups) == 2
    for step in range(6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            if foreach:
                torch.testing.assert_close(pa, pb, msg=name)
            else:
                assert torch.equal(pa, pb), (step, name)
    # the optimiser state has the same layout as torch's, so state dicts interchange
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()


def test_adamw_weight_decay_is_decoupled():
    # with a zero gradient Adam's update is 0, so only the decay moves the weight
    p = nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_adamw_rejects_bad_hyperparameters():
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="learning rate"):
        AdamW([p], lr=-1)


def test_param_groups_no_decay_for_bias_norm_embedding():
    m = Tiny()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) == {id(m.fc.weight), id(m.head.weight)}
    assert ids(no_decay) == {id(m.emb.weight), id(m.ln.weight), id(m.ln.bias), id(m.fc.bias)}


def test_param_groups_lists_tied_weight_once():
    m = Tiny()
    m.head = nn.Linear(4, 7, bias=False)
    m.head.weight = m.emb.weight  # tied, as GPT-2's lm_head/wte
    groups = param_groups(m, 0.1)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(m.parameters()))
    # the embedding is met first, so the shared tensor is not decayed
    assert id(m.emb.weight) in {id(p) for p in groups[1]["params"]}


def test_lr_at_boundaries():
    kw = dict(max_lr=1.0, min_lr=0.1, warmup_iters=10, cosine_cycle_iters=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == 0.5
    assert lr_at(10, **kw) == 1.0
    assert math.isclose(lr_at(60, **kw), 0.55)
    assert math.isclose(lr_at(110, **kw), 0.1)
    assert lr_at(111, **kw) == 0.1 and lr_at(10_000, **kw) == 0.1
    values = [lr_at(i, **kw) for i in range(10, 111)]
    assert all(x >= y for x, y in zip(values, values[1:], strict=False))
    assert lr_at(3, max_lr=1.0, min_lr=0.1, warmup_iters=0, cosine_cycle_iters=0) == 0.1
    with pytest.raises(ValueError):
        lr_at(-1, **kw)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 0.1, warmup_iters=20, cosine_cycle_iters=10)


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
def test_clip_grad_norm_equals_torch(max_norm):
    torch.manual_seed(1)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    _loss(a, 0).backward()
    _loss(b, 0).backward()
    na = clip_grad_norm(a.parameters(), max_norm)
    nb = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    torch.testing.assert_close(na, nb)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)
    if max_norm < nb:
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]))
        assert math.isclose(total.item(), max_norm, rel_tol=1e-4)


def test_clip_grad_norm_without_grads():
    assert clip_grad_norm([nn.Parameter(torch.ones(2))], 1.0).item() == 0.0


@pytest.mark.parametrize("scratch", [False, True])
def test_make_optimizer_groups_only_trainable_parameters(scratch):
    m = Tiny()
    m.emb.weight.requires_grad_(False)  # frozen, as peft leaves a base model
    m.fc.weight.requires_grad_(False)
    opt = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), scratch=scratch)
    assert isinstance(opt, AdamW) == scratch
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert ids == [{id(m.head.weight)}, {id(m.ln.weight), id(m.ln.bias), id(m.fc.bias)}]
    assert all(g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(m, 1e-3, 0.1)


def test_optimizer_step_sets_lr_clips_and_zeroes_grads():
    torch.manual_seed(0)
    a, b, c = Tiny(), Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    w0 = a.fc.weight.detach().clone()
    opt_a = make_optimizer(a, 1.0, 0.0, scratch=True)
    opt_b = AdamW(param_groups(b, 0.0), lr=0.25)
    opt_c = make_optimizer(c, 1.0, 0.0, scratch=True)
    for model in (a, b, c):
        _loss(model, 0).backward()
    # clipped to a global norm far below Adam's eps (1e-8), the first step nearly vanishes
    optimizer_step(opt_a, 0.25, grad_clip=1e-12)
    torch.nn.utils.clip_grad_norm_(b.parameters(), 1e-12)
    opt_b.step()
    optimizer_step(opt_c, 0.25, grad_clip=0.0)
    assert all(g["lr"] == 0.25 for g in opt_a.param_groups)
    assert all(p.grad is None for p in a.parameters())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)
    assert (c.fc.weight - w0).abs().max() > 0.2  # unclipped: about lr per weight
    assert (a.fc.weight - w0).abs().max() < 0.01
