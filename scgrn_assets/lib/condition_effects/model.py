"""The default condition-effect model: a Bayesian Negative-Binomial GLM on per-animal pseudobulk.

Model (animals ``a`` with condition ``c_a`` in {0, 1}, study ``k(a)``, genes ``g``)::

    Y_ag        ~ NegBinomial(mean mu_ag, variance mu_ag + alpha_g mu_ag^2)
    log mu_ag   = log S_a + beta0_{k(a) g} + beta1_g * x_a
    x_a         = c_a - (share of case animals in study k(a))   (condition centred within study)
    beta0_kg    ~ Normal(-8, 5)                                  (a log proportion: weak)
    beta1_g     ~ Normal(0, 1.5)                                 (weak: the shrinkage is adaptive, below)
    log alpha_g ~ Normal(a0 + a1 * l_g, sigma_alpha)             (dispersion trend in log mean expression l_g)

``Y_ag`` is the animal's counts summed over its cells and ``S_a`` its size (DESeq2's
median-of-ratios factor times the typical library size: robust to a few strongly changed genes). The
animal is the replicate, so ``alpha_g`` is the between-animal (biological) dispersion, which is
what the condition effect must be judged against. Centring ``x`` within study keeps each study's
intercept nearly uncorrelated with ``beta1`` and gives a single-condition study a zero column: it
informs its own baseline and the dispersion trend, never the effect.

Inference. Given the trend ``(a0, a1, sigma_alpha)`` the genes are independent, each a
``K + 2``-dimensional posterior. The trend is set by empirical Bayes: the marginal likelihood of
all genes, computed from each gene's posterior under a wide dispersion prior, is maximised over
``(a0, a1, sigma_alpha)`` (DESeq2 sets its dispersion prior from the genes too, from point
estimates). Each gene's posterior is then computed exactly up to Monte
Carlo error by importance sampling: a Student-t proposal at the gene's MAP with the inverse
Hessian as scale (vectorised Newton in JAX), Pareto-smoothed weights (PSIS), and ``k-hat`` per
gene as the check that the proposal was good enough (k-hat < 0.7). Draws are resampled to equal
weights and kept in an ArviZ ``InferenceData``. The same model written in PyMC
(:func:`build_pseudobulk_model`) is sampled with NUTS in the tests and in
``bench/de_calibration.py`` to show the two posteriors agree. ``beta1`` is then passed through
adaptive shrinkage (:mod:`scgrn_assets.lib.condition_effects.adaptive_shrinkage`), whose point-mass prior lets "no
effect" be the answer and gives the s-values the calls are made at.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scgrn_assets.lib.condition_effects.pseudobulk import Pseudobulk

LOG2 = np.log(2.0)
INTERCEPT_PRIOR = (-8.0, 5.0)
EFFECT_PRIOR_SD = 1.5
#: Gene counts are padded to a multiple of this, so fits of similar size share one JIT compilation.
GENE_BUCKET = 256
#: PSIS k-hat above this means the importance sampler cannot be trusted for that gene.
MAX_PARETO_K = 0.7


@dataclass
class PosteriorConfig:
    """How to compute the posterior.

    Attributes
    ----------
    n_proposals : int
        Importance-sampling proposals per gene.
    n_trend_proposals : int
        Proposals per gene in the wide-prior pass that sets the dispersion trend.
    n_draws : int
        Equal-weight draws kept per gene (resampled).
    proposal_df : float
        Degrees of freedom of the Student-t proposal (heavier tails than the posterior).
    newton_steps : int
        Damped Newton iterations for each gene's MAP.
    seed : int
    device : str
        "cpu" or "gpu": where JAX runs the vectorised Newton and the weights.
    """

    n_proposals: int = 1500
    n_trend_proposals: int = 400
    n_draws: int = 500
    proposal_df: float = 6.0
    newton_steps: int = 40
    seed: int = 0
    device: str = "cpu"


@dataclass
class PseudobulkPosterior:
    """A fitted pseudobulk model.

    Attributes
    ----------
    idata : arviz.InferenceData
        ``posterior`` group: ``beta0`` (study x gene), ``beta1``, ``log_alpha`` (gene), one
        chain of equal-weight draws; ``sample_stats``-like diagnostics per gene in
        ``idata.posterior.attrs`` and the ``pareto_k`` data variable (gene).
    pseudobulk : Pseudobulk
        The data it was fitted on.
    studies : list of str
        Study order of ``beta0``.
    dispersion_trend : dict
        ``a0``, ``a1``, ``sigma_alpha``.
    seconds : float
    """

    idata: object
    pseudobulk: Pseudobulk
    studies: list[str]
    dispersion_trend: dict
    seconds: float
    config: PosteriorConfig = field(default_factory=PosteriorConfig)


def _design(pseudobulk: Pseudobulk) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Condition centred within each study (n_samples,), study index (n_samples,) and study order."""
    studies = sorted(pseudobulk.samples["study"].astype(str).unique())
    study_index = np.searchsorted(studies, pseudobulk.samples["study"].astype(str).to_numpy())
    is_case = pseudobulk.is_case.astype(np.float64)
    share = np.bincount(study_index, weights=is_case, minlength=len(studies)) / np.bincount(study_index,
                                                                                            minlength=len(studies))
    return is_case - share[study_index], study_index, studies


