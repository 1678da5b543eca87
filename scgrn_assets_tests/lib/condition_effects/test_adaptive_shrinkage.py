"""Adaptive shrinkage against brute-force integration, a generic optimiser and the s-value definition."""

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from scgrn_assets.lib.condition_effects.adaptive_shrinkage import (adaptive_shrinkage, component_likelihoods, fit_mixture_weights,
                                                 mixture_grid, svalues)


def _random_effects(rng, n=400, null_share=0.8):
    truth = np.where(rng.random(n) < null_share, 0.0, rng.normal(0, 1.5, n))
    se = rng.uniform(0.2, 0.8, n)
    return truth, truth + rng.normal(0, se), se


def test_em_weights_maximise_the_penalised_likelihood_like_a_generic_optimiser():
    rng = np.random.default_rng(0)
    _, estimate, se = _random_effects(rng)
    grid = mixture_grid(estimate, se)
    likelihood = component_likelihoods(estimate, se, grid)
    weights = fit_mixture_weights(likelihood, null_weight=10.0, max_iterations=20000, tolerance=1e-14)

    def objective(logits):
        w = np.exp(logits - logits.max())
        w /= w.sum()
        return -(np.sum(np.log(likelihood @ w)) + 9.0 * np.log(w[0]))

    best = optimize.minimize(objective, np.zeros(len(grid)), method="BFGS", options={"gtol": 1e-10, "maxiter": 5000})
    assert objective(np.log(weights + 1e-300)) <= best.fun + 1e-3
    assert weights.sum() == pytest.approx(1.0)


def test_posterior_summaries_match_numerical_integration():
    rng = np.random.default_rng(1)
    _, estimate, se = _random_effects(rng, n=200)
    result = adaptive_shrinkage(estimate, se)
    grid, weights = result.mixture_sd, result.mixture_weight
    for g in rng.choice(len(estimate), 12, replace=False):
        b, s = estimate[g], se[g]
        # Posterior = point mass (weight w0 * N(b; 0, s)) + continuous density sum_k w_k N(beta; 0, sk) N(b; beta, s).
        atom = weights[0] * stats.norm.pdf(b, 0, s)

        def density(beta):
            return sum(w * stats.norm.pdf(beta, 0, sd) for w, sd in zip(weights[1:], grid[1:])) * stats.norm.pdf(b, beta, s)

        lower, upper = -30, 30
        negative = integrate.quad(density, lower, 0, limit=200, points=[b])[0]
        positive = integrate.quad(density, 0, upper, limit=200, points=[b])[0]
        total = atom + negative + positive
        mean = integrate.quad(lambda x: x * density(x), lower, upper, limit=200, points=[0, b])[0] / total
        lfsr = min(atom + negative, atom + positive) / total
        assert result.posterior_mean[g] == pytest.approx(mean, abs=1e-6)
        assert result.lfsr[g] == pytest.approx(lfsr, abs=1e-6)
        assert result.null_probability[g] == pytest.approx(atom / total, abs=1e-8)

        def cdf(x):
            return (atom * (x >= 0) + integrate.quad(density, lower, x, limit=200, points=[0, b] if x > b else [0])[0]) / total

        for q, value in ((0.05, result.q05[g]), (0.95, result.q95[g])):
            if value == 0.0:  # the quantile sits on the atom: the CDF jumps across q at 0
                assert cdf(-1e-9) <= q + 1e-6 and cdf(0.0) >= q - 1e-6
            else:
                assert cdf(value) == pytest.approx(q, abs=1e-4)


def test_svalue_is_the_running_mean_of_sorted_lfsr():
    rng = np.random.default_rng(2)
    lfsr = rng.random(50) ** 3
    lfsr[[3, 7]] = lfsr[5]  # ties
    expected = np.array([np.mean(lfsr[lfsr <= value]) for value in lfsr])
    np.testing.assert_allclose(svalues(lfsr), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calls_at_svalue_005_keep_false_signs_low_and_null_only_data_uncalled(seed):
    rng = np.random.default_rng(seed)
    truth, estimate, se = _random_effects(rng, n=2000)
    result = adaptive_shrinkage(estimate, se)
    called = result.svalue <= 0.05
    false = called & ((truth == 0) | (np.sign(truth) != np.sign(result.posterior_mean)))
    assert called.sum() > 50
    assert false.sum() / called.sum() <= 0.08
    null_only = adaptive_shrinkage(rng.normal(0, se), se)
    assert np.mean(null_only.svalue <= 0.05) <= 0.01


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        adaptive_shrinkage(np.array([0.1, np.nan]), np.array([0.1, 0.1]))
    with pytest.raises(ValueError):
        adaptive_shrinkage(np.array([0.1, 0.2]), np.array([0.1, 0.0]))
