"""Scaling laws: the power-law fit recovers known parameters; compute-budget arithmetic."""

import math

import numpy as np
import pytest

from minigpt.model import GPT, GPTConfig
from minigpt.scaling import (
    HOFFMANN,
    ChinchillaFit,
    compute_optimal,
    fit_power_law,
    matmul_flops_per_s,
    mfu,
    non_embedding_params,
    power_law,
    read_sweep_csv,
    training_flops,
    training_seconds,
    write_sweep_csv,
)


@pytest.mark.parametrize("a, alpha, c", [(30.0, 0.3, 1.5), (8.0, 0.076, 0.0), (400.0, 0.5, 3.2)])
def test_fit_recovers_parameters_without_noise(a, alpha, c):
    n = np.geomspace(1e3, 1e8, 9)
    fa, falpha, fc = fit_power_law(n, power_law(n, a, alpha, c))
    assert falpha == pytest.approx(alpha, rel=1e-3)
    assert fa == pytest.approx(a, rel=1e-2)
    assert fc == pytest.approx(c, abs=1e-3)


def test_fit_recovers_parameters_with_noise():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e3, 1e7, 12)
    loss = power_law(n, 25.0, 0.35, 2.0) * (1 + 0.003 * rng.standard_normal(n.size))
    a, alpha, c = fit_power_law(n, loss)
    assert alpha == pytest.approx(0.35, abs=0.03)
    assert c == pytest.approx(2.0, abs=0.05)
    residual = np.abs(power_law(n, a, alpha, c) / loss - 1)
    assert residual.max() < 0.01  # the fit is as good as the noise


def test_fit_is_order_independent():
    n = np.array([1e4, 1e3, 1e6, 1e5, 1e7])
    loss = power_law(n, 10.0, 0.2, 1.0)
    order = np.argsort(n)
    np.testing.assert_allclose(fit_power_law(n, loss), fit_power_law(n[order], loss[order]),
                               rtol=1e-6)


@pytest.mark.parametrize("n, loss", [
    ([1, 2], [3.0, 2.0]),  # too few points
    ([1, 2, 3], [3.0, 2.0]),  # lengths differ
    ([1, 1, 2], [3.0, 2.5, 2.0]),  # two distinct sizes only
    ([1, 2, 3], [3.0, -2.0, 1.0]),  # a negative loss
    ([1, 2, 3], [3.0, float("nan"), 1.0]),
])
def test_fit_rejects_bad_input(n, loss):
    with pytest.raises(ValueError):
        fit_power_law(n, loss)


def test_training_flops_and_compute_optimal():
    assert training_flops(175e9, 300e9) == pytest.approx(3.15e23)  # GPT-3: ~3.14e23 FLOPs
    n, d = compute_optimal(5.76e23)  # Chinchilla's budget: 70B params, 1.4T tokens
    assert d == pytest.approx(20 * n)
    assert training_flops(n, d) == pytest.approx(5.76e23)
    assert n == pytest.approx(69.3e9, rel=0.01) and d == pytest.approx(1.39e12, rel=0.01)
    n1, d1 = compute_optimal(4 * 5.76e23)  # 4x compute: 2x params and 2x tokens
    assert (n1 / n, d1 / d) == pytest.approx((2.0, 2.0))
    n2, d2 = compute_optimal(1e20, tokens_per_param=5)
    assert d2 / n2 == pytest.approx(5) and 6 * n2 * d2 == pytest.approx(1e20)
    for bad in (0, -1.0, float("inf"), float("nan"), "1e20"):
        with pytest.raises(ValueError):
            compute_optimal(bad)
    with pytest.raises(ValueError):
        training_flops(1e6, 0)


def test_mfu_prices_a_run_at_the_utilisation_it_achieved():
    # 1M parameters at 10k tokens/s do 6e10 FLOP/s: 30 % of a 2e11 FLOP/s peak
    u = mfu(1e6, 1e4, 2e11)
    assert u == pytest.approx(0.3)
    # 6e15 FLOPs at that rate take 1e5 s, not the 3e4 s the bare peak promises
    assert training_seconds(6e15, 2e11, u) == pytest.approx(1e5)
    assert training_seconds(6e15, 2e11, 1.0) == pytest.approx(3e4)
    for bad in (0, -0.5, float("nan"), 1.5):
        with pytest.raises(ValueError, match="utilisation"):
            training_seconds(6e15, 2e11, bad)
    with pytest.raises(ValueError, match="tokens_per_s"):
        mfu(1e6, 0, 2e11)


def test_chinchilla_parametric_optimum_minimises_the_loss():
    flops = 1e21
    n, d = HOFFMANN.optimal(flops)
    assert 6 * n * d == pytest.approx(flops)
    best = HOFFMANN.loss(n, d)
    for factor in (0.5, 0.8, 1.25, 2.0):  # other splits of the same compute are worse
        assert HOFFMANN.loss(n * factor, d / factor) > best
    assert HOFFMANN.loss(70e9, 1.4e12) == pytest.approx(1.936, abs=1e-3)
    # equal exponents give N proportional to sqrt(C)
    sym = ChinchillaFit(alpha=0.3, beta=0.3)
    (na, _), (nb, _) = sym.optimal(1e20), sym.optimal(4e20)
    assert nb / na == pytest.approx(2.0)


