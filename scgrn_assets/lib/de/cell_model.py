"""The hierarchical Negative-Binomial model of condition effects, and what we read off it.

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

import io
import os
from pathlib import Path
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.corpus.build import measured_column
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.storage import atomic_path

#: Counts below this use the exact ``sum_k m_g(k) log(phi + k)`` table; larger ones use lgamma.
SMALL_COUNT_TABLE_SIZE = 16

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
class NBData:
    """The fit's inputs, checked and reduced to what the model needs.

    Built by :func:`prepare_nb_data`. Only cells with a known condition are kept.

    Attributes
    ----------
    counts : scipy.sparse.csr_matrix, shape (n_cells, n_genes)
        Integer counts, float32.
    log_library_size : np.ndarray, shape (n_cells,)
        ``log s_i``, float32.
    condition : np.ndarray, shape (n_cells,)
        0 (control) or 1 (condition), float32.
    study_index : np.ndarray, shape (n_cells,)
        Index into ``study_names``, int32.
    log_gene_length_kb : np.ndarray, shape (n_genes,)
        ``log(L_g / 1000 bp)``, float32.
    study_names, gene_names : list of str
    """

    counts: sp.csr_matrix
    log_library_size: np.ndarray
    condition: np.ndarray
    study_index: np.ndarray
    log_gene_length_kb: np.ndarray
    study_names: list[str]
    gene_names: list[str]

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def n_studies(self) -> int:
        return len(self.study_names)

    def design(self) -> np.ndarray:
        """Per-cell design rows ``[1, c_i, onehot(study_i)]``, shape (n_cells, 2 + n_studies), float32."""
        onehot = np.zeros((self.n_cells, self.n_studies), dtype=np.float32)
        onehot[np.arange(self.n_cells), self.study_index] = 1.0
        return np.column_stack([np.ones(self.n_cells, np.float32), self.condition, onehot]).astype(np.float32)


@dataclass
class NBSufficientStatistics:
    """Data-only summaries that make the exact parts of the log-likelihood cheap.

    Attributes
    ----------
    exceed_counts : np.ndarray, shape (SMALL_COUNT_TABLE_SIZE, n_genes)
        ``m_g(k)``: number of cells with ``y_ig > k``.
    tail_gene, tail_value, tail_multiplicity : np.ndarray, shape (n_tail,)
        Distinct (gene, count) pairs with count > SMALL_COUNT_TABLE_SIZE and how many cells have them.
    """

    exceed_counts: np.ndarray
    tail_gene: np.ndarray
    tail_value: np.ndarray
    tail_multiplicity: np.ndarray


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


def select_model_genes(adata, n_top_genes: int = 3000, batch_key: str = "study") -> np.ndarray:
    """Indices (into ``adata.var``) of the highly variable genes the model is fitted on.

    Uses ``scanpy.pp.highly_variable_genes(flavor="seurat_v3")`` on raw counts with the study as
    batch, on a copy, so ``adata`` is not modified.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes, raw counts in ``X``.
    n_top_genes : int
        Clamped to the number of genes.
    batch_key : str
        ``obs`` column with the study.

    Returns
    -------
    np.ndarray of int, shape (min(n_top_genes, n_genes),)
        Sorted var indices.
    """
    import scanpy as sc

    n_genes = adata.n_vars
    n_keep = min(int(n_top_genes), n_genes)
    if n_keep == n_genes:
        return np.arange(n_genes)
    working = adata.copy()
    # seurat_v3 fits a loess per batch; a batch with one cell or a constant gene would break it.
    batch = batch_key if batch_key in working.obs and working.obs[batch_key].nunique() > 1 else None
    sc.pp.highly_variable_genes(working, flavor="seurat_v3", n_top_genes=n_keep, batch_key=batch, subset=False)
    return np.sort(np.flatnonzero(working.var["highly_variable"].to_numpy()))


@dataclass(frozen=True)
class ModelInputs:
    """The cells and genes the NB model is fitted on, with its covariates.

    ``adata`` holds the cells with a known condition and the selected genes; ``condition`` is 1.0
    for the second condition level (e.g. AD) and 0.0 for the first; ``study_index`` indexes
    ``studies`` (sorted names).
    """

    adata: object
    condition: np.ndarray
    study_index: np.ndarray
    studies: list[str]


def select_model_inputs(corpus, *, n_top_genes: int, levels: tuple[str, str]) -> ModelInputs:
    """Cells with a known condition, genes measured in every study those cells come from, then the
    top highly variable genes among them.

    A gene a study did not measure is zero-padded in the corpus (``var["measured_in_<study>"]`` is
    False there): fitting those zeros as observations would push that study's effect down, so such
    genes are left out rather than imputed.
    """
    condition_labels = corpus.obs["condition"]
    known = condition_labels.notna().to_numpy()
    if known.sum() == 0 or condition_labels[known].nunique() < 2:
        raise ScgrnInputError("the corpus has no cells of both condition levels", file="combined_corpus",
                              fix="check the catalog's condition rules")
    studies = sorted(corpus.obs.loc[known, "study"].astype(str).unique())
    measured_everywhere = np.all([corpus.var[measured_column(s)].to_numpy() for s in studies], axis=0)
    subset = corpus[known][:, measured_everywhere]
    subset = subset[:, select_model_genes(subset, n_top_genes=n_top_genes, batch_key="study")]
    condition = (subset.obs["condition"].astype(str) == levels[1]).to_numpy(dtype=float)
    study_index = np.searchsorted(studies, subset.obs["study"].astype(str).to_numpy())
    return ModelInputs(adata=subset, condition=condition, study_index=study_index, studies=studies)


def prepare_nb_data(
    counts,
    library_size,
    condition,
    study_index,
    gene_length_bp,
    study_names,
    gene_names,
    study_label: str | None = None,
) -> NBData:
    """Check the inputs and keep the cells with a known condition.

    Parameters
    ----------
    counts : scipy.sparse matrix or np.ndarray, shape (n_cells, n_genes)
        Non-negative integer counts (any numeric dtype).
    library_size : array, shape (n_cells,)
        Total counts of each cell over all genes (not just the modelled ones).
    condition : array, shape (n_cells,)
        1 for the condition (e.g. AD), 0 for control, NaN (or negative) for unknown; unknown cells are dropped.
    study_index : array of int, shape (n_cells,)
        Index into ``study_names``.
    gene_length_bp : array, shape (n_genes,)
        Gene lengths in bp; missing (NaN) lengths are filled with the median of the known ones
        (1 kb for all when none is known).
    study_names, gene_names : sequence of str
    study_label : str, optional
        Names the data in error messages (e.g. ``"combined_corpus"``).
    """
    where = study_label or "combined_corpus"
    counts = sp.csr_matrix(counts, dtype=np.float32)
    n_cells, n_genes = counts.shape
    library_size = np.asarray(library_size, dtype=np.float64)
    condition = np.asarray(condition, dtype=np.float64)
    study_index = np.asarray(study_index)
    gene_length_bp = np.asarray(gene_length_bp, dtype=np.float64)
    for name, array, size in (
        ("library_size", library_size, n_cells),
        ("condition", condition, n_cells),
        ("study_index", study_index, n_cells),
        ("gene_length_bp", gene_length_bp, n_genes),
    ):
        if array.shape != (size,):
            raise ScgrnInputError(
                f"{name} has shape {array.shape}, expected ({size},) to match counts {counts.shape}",
                study=where,
                fix="pass one value per cell (per gene for gene_length_bp)",
            )
    if len(gene_names) != n_genes:
        raise ScgrnInputError(f"{len(gene_names)} gene names for {n_genes} genes", study=where, fix="pass var names of the selected genes")
    if counts.nnz and (counts.data.min() < 0 or not np.all(counts.data == np.round(counts.data))):
        raise ScgrnInputError("counts contain negative or non-integer values", study=where, fix="fit raw UMI counts, not normalised values")
    known = np.isfinite(condition) & (condition >= 0)
    if not np.isin(condition[known], (0.0, 1.0)).all():
        raise ScgrnInputError("condition must be 0, 1 or unknown (NaN)", study=where, fix="map labels to 1 = condition, 0 = control")
    if known.sum() == 0 or len(np.unique(condition[known])) < 2:
        raise ScgrnInputError("need cells of both conditions to estimate a condition effect", study=where, fix="check the catalog's condition rule")
    if np.any(library_size[known] <= 0) or not np.all(np.isfinite(library_size[known])):
        raise ScgrnInputError("library sizes must be positive", study=where, fix="drop empty cells in QC before the fit")
    if np.any(study_index[known] < 0) or np.any(study_index[known] >= len(study_names)):
        raise ScgrnInputError("study_index out of range of study_names", study=where, fix="encode studies as 0..n_studies-1")
    known_length = np.isfinite(gene_length_bp) & (gene_length_bp > 0)
    # Gene length is optional (real catalogs often have no annotation): with none known every gene
    # gets 1 kb, the length term is constant and gamma is left to its prior.
    fill = np.median(gene_length_bp[known_length]) if known_length.any() else 1000.0
    gene_length_bp = np.where(known_length, gene_length_bp, fill)
    return NBData(
        counts=counts[known],
        log_library_size=np.log(library_size[known]).astype(np.float32),
        condition=condition[known].astype(np.float32),
        study_index=study_index[known].astype(np.int32),
        log_gene_length_kb=np.log(gene_length_bp / 1000.0).astype(np.float32),
        study_names=[str(name) for name in study_names],
        gene_names=[str(name) for name in gene_names],
    )


def sufficient_statistics(data: NBData) -> NBSufficientStatistics:
    """The data-only summaries of :class:`NBSufficientStatistics`, one pass over the sparse counts."""
    coo = data.counts.tocoo()
    values = coo.data.astype(np.int64)
    genes = coo.col.astype(np.int64)
    # m_g(k) = #cells with y > k: histogram of min(y, T) per gene, then a reversed cumulative sum.
    clipped = np.minimum(values, SMALL_COUNT_TABLE_SIZE)
    histogram = np.zeros((SMALL_COUNT_TABLE_SIZE + 1, data.n_genes), dtype=np.int64)
    np.add.at(histogram, (clipped, genes), 1)
    exceed_counts = np.cumsum(histogram[::-1], axis=0)[::-1][1:]
    is_tail = values > SMALL_COUNT_TABLE_SIZE
    pair_key = genes[is_tail] * (values.max(initial=0) + 1) + values[is_tail]
    unique_keys, multiplicity = np.unique(pair_key, return_counts=True)
    return NBSufficientStatistics(
        exceed_counts=exceed_counts.astype(np.float64),
        tail_gene=(unique_keys // (values.max(initial=0) + 1)).astype(np.int32),
        tail_value=(unique_keys % (values.max(initial=0) + 1)).astype(np.float64),
        tail_multiplicity=multiplicity.astype(np.float64),
    )


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


def _stacked_draws(idata, name: str) -> np.ndarray:
    """Posterior draws of one variable with chain and draw merged (one implementation, in pseudobulk_model)."""
    from scgrn_assets.lib.de.model import stacked_draws

    return stacked_draws(idata, name)


def highest_density_interval(draws: np.ndarray, probability: float = 0.94) -> tuple[np.ndarray, np.ndarray]:
    """Narrowest interval holding ``probability`` of the draws, per column (:func:`arviz.hdi`).

    Parameters
    ----------
    draws : np.ndarray, shape (n_draws, n_columns)

    Returns
    -------
    low, high : np.ndarray, shape (n_columns,)
    """
    from scgrn_assets.lib.quiet_imports import import_arviz

    draws = np.asarray(draws)
    bounds = import_arviz().hdi(draws[np.newaxis], hdi_prob=probability)  # (1 chain, draws, columns) -> (columns, 2)
    bounds = bounds.astype(draws.dtype, copy=False)  # the bounds are draws: keep their dtype
    return bounds[:, 0], bounds[:, 1]


def condition_effect_table(idata, gene_names=None) -> pd.DataFrame:
    """One row per gene: what the posterior says about the condition effect beta1.

    Parameters
    ----------
    idata : arviz.InferenceData
        From :func:`scgrn_assets.lib.de.cell_model_inference.fit_nb_posterior`.
    gene_names : sequence of str, optional
        Defaults to the posterior's ``gene`` coordinate.

    Returns
    -------
    pd.DataFrame
        Columns: gene; beta1_mean, beta1_sd (log fold change, natural log); beta1_low_94,
        beta1_high_94 (94% highest-density interval); prob_positive = P(beta1 > 0);
        lfsr = min(P(beta1 >= 0), P(beta1 <= 0)), the local false sign rate; beta0_mean;
        phi_mean (inverse dispersion).
    """
    beta1 = _stacked_draws(idata, "beta1")
    if gene_names is None:
        gene_names = [str(name) for name in idata.posterior["gene"].values]
    low, high = highest_density_interval(beta1, 0.94)
    return pd.DataFrame(
        {
            "gene": list(gene_names),
            "beta1_mean": beta1.mean(axis=0),
            "beta1_sd": beta1.std(axis=0, ddof=1),
            "beta1_low_94": low,
            "beta1_high_94": high,
            "prob_positive": (beta1 > 0).mean(axis=0),
            "lfsr": np.minimum((beta1 >= 0).mean(axis=0), (beta1 <= 0).mean(axis=0)),
            "beta0_mean": _stacked_draws(idata, "beta0").mean(axis=0),
            "phi_mean": _stacked_draws(idata, "phi").mean(axis=0),
        }
    )


def global_parameter_summary(idata) -> pd.DataFrame:
    """ArviZ summary (mean, sd, 94% HDI) of the global parameters, one row each."""
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()

    present = [name for name in GLOBAL_PARAMETERS if name in idata.posterior]
    return az.summary(idata, var_names=present, kind="stats")


def posterior_predictive_check(
    idata,
    counts,
    library_size,
    condition,
    study_index,
    gene_length_bp,
    n_cells: int = 2000,
    n_draws: int = 50,
    seed: int = 0,
) -> pd.DataFrame:
    """Observed vs replicated zero fraction, mean and variance per gene.

    Replicates counts from ``n_draws`` posterior draws for a random subsample of ``n_cells``
    cells (their own library sizes, conditions and studies) and compares with the observed
    counts of the same cells. Cells with unknown condition are excluded, as in the fit.

    Parameters
    ----------
    idata : arviz.InferenceData
    counts, library_size, condition, study_index, gene_length_bp
        As passed to ``fit_nb_posterior`` (the modelled genes only).
    n_cells, n_draws : int
    seed : int

    Returns
    -------
    pd.DataFrame
        One row per gene: gene, observed_zero_fraction, replicated_zero_fraction (mean over
        draws), replicated_zero_fraction_low_94 / _high_94 (3% and 97% quantiles over draws),
        observed_mean, replicated_mean, observed_variance, replicated_variance (counts per cell).
    """
    gene_names = [str(name) for name in idata.posterior["gene"].values]
    study_names = [str(name) for name in idata.posterior["study"].values]
    data = prepare_nb_data(counts, library_size, condition, study_index, gene_length_bp, study_names, gene_names)
    generator = np.random.default_rng(seed)
    cells = np.sort(generator.choice(data.n_cells, size=min(n_cells, data.n_cells), replace=False))
    observed = data.counts[cells].toarray().astype(np.float64)
    beta0, beta1 = _stacked_draws(idata, "beta0"), _stacked_draws(idata, "beta1")
    study_effect, phi = _stacked_draws(idata, "b"), _stacked_draws(idata, "phi")
    gamma = _stacked_draws(idata, "gamma")
    chosen_draws = generator.choice(beta0.shape[0], size=min(n_draws, beta0.shape[0]), replace=False)
    log_size = data.log_library_size[cells].astype(np.float64)[:, None]
    cell_condition = data.condition[cells].astype(np.float64)[:, None]
    cell_study = data.study_index[cells]
    log_length = data.log_gene_length_kb.astype(np.float64)
    zero_fraction, mean, variance = [], [], []
    for draw in chosen_draws:
        eta = log_size + beta0[draw] + beta1[draw] * cell_condition + study_effect[draw][cell_study] + gamma[draw] * log_length
        mu = np.exp(eta)
        replicated = generator.negative_binomial(phi[draw], phi[draw] / (phi[draw] + mu))
        zero_fraction.append((replicated == 0).mean(axis=0))
        mean.append(replicated.mean(axis=0))
        variance.append(replicated.var(axis=0))
    zero_fraction = np.asarray(zero_fraction)
    return pd.DataFrame(
        {
            "gene": gene_names,
            "observed_zero_fraction": (observed == 0).mean(axis=0),
            "replicated_zero_fraction": zero_fraction.mean(axis=0),
            "replicated_zero_fraction_low_94": np.quantile(zero_fraction, 0.03, axis=0),
            "replicated_zero_fraction_high_94": np.quantile(zero_fraction, 0.97, axis=0),
            "observed_mean": observed.mean(axis=0),
            "replicated_mean": np.mean(mean, axis=0),
            "observed_variance": observed.var(axis=0),
            "replicated_variance": np.mean(variance, axis=0),
        }
    )


def ppc_misfit_summary(
    ppc_table: pd.DataFrame,
    max_fraction_outside_zero_band: float = 0.3,
    max_median_abs_log_variance_ratio: float = 0.4,
) -> dict:
    """Numbers an asset check can threshold, and whether they pass.

    Parameters
    ----------
    ppc_table : pd.DataFrame
        From :func:`posterior_predictive_check`.
    max_fraction_outside_zero_band : float
        Largest tolerated share of genes whose observed zero fraction lies outside the
        replicated 94% band (a calibrated model leaves ~6% plus approximation slack out).
    max_median_abs_log_variance_ratio : float
        Largest tolerated median over expressed genes of ``|log(observed var / replicated var)|``.

    Returns
    -------
    dict
        median_abs_zero_fraction_error, fraction_outside_zero_band, median_abs_log_variance_ratio,
        n_genes, passed (bool).
    """
    outside = (ppc_table["observed_zero_fraction"] < ppc_table["replicated_zero_fraction_low_94"]) | (
        ppc_table["observed_zero_fraction"] > ppc_table["replicated_zero_fraction_high_94"]
    )
    # Genes with (almost) no counts have no variance to compare.
    expressed = (ppc_table["observed_variance"] > 0) & (ppc_table["replicated_variance"] > 0)
    log_variance_ratio = np.log(
        ppc_table.loc[expressed, "observed_variance"] / ppc_table.loc[expressed, "replicated_variance"]
    )
    median_abs_log_variance_ratio = float(np.median(np.abs(log_variance_ratio))) if expressed.any() else 0.0
    fraction_outside = float(outside.mean())
    return {
        "median_abs_zero_fraction_error": float(
            np.median(np.abs(ppc_table["observed_zero_fraction"] - ppc_table["replicated_zero_fraction"]))
        ),
        "fraction_outside_zero_band": fraction_outside,
        "median_abs_log_variance_ratio": median_abs_log_variance_ratio,
        "n_genes": int(len(ppc_table)),
        "passed": bool(
            fraction_outside <= max_fraction_outside_zero_band
            and median_abs_log_variance_ratio <= max_median_abs_log_variance_ratio
        ),
    }


def _figure_png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _new_figure(n_panels: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n_panels, figsize=(5.0 * n_panels, 4.0), squeeze=False)


def plot_elbo(elbo_history: np.ndarray) -> bytes:
    """PNG of the ELBO per step with a running mean (minibatch estimates are noisy)."""
    figure, axes = _new_figure()
    axis = axes[0, 0]
    history = np.asarray(elbo_history, dtype=np.float64)
    steps = np.arange(1, len(history) + 1)
    axis.plot(steps, history, lw=0.5, alpha=0.4, label="per step")
    window = max(1, len(history) // 50)
    if len(history) >= window:
        running = np.convolve(history, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], running, lw=1.5, label=f"mean of {window} steps")
    axis.set_xlabel("ADVI step")
    axis.set_ylabel("ELBO (nats)")
    axis.set_yscale("symlog")
    axis.legend()
    return _figure_png(figure)


def plot_volcano(effect_table: pd.DataFrame, lfsr_threshold: float = 0.05) -> bytes:
    """PNG: posterior mean log fold change vs -log10 lfsr, called genes highlighted."""
    figure, axes = _new_figure()
    axis = axes[0, 0]
    n_draws_floor = 1e-4  # lfsr of 0 from finite draws; plotted at this floor
    height = -np.log10(np.maximum(effect_table["lfsr"].to_numpy(), n_draws_floor))
    called = effect_table["lfsr"].to_numpy() < lfsr_threshold
    axis.scatter(effect_table["beta1_mean"][~called], height[~called], s=4, c="grey", label="not called")
    axis.scatter(effect_table["beta1_mean"][called], height[called], s=6, c="crimson", label=f"lfsr < {lfsr_threshold}")
    axis.axhline(-np.log10(lfsr_threshold), ls="--", c="k", lw=0.8)
    axis.set_xlabel("beta1 posterior mean (log fold change, condition vs control)")
    axis.set_ylabel("-log10 local false sign rate")
    axis.legend()
    return _figure_png(figure)


def plot_ppc(ppc_table: pd.DataFrame) -> bytes:
    """PNG: observed vs replicated zero fraction (with 94% band) and the mean-variance relation."""
    figure, axes = _new_figure(2)
    zero_axis, variance_axis = axes[0]
    replicated = ppc_table["replicated_zero_fraction"]
    zero_axis.errorbar(
        ppc_table["observed_zero_fraction"],
        replicated,
        # A replicated mean outside its own band would give a negative bar, which matplotlib refuses.
        yerr=[np.clip(replicated - ppc_table["replicated_zero_fraction_low_94"], 0, None),
              np.clip(ppc_table["replicated_zero_fraction_high_94"] - replicated, 0, None)],
        fmt="o",
        ms=2,
        lw=0.5,
        alpha=0.6,
    )
    zero_axis.plot([0, 1], [0, 1], "k--", lw=0.8)
    zero_axis.set_xlabel("observed zero fraction")
    zero_axis.set_ylabel("replicated zero fraction (94% band)")
    expressed = ppc_table["observed_mean"] > 0
    variance_axis.loglog(ppc_table["observed_mean"][expressed], ppc_table["observed_variance"][expressed], ".", ms=3, label="observed")
    variance_axis.loglog(ppc_table["replicated_mean"][expressed], ppc_table["replicated_variance"][expressed], ".", ms=3, label="replicated")
    variance_axis.set_xlabel("mean count per cell")
    variance_axis.set_ylabel("variance")
    variance_axis.legend()
    return _figure_png(figure)


def save_posterior(posterior: NBPosterior, path) -> None:
    """Write the posterior (draws and ELBO group, no data matrix) as netCDF, atomically.

    Written under a temporary name in the same folder and renamed into place, so a crash never
    leaves a half-written file that looks complete. ``arviz.from_netcdf(path)`` reads it back.
    """
    # netCDF attributes hold no booleans, hence the int.
    posterior.idata.posterior.attrs.update(
        n_steps=int(posterior.n_steps), converged=int(posterior.converged), seconds=float(posterior.seconds)
    )
    with atomic_path(Path(path)) as temporary:
        posterior.idata.to_netcdf(str(temporary))


def load_posterior(path) -> NBPosterior:
    """Read a posterior written by :func:`save_posterior`."""
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()

    idata = az.from_netcdf(os.fspath(path))
    attrs = idata.posterior.attrs
    return NBPosterior(
        idata=idata,
        elbo_history=np.asarray(idata["elbo"]["elbo"].values),
        n_steps=int(attrs.get("n_steps", 0)),
        converged=bool(attrs.get("converged", 0)),
        seconds=float(attrs.get("seconds", float("nan"))),
    )