def log_mean_expression(pseudobulk: Pseudobulk) -> np.ndarray:
    """(n_genes,) log of the mean normalised count (+0.5), centred: the dispersion trend's covariate."""
    level = np.log(pseudobulk.normalised().mean(axis=0) + 0.5)
    return level - level.mean()


def build_pseudobulk_model(pseudobulk: Pseudobulk, dispersion_trend: dict):
    """The model of the module docstring in PyMC, with the dispersion trend fixed (for NUTS)."""
    import pymc as pm

    condition, study_index, studies = _design(pseudobulk)
    log_library = pseudobulk.log_offset()
    level = log_mean_expression(pseudobulk)
    coords = {"gene": pseudobulk.gene_names, "study": studies, "sample": np.arange(pseudobulk.n_samples)}
    with pm.Model(coords=coords) as model:
        beta0 = pm.Normal("beta0", *INTERCEPT_PRIOR, dims=("study", "gene"))
        beta1 = pm.Normal("beta1", 0.0, EFFECT_PRIOR_SD, dims="gene")
        log_alpha = pm.Normal("log_alpha", dispersion_trend["a0"] + dispersion_trend["a1"] * level,
                              dispersion_trend["sigma_alpha"], dims="gene")
        eta = log_library[:, None] + beta0[study_index] + condition[:, None] * beta1[None, :]
        pm.NegativeBinomial("counts", mu=pm.math.exp(eta), alpha=pm.math.exp(-log_alpha),
                            observed=pseudobulk.counts, dims=("sample", "gene"))
    return model


@functools.lru_cache(maxsize=8)
def _gene_log_posterior(n_studies: int):
    """JAX log posterior of one gene's parameters ``theta = (beta0_1..K, beta1, log_alpha)``."""
    import jax.numpy as jnp
    from jax.scipy.special import gammaln
    from jax.scipy.stats import norm

    def log_posterior(theta, counts, log_library, condition, study_onehot, prior_log_alpha, sigma_alpha):
        intercepts, beta1, log_alpha = theta[:n_studies], theta[n_studies], theta[n_studies + 1]
        eta = log_library + study_onehot @ intercepts + beta1 * condition
        shape = jnp.exp(-log_alpha)
        log_ratio = eta + log_alpha  # log(mu / shape)
        softplus = jnp.logaddexp(0.0, log_ratio)  # log(1 + mu / shape)
        log_likelihood = (gammaln(counts + shape) - gammaln(shape) - gammaln(counts + 1.0)
                          - shape * softplus + counts * (log_ratio - softplus))
        log_prior = (jnp.sum(norm.logpdf(intercepts, *INTERCEPT_PRIOR)) + norm.logpdf(beta1, 0.0, EFFECT_PRIOR_SD)
                     + norm.logpdf(log_alpha, prior_log_alpha, sigma_alpha))
        return jnp.sum(log_likelihood) + log_prior

    return log_posterior


