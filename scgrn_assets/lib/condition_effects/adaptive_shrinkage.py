"""Adaptive shrinkage (Stephens 2017, ``ashr``): let "no effect" be an answer, and call at a stated error rate.

Each gene's effect estimate ``b_g`` with standard error ``s_g`` is treated as
``b_g ~ Normal(beta_g, s_g^2)`` and the effects share a prior learnt from all genes::

    beta_g ~ pi_0 delta_0 + sum_k pi_k Normal(0, sigma_k^2)

a point mass at zero plus zero-centred normals on a fixed grid of widths. The weights ``pi``
maximise the marginal likelihood with a Dirichlet penalty that favours the null (ashr's
``nullweight = 10``), so a gene's posterior can put real mass on "exactly zero". From the
posterior we read the local false sign rate ``lfsr_g = min(P(beta_g >= 0), P(beta_g <= 0))``
(a null gene counts as a false sign) and the s-value: the mean lfsr of all genes at least as
significant, so calling genes with ``svalue <= alpha`` keeps the expected share of false signs
(false discoveries included) among the calls at ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats

#: ashr's default penalty on the null weight (pseudo-count 10 instead of 1).
NULL_WEIGHT = 10.0


@dataclass
class AshResult:
    """Posterior of each effect under the fitted mixture prior.

    Attributes
    ----------
    mixture_sd : np.ndarray, shape (n_components,)
        Component widths; the first is 0 (the point mass).
    mixture_weight : np.ndarray, shape (n_components,)
        Fitted prior weights ``pi`` (sum to 1).
    posterior_mean, posterior_sd, lfsr, svalue, q05, q95 : np.ndarray, shape (n,)
        ``q05``/``q95`` bound the central 90% posterior interval.
    null_probability : np.ndarray, shape (n,)
        Posterior probability that the effect is exactly zero (the local fdr).
    """

    mixture_sd: np.ndarray
    mixture_weight: np.ndarray
    posterior_mean: np.ndarray
    posterior_sd: np.ndarray
    lfsr: np.ndarray
    svalue: np.ndarray
    q05: np.ndarray
    q95: np.ndarray
    null_probability: np.ndarray


def mixture_grid(estimate: np.ndarray, standard_error: np.ndarray, factor: float = np.sqrt(2.0)) -> np.ndarray:
    """ashr's automatic grid: 0, then widths from min(se)/10 up to 2 sqrt(max(b^2 - s^2)) by ``factor``."""
    smallest = np.min(standard_error) / 10.0
    excess = np.max(estimate**2 - standard_error**2)
    largest = 2.0 * np.sqrt(excess) if excess > 0 else 8.0 * smallest
    largest = max(largest, smallest * factor)
    n_steps = int(np.ceil(np.log(largest / smallest) / np.log(factor)))
    return np.concatenate([[0.0], smallest * factor ** np.arange(n_steps + 1)])


def component_likelihoods(estimate, standard_error, mixture_sd) -> np.ndarray:
    """(n, n_components) densities of ``b_g`` under each component: Normal(0, s_g^2 + sigma_k^2)."""
    scale = np.sqrt(standard_error[:, None] ** 2 + mixture_sd[None, :] ** 2)
    return stats.norm.pdf(estimate[:, None], loc=0.0, scale=scale)


def fit_mixture_weights(likelihood: np.ndarray, null_weight: float = NULL_WEIGHT, max_iterations: int = 2000,
                        tolerance: float = 1e-10) -> np.ndarray:
    """Penalised maximum-likelihood mixture weights by EM.

    Maximises ``sum_g log(sum_k pi_k L_gk) + (null_weight - 1) log pi_0`` over the simplex.

    Parameters
    ----------
    likelihood : np.ndarray, shape (n, n_components)
    """
    n, n_components = likelihood.shape
    penalty = np.zeros(n_components)
    penalty[0] = null_weight - 1.0
    weights = np.full(n_components, 1.0 / n_components)
    # Scale each row by its largest entry: responsibilities are unchanged and nothing underflows.
    scaled = likelihood / np.maximum(likelihood.max(axis=1, keepdims=True), 1e-300)
    previous = -np.inf
    for _ in range(max_iterations):
        mixed = scaled @ weights
        responsibility = scaled * weights[None, :] / np.maximum(mixed, 1e-300)[:, None]
        weights = (responsibility.sum(axis=0) + penalty) / (n + penalty.sum())
        objective = np.sum(np.log(np.maximum(scaled @ weights, 1e-300))) + penalty[0] * np.log(max(weights[0], 1e-300))
        if objective - previous < tolerance * max(1.0, abs(objective)):
            break
        previous = objective
    return weights


def svalues(lfsr: np.ndarray) -> np.ndarray:
    """s-value of each gene: mean lfsr of the genes whose lfsr is at most its own."""
    order = np.argsort(lfsr, kind="stable")
    running = np.cumsum(lfsr[order]) / np.arange(1, len(lfsr) + 1)
    result = np.empty_like(running)
    result[order] = running
    # Ties share the largest running mean of their block, so equal lfsr means equal s-value.
    for value in np.unique(lfsr[order]):
        block = lfsr == value
        if block.sum() > 1:
            result[block] = result[block].max()
    return result


