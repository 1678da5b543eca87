"""The hierarchical Negative-Binomial model of condition effects, cell by cell.

Its inputs are prepared in :mod:`.cell_model_data`, it is fitted in :mod:`.cell_model_inference`,
read off in :mod:`.cell_model_readout` (effect table, save/load), criticised in :mod:`.cell_model_ppc`
and drawn in :mod:`.cell_model_plots`.

Model (cells ``i`` with known condition ``c_i`` in {0, 1}, genes ``g``, studies ``k``)::

    Y_ig       ~ NegBinomial(mean mu_ig, inverse dispersion phi_g)
    log mu_ig  = log s_i + beta0_g + beta1_g * c_i + b_{k(i) g} + gamma * log(L_g / 1 kb)
    beta0_g    ~ Normal(mu0, sigma0),      mu0 ~ Normal(-8, 4),  sigma0 ~ HalfNormal(3)
    beta1_g    ~ Normal(0, sigma1),        sigma1 ~ HalfNormal(1)       (shrinkage across genes)
    b_kg       = sigma_b * z_kg,           z_kg ~ Normal(0, 1),  sigma_b ~ HalfNormal(1)  (non-centred)
    gamma      ~ Normal(0, 1)
    log phi_g  ~ Normal(phi_log_mean, phi_log_sd),  phi_log_mean ~ Normal(0, 2),  phi_log_sd ~ HalfNormal(1)

``s_i`` is the library size (total counts of the cell over all genes), an observed offset.
The dispersion prior is a hierarchical log-normal rather than HalfCauchy(2): low-count genes
barely identify their own ``phi``, and sharing a learnt centre across genes keeps them near
what the well-measured genes say instead of drifting into the Cauchy's tails; it is also an
unconstrained Normal for ADVI.

The log-likelihood is computed in a form that gives the same value as
``scipy.stats.nbinom.logpmf`` up to the data-only constant ``-sum_ig lgamma(y_ig + 1)``
(see :func:`nb_log_likelihood`), but much faster:

* per entry, with ``x = eta - log(phi)`` and ``eta = log mu``,
  ``log NB(y | mu, phi) = y * log sigmoid(x) - phi * softplus(x) + lgamma(y + phi) - lgamma(phi)
  - lgamma(y + 1)``; the first two terms cost two transcendentals (exp, log1p) per entry in
  float32, and regrouped this way the large ``y*eta`` and ``y*log(phi + mu)`` of highly expressed genes
  cancel inside each cell rather than through minibatch noise;
* ``lgamma(y + phi) - lgamma(phi)`` is 0 where ``y = 0`` (~90% of entries) and otherwise
  ``sum_{k<y} log(phi + k)``: summed over cells it becomes ``sum_k m_g(k) log(phi_g + k)`` with
  ``m_g(k)`` the number of cells with ``y_ig > k``; small ``k`` use this table and the few
  large counts keep one ``lgamma`` per distinct (gene, value) pair. It depends on the data only
  through these counts, so it is computed exactly over all cells, with no minibatch;
* ``lgamma(y + 1)`` depends only on the data: a constant, dropped;
* only ``y * log sigmoid(x) - phi * softplus(x)`` needs each cell's offset and covariates, and
  only it is estimated from the minibatch (dense 512 x n_genes, scaled by n_cells / 512).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.condition_effects.cell_model_data import (NBData, NBSufficientStatistics, SMALL_COUNT_TABLE_SIZE,
                                                 sufficient_statistics)


#: Names of the global (not per-gene) parameters, summarised in the asset metadata.
GLOBAL_PARAMETERS = ("mu0", "sigma0", "sigma1", "sigma_b", "gamma", "phi_log_mean", "phi_log_sd")


@dataclass
class NBFitConfig:
    """How to fit the model.

    Attributes
    ----------
    batch_size : int
        Cells per minibatch.
    max_steps : int
        Upper bound on ADVI steps.
    min_steps : int
        The stopping rule is not consulted before this many steps.
    learning_rate : float
        Adam learning rate on the variational means and log-scales.
    seed : int
        Seeds the minibatch indices, the Monte Carlo draws of ADVI and the posterior draws.
    convergence_window : int
        Steps per window of the smoothed ELBO; the fit stops when the latest window's mean
        gains less on the previous one than ``convergence_tolerance`` x |ELBO| or two standard
        errors of the minibatch noise (see ``nb_inference.windowed_elbo_converged``).
    convergence_tolerance : float
        Relative gain of the windowed ELBO mean that counts as converged.
    averaging_steps : int
        After stopping, this many further steps at a tenth of the learning rate whose
        variational parameters are averaged (Polyak averaging removes the minibatch jitter).
    n_posterior_draws : int
        Draws from the fitted approximation stored in the posterior.
    initial_sd : float
        Initial standard deviation of every variational factor (the means start from cheap
        per-gene estimates).
    device : str
        ``"cpu"`` or ``"gpu"``; both compile through PyMC's JAX backend, ``"gpu"`` places it on
        the first GPU JAX sees.
    """

    batch_size: int = 512
    max_steps: int = 15_000
    min_steps: int = 1_000
    learning_rate: float = 0.02
    seed: int = 0
    convergence_window: int = 250
    convergence_tolerance: float = 2e-5
    averaging_steps: int = 500
    n_posterior_draws: int = 400
    initial_sd: float = 0.1
    device: str = "cpu"


@dataclass
class NBPosterior:
    """A fitted posterior.

    Attributes
    ----------
    idata : arviz.InferenceData
        ``posterior`` group with draws of beta0, beta1, phi, log_phi, z, b (dims gene/study) and
        the global parameters; ``elbo`` group with the ELBO per step (dim ``step``). No data matrix.
    elbo_history : np.ndarray, shape (n_steps,)
        Minibatch ELBO estimate per step (nats, scaled to the full data).
    n_steps : int
    converged : bool
        Whether the windowed-ELBO rule fired before ``max_steps``.
    seconds : float
        Wall time of compilation plus optimisation.
    """

    idata: object
    elbo_history: np.ndarray
    n_steps: int
    converged: bool
    seconds: float
    config: NBFitConfig = field(default_factory=NBFitConfig)


def _exact_terms(stats: NBSufficientStatistics, log_phi):
    """``sum_ig [lgamma(y_ig + phi_g) - lgamma(phi_g)]`` over all cells, as a pytensor scalar.

    Depends on the data only through the small-count table and the tail pairs, so it is
    computed exactly over all cells rather than estimated from the minibatch.
    """
    import pytensor.tensor as pt

    floatx = "float32"
    phi = pt.exp(log_phi)
    offsets = pt.as_tensor(np.arange(SMALL_COUNT_TABLE_SIZE, dtype=floatx))[:, None]
    small = pt.sum(pt.as_tensor(stats.exceed_counts.astype(floatx)) * pt.log(phi[None, :] + offsets))
    if stats.tail_gene.size == 0:
        return small
    tail_phi = phi[pt.as_tensor(stats.tail_gene)]
    tail_value = pt.as_tensor(stats.tail_value.astype(floatx))
    tail = pt.sum(
        pt.as_tensor(stats.tail_multiplicity.astype(floatx))
        * (pt.gammaln(tail_value + tail_phi) - pt.gammaln(SMALL_COUNT_TABLE_SIZE + tail_phi))
    )
    return small + tail


def _per_cell_term(counts_batch, eta, log_phi):
    """Elementwise ``y log sigmoid(x) - phi softplus(x)`` with ``x = eta - log phi``.

    This is ``y*eta - y*log(phi) - (phi + y) * softplus(eta - log phi)`` regrouped: the
    large ``y*eta`` and ``y*log(phi + mu)`` of highly expressed genes cancel inside each
    cell instead of in minibatch noise.
    """
    import pytensor.tensor as pt

    log_ratio = eta - log_phi[None, :]
    # softplus as max(x, 0) + log1p(exp(-|x|)): two transcendentals, where pt.softplus's JAX
    # form evaluates four (every branch of its piecewise definition).
    softplus = pt.maximum(log_ratio, 0.0) + pt.log1p(pt.exp(-pt.abs(log_ratio)))
    return counts_batch * (log_ratio - softplus) - pt.exp(log_phi)[None, :] * softplus


def _count_storage(counts: sp.csr_matrix) -> np.ndarray:
    """Dense counts in the narrowest dtype that holds them (uint16 halves the memory of float32)."""
    dtype = np.uint16 if counts.nnz == 0 or counts.data.max() <= np.iinfo(np.uint16).max else np.float32
    return counts.astype(dtype).toarray()


def build_nb_model(data: NBData, batch_size: int = 512, likelihood: str = "fast"):
    """The PyMC model, with one ``pm.Minibatch`` slicing counts, offsets, condition and study together.

    Parameters
    ----------
    data : NBData
    batch_size : int
        Cells per minibatch; ``total_size`` is ``data.n_cells``.
    likelihood : {"fast", "dense"}
        ``"fast"``: the decomposition of the module docstring (float32). ``"dense"``: the
        straightforward ``pm.NegativeBinomial`` on the minibatch, for comparison (benchmark).
        The minibatch index generator is seeded when the step function is compiled.

    Returns
    -------
    pymc.Model
        Free variables mu0, sigma0, beta0_centred (= beta0 + beta1 * mean condition), sigma1,
        beta1, sigma_b, z, gamma, phi_log_mean, phi_log_sd, log_phi (static shapes, no mutable
        dims, so it compiles to JAX).
    """
    import pymc as pm
    import pytensor
    import pytensor.tensor as pt

    if likelihood not in ("fast", "dense"):
        raise ValueError(f"likelihood must be 'fast' or 'dense', got {likelihood!r}")
    floatx = pytensor.config.floatX
    n_genes, n_studies = data.n_genes, data.n_studies
    condition_mean = np.asarray(data.condition.mean(), dtype=floatx)
    batch_size = min(batch_size, data.n_cells)
    with pm.Model() as model:
        counts_shared = pytensor.shared(_count_storage(data.counts), name="counts")
        log_size_shared = pytensor.shared(data.log_library_size.astype(floatx), name="log_library_size")
        condition_shared = pytensor.shared(data.condition.astype(floatx), name="condition")
        study_shared = pytensor.shared(data.study_index.astype(np.int32), name="study_index")
        counts_batch, log_size_batch, condition_batch, study_batch = pm.Minibatch(
            counts_shared, log_size_shared, condition_shared, study_shared, batch_size=batch_size
        )

        mu0 = pm.Normal("mu0", -8.0, 4.0)
        sigma0 = pm.HalfNormal("sigma0", 3.0)
        sigma1 = pm.HalfNormal("sigma1", 1.0)
        beta1 = pm.Normal("beta1", 0.0, sigma1, shape=n_genes)
        # beta0 and beta1 are strongly anti-correlated a posteriori with 0/1 coding, which a mean
        # field cannot represent (it would understate beta1's sd); sampling the level at the mean
        # condition instead and deriving beta0 (unit Jacobian) is the same model without that.
        beta0_centred = pm.Flat("beta0_centred", shape=n_genes)
        beta0 = beta0_centred - beta1 * condition_mean
        pm.Potential("beta0_prior", pm.logp(pm.Normal.dist(mu0, sigma0), beta0).sum())
        sigma_b = pm.HalfNormal("sigma_b", 1.0)
        z = pm.Normal("z", 0.0, 1.0, shape=(n_studies, n_genes))
        gamma = pm.Normal("gamma", 0.0, 1.0)
        phi_log_mean = pm.Normal("phi_log_mean", 0.0, 2.0)
        phi_log_sd = pm.HalfNormal("phi_log_sd", 1.0)
        log_phi = pm.Normal("log_phi", phi_log_mean, phi_log_sd, shape=n_genes)

        log_length = pt.as_tensor(data.log_gene_length_kb.astype(floatx))
        if likelihood == "dense":
            eta = (
                log_size_batch[:, None] + beta0 + beta1 * condition_batch[:, None]
                + sigma_b * z[study_batch] + gamma * log_length
            )
            pm.NegativeBinomial(
                "counts_obs", mu=pt.exp(eta), alpha=pt.exp(log_phi), observed=counts_batch, total_size=data.n_cells
            )
            return model
        # Design matrix times coefficients: a small matmul whose gradient is a matmul too.
        onehot = pt.eq(study_batch[:, None], pt.arange(n_studies)[None, :]).astype(floatx)
        design_batch = pt.concatenate([pt.ones_like(condition_batch)[:, None], condition_batch[:, None], onehot], axis=1)
        coefficients = pt.concatenate([beta0[None, :], beta1[None, :], sigma_b * z], axis=0)
        eta = log_size_batch[:, None] + pt.dot(design_batch, coefficients) + gamma * log_length[None, :]
        pm.CustomDist(
            "counts_obs",
            eta,
            log_phi,
            logp=lambda value, eta_, log_phi_: _per_cell_term(value.astype(floatx), eta_, log_phi_),
            observed=counts_batch,
            total_size=data.n_cells,
            signature="(),()->()",
            dtype=counts_shared.dtype,
        )
        pm.Potential(
            "counts_exact_terms",
            _exact_terms(sufficient_statistics(data), log_phi),
        )
    return model


def nb_log_likelihood(data: NBData, beta0, beta1, study_effect, gamma, phi) -> float:
    """Full-data log-likelihood through the same terms the fast model uses (float32).

    Equals ``sum_ig scipy.stats.nbinom.logpmf(y_ig, phi_g, phi_g / (phi_g + mu_ig))`` plus the
    data-only ``sum_ig lgamma(y_ig + 1)`` (the dropped constant).

    Parameters
    ----------
    beta0, beta1 : array, shape (n_genes,)
    study_effect : array, shape (n_studies, n_genes)
        ``b_kg`` (already multiplied by sigma_b).
    gamma : float
    phi : array, shape (n_genes,)
    """
    import pytensor
    import pytensor.tensor as pt

    floatx = "float32"
    coefficients = pt.as_tensor(np.vstack([beta0, beta1, study_effect]).astype(floatx))
    log_phi = pt.as_tensor(np.log(np.asarray(phi, dtype=np.float64)).astype(floatx))
    log_length = pt.as_tensor(data.log_gene_length_kb.astype(floatx))
    gamma_tensor = pt.as_tensor(np.float32(gamma))
    eta = pt.as_tensor(data.log_library_size)[:, None] + pt.dot(pt.as_tensor(data.design()), coefficients)
    eta = eta + gamma_tensor * log_length[None, :]
    counts = pt.as_tensor(data.counts.toarray().astype(floatx))
    total = pt.sum(_per_cell_term(counts, eta, log_phi))
    total = total + _exact_terms(sufficient_statistics(data), log_phi)
    return float(pytensor.function([], total, mode="FAST_COMPILE")())