@functools.lru_cache(maxsize=8)
def _kernels(n_studies: int) -> dict:
    """JIT-compiled, vectorised-over-genes kernels for ``n_studies``, compiled once per process and shape
    (the data are arguments, never baked-in constants, so a second fit reuses the compilation)."""
    import jax
    import jax.numpy as jnp

    log_posterior = _gene_log_posterior(n_studies)
    genes = (0, 1, None, None, None, 0, None)
    gradient = jax.vmap(jax.grad(log_posterior), in_axes=genes)
    hessian = jax.vmap(jax.hessian(log_posterior), in_axes=genes)
    value = jax.vmap(log_posterior, in_axes=genes)

    def newton_step(theta, *data):
        g, h = gradient(theta, *data), hessian(theta, *data)
        # Levenberg-Marquardt: the plain Newton step first, then ever more damped (towards gradient
        # ascent), each at full and half length; a gene keeps the first candidate that improves.
        eye = jnp.eye(theta.shape[1])[None]
        scale = jnp.max(jnp.abs(jnp.diagonal(h, axis1=1, axis2=2)), axis=1)[:, None, None] + 1e-8
        current = value(theta, *data)
        best, improved = theta, jnp.zeros(theta.shape[0], dtype=bool)
        for damping in (1e-8, 1e-2, 1e-1, 1.0, 10.0, 100.0):
            step = jnp.clip(jnp.linalg.solve(-h + damping * scale * eye, g[..., None])[..., 0], -2.0, 2.0)
            for length in (1.0, 0.5):
                candidate = theta + length * step
                candidate_value = value(candidate, *data)
                better = ~improved & jnp.isfinite(candidate_value) & (candidate_value > current)
                best = jnp.where(better[:, None], candidate, best)
                improved = improved | better
        return best, jnp.max(jnp.abs(best - theta))

    over_draws = jax.vmap(log_posterior, in_axes=(0, None, None, None, None, None, None))
    return {"newton_step": jax.jit(newton_step), "hessian": jax.jit(hessian),
            "log_posterior_draws": jax.jit(jax.vmap(over_draws, in_axes=genes))}


def _initial_theta(pseudobulk: Pseudobulk, condition: np.ndarray, study_index: np.ndarray,
                   n_studies: int) -> np.ndarray:
    """(n_genes, K + 2) start: each study's pooled log rate, the pooled case/control log ratio, alpha 0.1."""
    library = np.exp(pseudobulk.log_offset())
    counts = pseudobulk.counts.astype(np.float64)
    intercepts = np.vstack([np.log((counts[study_index == k].sum(axis=0) + 0.5) / library[study_index == k].sum())
                            for k in range(n_studies)])
    case, control = condition > 0, condition < 0  # a single-condition study (x = 0) says nothing here
    ratio = np.zeros(pseudobulk.n_genes)
    if case.any() and control.any():
        ratio = (np.log((counts[case].sum(axis=0) + 0.5) / library[case].sum())
                 - np.log((counts[control].sum(axis=0) + 0.5) / library[control].sum()))
    return np.column_stack([intercepts.T, ratio, np.full(pseudobulk.n_genes, np.log(0.1))])


def _map_estimates(kernels: dict, theta, data, prior_log_alpha, sigma_alpha, n_steps: int,
                   tolerance: float = 1e-6):
    """Damped Newton on every gene at once, until no parameter moves more than ``tolerance``;
    returns the MAP (n_genes, d) and the Hessian (n_genes, d, d)."""
    import jax.numpy as jnp

    arguments = (*data, prior_log_alpha, jnp.asarray(sigma_alpha, dtype=jnp.float64))
    theta = jnp.asarray(theta)
    for _ in range(n_steps):
        theta, largest_move = kernels["newton_step"](theta, *arguments)
        if float(largest_move) < tolerance:
            break
    return np.asarray(theta), np.asarray(kernels["hessian"](theta, *arguments))


def _estimate_dispersion_trend(log_alpha_draws: np.ndarray, level: np.ndarray, wide_mean: float,
                               wide_sd: float) -> dict:
    """Empirical Bayes trend ``(a0, a1, sigma_alpha)`` by maximising the marginal likelihood of all genes.

    ``log_alpha_draws`` (n_genes, n_draws) are each gene's log-dispersion posterior under the wide
    prior Normal(wide_mean, wide_sd), the mean parameters integrated out. The marginal likelihood
    of the data under a trend prior is then, up to a constant per gene, the posterior mean of the
    prior ratio ``N(log_alpha; a0 + a1 l_g, sigma) / N(log_alpha; wide_mean, wide_sd)``. (A trend fit
    to point estimates would be biased low with few animals: the posterior of log alpha has a long
    flat tail towards Poisson.)
    """
    from scipy import optimize, special

    draws = log_alpha_draws[:, :200]  # 200 draws per gene pin the trend; more only cost time
    # log N(x; m, s) up to the shared -log sqrt(2 pi), written out: scipy.stats' overhead dominated.
    wide = -0.5 * ((draws - wide_mean) / wide_sd) ** 2 - np.log(wide_sd)

    def negative_log_marginal(params):
        a0, a1, log_sigma = params
        prior = -0.5 * ((draws - (a0 + a1 * level)[:, None]) * np.exp(-log_sigma)) ** 2 - log_sigma
        return -np.sum(special.logsumexp(prior - wide, axis=1))

    start = np.array([float(np.median(draws)), 0.0, np.log(0.5)])
    fitted = optimize.minimize(negative_log_marginal, start, method="Nelder-Mead",
                               options={"xatol": 1e-4, "fatol": 1e-4, "maxiter": 2000})
    a0, a1, log_sigma = fitted.x
    return {"a0": float(a0), "a1": float(a1), "sigma_alpha": float(max(np.exp(log_sigma), 0.05))}