def test_non_embedding_params_matches_the_model():
    cfg = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=24)
    model = GPT(cfg)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    assert non_embedding_params(cfg) == model.num_params(non_embedding=False) - embeddings
    # Kaplan et al.: N ~ 12 n_layer d_model^2 (weights only; biases and norms add a little)
    assert non_embedding_params(cfg) == pytest.approx(12 * 2 * 24**2, rel=0.1)


def test_matmul_flops_per_s_counts_products_over_the_clock():
    """With a clock that ticks 0.25 s per reading, the fourth reading (1 s) ends the loop
    after three products: 3 x 2 x size^3 FLOP in 1 s. A shorter budget still does three."""
    ticks = iter(0.25 * i for i in range(100))
    assert matmul_flops_per_s(size=64, seconds=1.0, clock=lambda: next(ticks)) == 3 * 2 * 64**3
    ticks = iter(0.25 * i for i in range(100))
    assert matmul_flops_per_s(size=8, seconds=0.1, clock=lambda: next(ticks)) == 3 * 2 * 8**3
    with pytest.raises(ValueError):
        matmul_flops_per_s(size=0)


def test_sweep_csv_round_trip(tmp_path):
    rows = [dict(name="s", n_layer=1, n_head=2, n_embd=16, params=100, non_embedding_params=50,
                 iter=i, tokens=64 * i, flops=6.0 * 50 * 64 * i, train_loss=3.0 - i / 10,
                 val_loss=3.1 - i / 10, final=i == 2) for i in range(3)]
    path = write_sweep_csv(rows, tmp_path / "sub" / "sweep.csv", command="python make.py --x 1")
    assert path.read_text().startswith("# python make.py --x 1\n")
    back = read_sweep_csv(path)
    assert [r["final"] for r in back] == [False, False, True]
    assert back[1]["tokens"] == 64 and back[2]["val_loss"] == pytest.approx(2.9)
    assert math.isclose(back[2]["flops"], rows[2]["flops"], rel_tol=1e-5)


# ---------------------------------------------------------------------------- IsoFLOP profiles
def test_fit_isoflop_finds_the_minimum_of_a_parabola_in_log_n():
    from minigpt.scaling import fit_isoflop

    n = np.geomspace(1e4, 1e6, 7)
    loss = 0.3 * (np.log(n) - math.log(5e4)) ** 2 + 2.0  # lowest at N = 5e4, loss 2
    fit = fit_isoflop(n, loss, flops=1e12)
    assert fit.flops == 1e12
    assert fit.n_opt == pytest.approx(5e4, rel=1e-9)
    assert fit.loss_opt == pytest.approx(2.0, abs=1e-9)
    assert fit.loss(n) == pytest.approx(loss, abs=1e-9)


def test_fit_isoflop_rejects_a_profile_without_a_minimum():
    from minigpt.scaling import fit_isoflop

    n = np.geomspace(1e4, 1e6, 5)
    with pytest.raises(ValueError, match="do not curve upwards"):
        fit_isoflop(n, 5.0 - 0.1 * np.log(n), flops=1e12)  # still falling: no minimum
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_isoflop([1e4, 1e4, 2e4], [3.0, 3.0, 2.9], flops=1e12)
    with pytest.raises(ValueError, match="flops"):
        fit_isoflop(n, 0.3 * np.log(n) ** 2, flops=-1.0)


def test_fit_isoflop_with_neighbours_fits_only_around_the_best_size():
    """Near its minimum the profile is a parabola; far from it, it rises linearly. Fitting
    every point pulls the vertex away; fitting the best size and its neighbours does not."""
    from minigpt.scaling import fit_isoflop

    x = np.log(np.geomspace(1e3, 1e6, 11)) - math.log(2e4)
    loss = 2.0 + np.where(np.abs(x) < 2, 0.3 * x**2, 1.2 * np.abs(x) - 1.2)
    shuffled = np.random.default_rng(0).permutation(len(x))  # any order of the runs
    n = np.exp(x + math.log(2e4))[shuffled]
    local = fit_isoflop(n, loss[shuffled], flops=1e12, neighbours=2)
    assert local.n_opt == pytest.approx(2e4, rel=1e-6)
    assert fit_isoflop(n, loss[shuffled], flops=1e12).n_opt != pytest.approx(2e4, rel=0.05)
    with pytest.raises(ValueError, match="too few neighbours"):
        fit_isoflop([1e4, 2e4, 4e4, 8e4], [2.0, 2.1, 2.3, 2.6], flops=1e12, neighbours=1)
    with pytest.raises(ValueError, match="neighbours must be"):
        fit_isoflop(n, loss, flops=1e12, neighbours=0)


def test_fit_power_recovers_the_exponent_of_optima_against_compute():
    from minigpt.scaling import fit_power

    c = np.array([3e10, 1e11, 3e11, 1e12])
    k, e = fit_power(c, 0.09 * c**0.5)
    assert (k, e) == (pytest.approx(0.09, rel=1e-9), pytest.approx(0.5, abs=1e-12))
    with pytest.raises(ValueError, match="positive"):
        fit_power([1.0, 2.0], [1.0, 0.0])
