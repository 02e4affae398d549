"""From-scratch softmax, log-softmax and cross-entropy equal PyTorch's: values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.functional import cross_entropy, log_softmax, softmax

INF = float("inf")


def extreme_rows() -> torch.Tensor:
    """Rows that break a naive softmax, in float32."""
    return torch.tensor(
        [
            [1e4, -1e4, 0.0, 5.0],  # exp(1e4) overflows
            [1e30, -1e30, 1e29, 0.0],  # huge magnitudes
            [-1e30, -1e30, -1e30, -1e30],  # all equal, very negative
            [3.0e38, -3.0e38, 0.0, 1.0],  # near the float32 limit; x - max = -inf
            [7.0, 7.0, 7.0, 7.0],  # all equal: uniform
            [100.0, 0.0, 0.0, 0.0],  # one logit dominates
            [0.0, -INF, 2.0, -INF],  # masked entries
            [-1e4, -1e4 - 1.0, -1e4 + 1.0, -1e4],  # exp underflows to 0 everywhere
        ],
        dtype=torch.float32,
    )


@pytest.mark.parametrize("shape,dim", [((5,), -1), ((4, 7), -1), ((4, 7), 0), ((2, 3, 11), 1)])
def test_softmax_and_log_softmax_match_torch_on_random_inputs(shape, dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3
    torch.testing.assert_close(softmax(x, dim=dim), torch.softmax(x, dim=dim))
    torch.testing.assert_close(log_softmax(x, dim=dim), torch.log_softmax(x, dim=dim))


def test_float64_and_dtype_preserved():
    x = torch.randn(3, 5, dtype=torch.float64)
    assert softmax(x).dtype == torch.float64
    assert log_softmax(x).dtype == torch.float64
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, dim=-1))


def test_extreme_logits_match_torch():
    x = extreme_rows()
    ours, ref = softmax(x), torch.softmax(x, dim=-1)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(ours.sum(-1), torch.ones(len(x)))
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, dim=-1))
    # Specific values we can state exactly.
    torch.testing.assert_close(softmax(x)[4], torch.full((4,), 0.25))
    assert softmax(x)[5, 0] == 1.0
    assert softmax(x)[6, 1] == 0.0 and softmax(x)[6, 3] == 0.0
    assert log_softmax(x)[6, 1] == -INF


def test_naive_softmax_overflows_where_ours_does_not():
    x = torch.tensor([1e4, 0.0, -1e4])
    naive = x.exp() / x.exp().sum()
    assert torch.isnan(naive).any()  # inf / inf
    naive_log = (x.exp() / x.exp().sum()).log()
    assert not torch.isfinite(naive_log).all()
    torch.testing.assert_close(softmax(x), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(log_softmax(x), torch.tensor([0.0, -1e4, -2e4]))
    # log(softmax) underflows to -inf where log_softmax stays exact.
    y = torch.tensor([0.0, -200.0])
    assert softmax(y).log()[1] == -INF
    torch.testing.assert_close(log_softmax(y)[1], torch.tensor(-200.0))


def test_all_masked_row_is_nan_like_torch():
    x = torch.full((1, 3), -INF)
    assert torch.isnan(softmax(x)).all()
    assert torch.isnan(torch.softmax(x, dim=-1)).all()


@pytest.mark.parametrize("make", [lambda: torch.randn(6, 9) * 4, extreme_rows])
def test_gradients_match_torch(make):
    x1 = make().requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    w = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    (softmax(x1) * w).sum().backward()
    (torch.softmax(x2, dim=-1) * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)

    x1.grad = None
    x2.grad = None
    finite = torch.where(torch.isfinite(w), w, 0.0)
    (log_softmax(x1).nan_to_num(neginf=0.0) * finite).sum().backward()
    (torch.log_softmax(x2, dim=-1).nan_to_num(neginf=0.0) * finite).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_softmax_gradient_by_finite_differences():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax(t), (x,))
    assert torch.autograd.gradcheck(lambda t: log_softmax(t), (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch_2d(reduction):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 13, generator=g) * 2
    targets = torch.randint(0, 13, (10,), generator=g)
    torch.testing.assert_close(
        cross_entropy(logits, targets, reduction=reduction),
        F.cross_entropy(logits, targets, reduction=reduction),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch_3d_with_ignore_index(reduction):
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 5, 7
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = -100
    targets[2, 4] = -100
    ours = cross_entropy(logits, targets, reduction=reduction)
    # PyTorch wants the class dimension second for sequence inputs: (B, V, T).
    ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction=reduction)
    torch.testing.assert_close(ours, ref)
    if reduction == "none":
        assert ours.shape == (B, T)
        assert (ours[0, :2] == 0).all()


def test_cross_entropy_custom_ignore_index_and_mean_over_kept_positions():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([1, 0, 5, 0])
    ours = cross_entropy(logits, targets, ignore_index=0)
    torch.testing.assert_close(ours, F.cross_entropy(logits, targets, ignore_index=0))
    expected = -(torch.log_softmax(logits, -1)[[0, 2], [1, 5]]).mean()
    torch.testing.assert_close(ours, expected)


def test_cross_entropy_all_ignored_is_nan_like_torch():
    logits = torch.randn(3, 4)
    targets = torch.full((3,), -100)
    assert torch.isnan(cross_entropy(logits, targets))
    assert torch.isnan(F.cross_entropy(logits, targets))
    assert cross_entropy(logits, targets, reduction="sum") == 0


def test_cross_entropy_extreme_logits_and_gradients_match_torch():
    logits = extreme_rows()[:6]  # rows without -inf, so every target has a finite loss
    targets = torch.tensor([0, 1, 2, 3, 1, 1])
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    ours = cross_entropy(l1, targets)
    ref = F.cross_entropy(l2, targets)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(l1.grad, l2.grad)


def test_cross_entropy_gradient_random_3d_with_ignore():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 9, generator=g)
    targets = torch.randint(0, 9, (2, 4), generator=g)
    targets[1, 1] = -100
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    cross_entropy(l1, targets).backward()
    F.cross_entropy(l2.transpose(1, 2), targets).backward()
    torch.testing.assert_close(l1.grad, l2.grad)
    assert (l1.grad[1, 1] == 0).all()


def test_uniform_logits_give_log_vocab_size():
    V = 65
    loss = cross_entropy(torch.zeros(8, V), torch.arange(8))
    torch.testing.assert_close(loss, torch.tensor(math.log(V)))


@pytest.mark.parametrize(
    "logits,targets,match",
    [
        (torch.randn(4, 5), torch.zeros(3, dtype=torch.long), "does not match"),
        (torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), "does not match"),
        (torch.randn(4, 5), torch.zeros(4), "integer token ids"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.bool), "integer token ids"),
        (torch.randn(5), torch.tensor(1), r"\(N, V\) or \(B, T, V\)"),
        (torch.randn(1, 2, 3, 4), torch.zeros(1, 2, 3, dtype=torch.long), r"\(N, V\)"),
        (torch.randint(0, 3, (4, 5)), torch.zeros(4, dtype=torch.long), "floating-point"),
        (torch.randn(4, 5), torch.tensor([0, 1, 5, 2]), "outside the vocabulary"),
        (torch.randn(4, 5), torch.tensor([0, -1, 2, 2]), "outside the vocabulary"),
    ],
)
def test_cross_entropy_rejects_bad_input_with_clear_errors(logits, targets, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(logits, targets)


def test_bad_reduction_and_integer_softmax_raise():
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="floating-point"):
        softmax(torch.arange(4))
    with pytest.raises(ValueError, match="floating-point"):
        log_softmax(torch.arange(4))


finite_floats = st.floats(
    min_value=-(2.0**100),  # about 1.3e30, exactly representable in float32
    max_value=2.0**100,
    allow_nan=False,
    allow_infinity=False,
    width=32,
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(finite_floats, min_size=1, max_size=16), st.floats(-1e3, 1e3, width=32))
@pytest.mark.slow
def test_softmax_properties(values, shift):
    x = torch.tensor(values, dtype=torch.float32)
    p = softmax(x)
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    torch.testing.assert_close(p, torch.softmax(x, dim=-1))
    torch.testing.assert_close(log_softmax(x), torch.log_softmax(x, dim=-1))
    # Adding a constant to every logit leaves the distribution unchanged.
    if x.abs().max() < 1e6:
        torch.testing.assert_close(softmax(x + shift), p, atol=1e-5, rtol=1e-4)


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.lists(
        st.floats(min_value=-50, max_value=50, allow_nan=False, width=32), min_size=2, max_size=12
    ),
    st.data(),
)
def test_cross_entropy_properties(values, data):
    logits = torch.tensor(values).reshape(1, -1)
    target = data.draw(st.integers(0, len(values) - 1))
    t = torch.tensor([target])
    loss = cross_entropy(logits, t)
    assert loss >= 0
    torch.testing.assert_close(loss, F.cross_entropy(logits, t))
    torch.testing.assert_close(loss, -torch.log_softmax(logits, -1)[0, target])