def adaptive_shrinkage(estimate, standard_error, *, null_weight: float = NULL_WEIGHT,
                       mixture_sd: np.ndarray | None = None) -> AshResult:
    """Fit the mixture prior to all genes and return each gene's posterior.

    Parameters
    ----------
    estimate, standard_error : array, shape (n,)
        Per-gene effect estimates and their standard errors (> 0).
    null_weight : float
        Dirichlet pseudo-count on the point mass (1 = no penalty).
    mixture_sd : array, optional
        Component widths, the first 0; default :func:`mixture_grid`.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    standard_error = np.asarray(standard_error, dtype=np.float64)
    if estimate.shape != standard_error.shape or estimate.ndim != 1:
        raise ValueError("estimate and standard_error must be 1-d arrays of one length")
    if not np.all(np.isfinite(estimate)) or not np.all(np.isfinite(standard_error)) or np.any(standard_error <= 0):
        raise ValueError("estimates must be finite and standard errors finite and positive")
    grid = mixture_grid(estimate, standard_error) if mixture_sd is None else np.asarray(mixture_sd, dtype=np.float64)
    likelihood = component_likelihoods(estimate, standard_error, grid)
    weights = fit_mixture_weights(likelihood, null_weight=null_weight)
    scaled = likelihood / np.maximum(likelihood.max(axis=1, keepdims=True), 1e-300)
    responsibility = scaled * weights[None, :]
    responsibility /= np.maximum(responsibility.sum(axis=1, keepdims=True), 1e-300)
    # Component k > 0: conjugate normal posterior; k = 0: the point mass at zero.
    prior_var = grid[None, :] ** 2
    se2 = standard_error[:, None] ** 2
    shrink = np.divide(prior_var, prior_var + se2)
    mean_k = shrink * estimate[:, None]
    sd_k = np.sqrt(shrink * se2)
    posterior_mean = np.sum(responsibility * mean_k, axis=1)
    second_moment = np.sum(responsibility * (sd_k**2 + mean_k**2), axis=1)
    posterior_sd = np.sqrt(np.maximum(second_moment - posterior_mean**2, 0.0))
    positive_part = responsibility[:, 1:] * special.ndtr(mean_k[:, 1:] / sd_k[:, 1:])
    negative_part = responsibility[:, 1:] * special.ndtr(-mean_k[:, 1:] / sd_k[:, 1:])
    null_probability = responsibility[:, 0]
    p_positive, p_negative = positive_part.sum(axis=1), negative_part.sum(axis=1)
    lfsr = np.minimum(null_probability + p_positive, null_probability + p_negative)
    lfsr = np.clip(lfsr, 0.0, 1.0)
    q05 = mixture_quantile(0.05, responsibility, mean_k, sd_k)
    q95 = mixture_quantile(0.95, responsibility, mean_k, sd_k)
    return AshResult(mixture_sd=grid, mixture_weight=weights, posterior_mean=posterior_mean,
                     posterior_sd=posterior_sd, lfsr=lfsr, svalue=svalues(lfsr), q05=q05, q95=q95,
                     null_probability=null_probability)


def mixture_cdf(x: np.ndarray, responsibility: np.ndarray, mean_k: np.ndarray, sd_k: np.ndarray) -> np.ndarray:
    """P(beta_g <= x_g) under each gene's posterior mixture (point mass in component 0)."""
    point = responsibility[:, 0] * (x >= 0.0)
    normal = responsibility[:, 1:] * special.ndtr((x[:, None] - mean_k[:, 1:]) / sd_k[:, 1:])
    return point + normal.sum(axis=1)


def mixture_quantile(probability: float, responsibility, mean_k, sd_k, n_iterations: int = 80) -> np.ndarray:
    """Per-gene ``probability`` quantile of the posterior mixture, by bisection on its CDF.

    The point mass makes the CDF jump at 0; the quantile is the smallest x with CDF(x) >= p,
    so a gene with enough mass at zero gets exactly 0.
    """
    low = np.min(mean_k - 10 * sd_k, axis=1) - 1e-12
    high = np.max(mean_k + 10 * sd_k, axis=1) + 1e-12
    low, high = np.minimum(low, 0.0) - 1e-9, np.maximum(high, 0.0) + 1e-9
    for _ in range(n_iterations):
        middle = 0.5 * (low + high)
        below = mixture_cdf(middle, responsibility, mean_k, sd_k) < probability
        low = np.where(below, middle, low)
        high = np.where(below, high, middle)
    quantile = high
    # Snap to the atom: if the CDF crosses p at 0, the quantile is exactly 0.
    at_zero = (mixture_cdf(np.zeros_like(quantile), responsibility, mean_k, sd_k) >= probability) & \
              (mixture_cdf(np.full_like(quantile, -1e-12), responsibility, mean_k, sd_k) < probability)
    return np.where(at_zero, 0.0, quantile)