def fit_pseudobulk_model(pseudobulk: Pseudobulk, config: PosteriorConfig | None = None,
                         dispersion_trend: dict | None = None) -> PseudobulkPosterior:
    """The posterior of every gene's parameters (see the module docstring).

    Parameters
    ----------
    pseudobulk : Pseudobulk
        Animals of both conditions (see :func:`scgrn_assets.lib.condition_effects.pseudobulk.check_design`).
    config : PosteriorConfig, optional
    dispersion_trend : dict, optional
        Fix ``a0``, ``a1``, ``sigma_alpha`` instead of estimating them (e.g. to compare with NUTS).
    """
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()
    import jax
    import jax.numpy as jnp

    from scgrn_assets.lib.condition_effects.cell_model_inference import jax_device

    config = config or PosteriorConfig()
    started = time.perf_counter()
    condition, study_index, studies = _design(pseudobulk)
    n_studies = len(studies)
    level = log_mean_expression(pseudobulk)
    onehot = np.eye(n_studies)[study_index]
    log_library = pseudobulk.log_offset()
    n_genes = pseudobulk.n_genes
    # Genes padded (repeating the last) to a multiple of GENE_BUCKET, so fits of similar size share
    # one compilation; the padding is cut off below.
    padded = np.minimum(np.arange(-(-n_genes // GENE_BUCKET) * GENE_BUCKET), n_genes - 1)
    with jax.enable_x64(True), jax_device(config.device):
        data = (jnp.asarray(pseudobulk.counts[:, padded], dtype=jnp.float64), jnp.asarray(log_library),
                jnp.asarray(condition), jnp.asarray(onehot))
        kernels = _kernels(n_studies)
        theta = _initial_theta(pseudobulk, condition, study_index, n_studies)[padded]
        level_padded = level[padded]
        if dispersion_trend is None:
            # Empirical Bayes: each gene's log-dispersion posterior under a wide prior, the mean
            # parameters integrated out (a joint MAP would be biased low, as the dispersion MLE is
            # without DESeq2's Cox-Reid adjustment), then the trend and its spread across genes.
            wide_prior = jnp.full(len(padded), -2.0)
            theta, hessian = _map_estimates(kernels, theta, data, wide_prior, 3.0, config.newton_steps)
            wide_draws, _ = _importance_draws(kernels, theta, hessian, data, wide_prior, 3.0, config,
                                              n_proposals=config.n_trend_proposals)
            dispersion_trend = _estimate_dispersion_trend(wide_draws[:n_genes, :, -1], level, -2.0, 3.0)
        prior_log_alpha = jnp.asarray(dispersion_trend["a0"] + dispersion_trend["a1"] * level_padded)
        sigma_alpha = float(dispersion_trend["sigma_alpha"])
        theta, hessian = _map_estimates(kernels, theta, data, prior_log_alpha, sigma_alpha, config.newton_steps)
        draws, pareto_k = _importance_draws(kernels, theta, hessian, data, prior_log_alpha, sigma_alpha, config,
                                            n_proposals=config.n_proposals)
    draws, pareto_k, theta = draws[:n_genes], pareto_k[:n_genes], theta[:n_genes]
    posterior = {"beta0": draws[:, :, :n_studies].transpose(1, 2, 0)[None],
                 "beta1": draws[:, :, n_studies].T[None],
                 "log_alpha": draws[:, :, n_studies + 1].T[None]}
    idata = az.from_dict(posterior=posterior,
                         coords={"gene": pseudobulk.gene_names, "study": studies},
                         dims={"beta0": ["study", "gene"], "beta1": ["gene"], "log_alpha": ["gene"]})
    idata.posterior["pareto_k"] = ("gene", pareto_k)
    idata.posterior["map_beta1"] = ("gene", theta[:, n_studies])
    seconds = time.perf_counter() - started
    idata.posterior.attrs.update(seconds=float(seconds), method="pseudobulk_nb_importance",
                                 n_genes=int(n_genes), **{f"trend_{k}": v for k, v in dispersion_trend.items()})
    return PseudobulkPosterior(idata=idata, pseudobulk=pseudobulk, studies=studies,
                               dispersion_trend=dispersion_trend, seconds=seconds, config=config)


def _importance_draws(kernels: dict, theta, hessian, data, prior_log_alpha, sigma_alpha, config: PosteriorConfig,
                      n_proposals: int):
    """Student-t proposals at each MAP, PSIS weights, resampled equal-weight draws and k-hat per gene.

    Returns draws of shape (n_genes, n_draws, d) and k-hat of shape (n_genes,).
    """
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()
    import jax
    import jax.numpy as jnp
    n_genes, dimension = theta.shape
    rng = np.random.default_rng(config.seed)
    covariance = np.linalg.inv(-hessian + 1e-9 * np.eye(dimension)[None])
    covariance = 0.5 * (covariance + covariance.transpose(0, 2, 1))
    # Eigen-clip: a gene whose Hessian is not negative definite still gets a usable proposal scale.
    values, vectors = np.linalg.eigh(covariance)
    values = np.clip(values, 1e-8, 25.0)
    root = vectors * np.sqrt(values)[:, None, :]
    df = config.proposal_df
    n = n_proposals
    normal = rng.standard_normal((n_genes, n, dimension))
    chi = rng.chisquare(df, (n_genes, n, 1))
    offsets = np.einsum("gij,gnj->gni", root, normal) / np.sqrt(chi / df)
    proposals = theta[:, None, :] + offsets
    # log q: multivariate t density (up to a constant shared by all draws of a gene).
    whitened = np.einsum("gij,gnj->gni", np.transpose(vectors, (0, 2, 1)), offsets) / np.sqrt(values)[:, None, :]
    log_q = -0.5 * (df + dimension) * np.log1p(np.sum(whitened**2, axis=2) / df)
    counts, log_library, condition, onehot = data
    sigma = jnp.asarray(sigma_alpha, dtype=jnp.float64)
    # Genes in blocks of one fixed size (the last one padded): the (genes x draws x animals)
    # intermediates stay a few hundred MB, and every block reuses one compilation.
    block = int(min(n_genes, max(1, 2e7 // max(n * counts.shape[0], 1))))
    log_p = []
    for start in range(0, n_genes, block):
        rows = np.minimum(np.arange(start, start + block), n_genes - 1)
        values = kernels["log_posterior_draws"](jnp.asarray(proposals[rows]), counts[:, rows], log_library,
                                                condition, onehot, prior_log_alpha[rows], sigma)
        log_p.append(np.asarray(values)[: min(block, n_genes - start)])
    log_p = np.concatenate(log_p)
    log_weights = np.where(np.isfinite(log_p), log_p - log_q, -np.inf)
    smoothed, pareto_k = az.psislw(log_weights.copy())  # draws on the last axis
    smoothed = np.asarray(smoothed)
    weights = np.exp(smoothed - smoothed.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    # Systematic resampling to equal weights: low variance, deterministic given the seed.
    positions = (rng.random((n_genes, 1)) + np.arange(config.n_draws)[None, :]) / config.n_draws
    chosen = np.minimum(np.array([np.searchsorted(np.cumsum(w), p) for w, p in zip(weights, positions)]), n - 1)
    draws = np.take_along_axis(proposals, chosen[:, :, None], axis=1)
    return draws, np.asarray(pareto_k, dtype=np.float64)


def stacked_draws(idata, name: str) -> np.ndarray:
    """Draws of one variable with chain and draw merged: shape (n_draws, *variable_shape)."""
    values = np.asarray(idata.posterior[name].values, dtype=np.float64)
    return values.reshape((-1, *values.shape[2:]))


def posterior_diagnostics(idata) -> dict:
    """PSIS k-hat over genes: the check that importance sampling represents each gene's posterior."""
    pareto_k = np.asarray(idata.posterior["pareto_k"].values, dtype=np.float64)
    return {"max_pareto_k": float(np.max(pareto_k)) if pareto_k.size else 0.0,
            "median_pareto_k": float(np.median(pareto_k)) if pareto_k.size else 0.0,
            "n_genes_pareto_k_above_0.7": int(np.sum(pareto_k > MAX_PARETO_K)),
            "n_genes": int(pareto_k.size)}


def replicated_pseudobulk(posterior: PseudobulkPosterior, n_draws: int = 100, seed: int = 0) -> np.ndarray:
    """Posterior predictive pseudobulk: shape (n_draws, n_samples, n_genes), drawn from the fitted model."""
    pseudobulk = posterior.pseudobulk
    condition, study_index, _ = _design(pseudobulk)
    log_library = pseudobulk.log_offset()
    intercept, beta1 = stacked_draws(posterior.idata, "beta0"), stacked_draws(posterior.idata, "beta1")
    log_alpha = stacked_draws(posterior.idata, "log_alpha")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(beta1.shape[0], size=min(n_draws, beta1.shape[0]), replace=False)
    replicated = np.empty((len(chosen), pseudobulk.n_samples, pseudobulk.n_genes))
    for row, draw in enumerate(chosen):
        eta = log_library[:, None] + intercept[draw][study_index] + condition[:, None] * beta1[draw][None, :]
        shape = np.exp(-log_alpha[draw])[None, :]
        replicated[row] = rng.negative_binomial(shape, shape / (shape + np.exp(eta)))
    return replicated


def effect_draws(posterior: PseudobulkPosterior) -> np.ndarray:
    """(n_draws, n_genes) posterior draws of the condition effect on the log2 scale."""
    return stacked_draws(posterior.idata, "beta1") / LOG2


def base_mean(pseudobulk: Pseudobulk) -> np.ndarray:
    """(n_genes,) mean normalised count over animals (DESeq2's baseMean, with library-size factors)."""
    return pseudobulk.normalised().mean(axis=0)


def effect_table(log2fc_draws: np.ndarray, pseudobulk: Pseudobulk, *, fdr_target: float = 0.05,
                 contrast_samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """The condition-effect table from posterior draws of each gene's log2 fold change.

    ``log2fc_mean``, ``log2fc_sd``, ``log2fc_q05`` and ``log2fc_q95`` (the central 90% interval)
    describe each gene's own posterior under the model's weak effect prior: an interval that
    covers the truth 90% of the time for every gene, null or not. The decision is made across
    genes: adaptive shrinkage of (mean, sd) gives ``lfsr``, ``svalue``, ``log2fc_shrunk`` (the
    shrunk posterior mean, 0 for genes the mixture puts at zero) and ``called`` =
    ``svalue <= fdr_target``. Also ``gene``, ``base_mean``, ``n_samples_control``,
    ``n_samples_case``, ``n_cells``.

    Parameters
    ----------
    log2fc_draws : np.ndarray, shape (n_draws, n_genes)
    contrast_samples : pd.DataFrame, optional
        The animals that inform the effect (default: all of ``pseudobulk``), for the counts columns.
    """
    from scgrn_assets.lib.condition_effects.adaptive_shrinkage import adaptive_shrinkage

    mean = log2fc_draws.mean(axis=0)
    sd = np.maximum(log2fc_draws.std(axis=0, ddof=1), 1e-8)
    q05, q95 = np.quantile(log2fc_draws, [0.05, 0.95], axis=0)
    shrunk = adaptive_shrinkage(mean, sd)
    samples = pseudobulk.samples if contrast_samples is None else contrast_samples
    is_case = (samples["condition"] == pseudobulk.levels[1]).to_numpy()
    return pd.DataFrame({
        "gene": pseudobulk.gene_names,
        "base_mean": base_mean(pseudobulk),
        "log2fc_mean": mean,
        "log2fc_sd": sd,
        "log2fc_q05": q05,
        "log2fc_q95": q95,
        "lfsr": shrunk.lfsr,
        "svalue": shrunk.svalue,
        "called": shrunk.svalue <= fdr_target,
        "log2fc_shrunk": shrunk.posterior_mean,
        "n_samples_control": int((~is_case).sum()),
        "n_samples_case": int(is_case.sum()),
        "n_cells": int(samples["n_cells"].sum()),
    })
