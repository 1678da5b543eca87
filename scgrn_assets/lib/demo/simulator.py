"""The demo simulator: a known gene regulatory network and the single-cell counts it drives.

The offline demo needs data whose truth is known, so later stages can be scored against it.
:func:`simulate_truth` draws the truth (genes, network, condition and study effects, samples);
:func:`simulate_sample_counts` draws one sample's counts from it, lazily and in any order,
so a corpus of any size is generated one sample at a time (writing files is
:mod:`scgrn_assets.lib.demo.geo_layouts`'s job).

The counts follow the model the Negative-Binomial stage fits, plus a cell-state term::

    Y_ig ~ NegBinomial(mean mu_ig, inverse dispersion phi_g)
    log mu_ig = log s_i + beta0_g + beta1_g * c_i + b_{study(i), g} + u_{animal(i), g}
                + gamma * log(L_g / 1000) + grn_ig

- ``s_i``: the cell's library size (``library_size_target``); ``exp(beta0_g + gamma *
  log(L_g / 1000))`` sums to exactly 1 over all genes, so a cell's total count is close to
  ``s_i`` (a study that measures fewer genes drops background genes other than the few
  dominant ones, so it loses only a few percent of it);
- ``c_i``: 1 for cells of AD samples, 0 for control samples and for every cell of a study
  without an AD/control contrast (a wild-type atlas);
- ``u_ag``: the animal's own deviation (``DemoConfig.animal_effect_sd``, default 0.25): one
  sample is one animal, and its cells share this draw, so cells are not independent replicates;
- ``gamma``: one global gene-length effect (:data:`GENE_LENGTH_EFFECT`), the same for UMI and
  plate-read studies;
- ``grn_ig``: the gene regulatory network's footprint, zero for genes outside the network.
  Master TFs follow the cell's latent state plus noise, secondary TFs follow master TFs,
  targets follow TFs: ``grn_target = sum_tf sign * weight * grn_tf + noise``. It is centred
  over the cells of each sample, so ``beta0``/``beta1`` stay each gene's true mean and effect
  on the log scale.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse

from scgrn_assets.lib.demo._kernels import _negative_binomial_bursts
from scgrn_assets.lib.demo.design import (DEFAULT_STUDIES, DemoConfig, DemoTruth, GENE_LENGTH_EFFECT, LIBRARY_TYPES,
                                          PLATE_COLUMNS, PLATE_ROWS, StudyDesign, WELLS_PER_PLATE)
from scgrn_assets.lib.demo.draws import (_LIBRARY_SIZE_SPREAD, _N_DOMINANT_GENES, _cell_table, _draw_condition_effects,
                                         _draw_ensembl_ids, _draw_gene_lengths, _draw_gene_symbols,
                                         _draw_log_proportions, _draw_network, _draw_samples, _draw_string_scores,
                                         _sample_row, _stream)
from scgrn_assets.lib.errors import ScgrnInputError

_SAMPLER_BIN_CELLS = 256
_DENSE_BURST_RATE = 2.0  # bursts per median-sized cell above which a gene is drawn cell by cell


# --------------------------------------------------------------------------- truth


def simulate_truth(config: DemoConfig) -> DemoTruth:
    """Draw the demo's truth: genes, network, effects and samples (no counts).

    Parameters
    ----------
    config
        Sizes and seed. Each part draws from its own random stream derived from
        ``config.seed``, so the result is identical for equal configs.

    Returns
    -------
    DemoTruth
        See its attributes. Takes about a second at 30,000 genes.
    """
    n_genes, n_network, n_tfs = config.n_genes, config.n_network_genes, config.n_tfs
    gene_lengths = _draw_gene_lengths(_stream(config.seed, "gene_lengths"), n_genes)
    log_proportions, dominant = _draw_log_proportions(_stream(config.seed, "expression"), config)
    gamma = GENE_LENGTH_EFFECT
    beta0 = log_proportions - gamma * np.log(gene_lengths / 1000.0)
    beta1 = _draw_condition_effects(_stream(config.seed, "condition"), config, log_proportions, dominant)
    phi_rng = _stream(config.seed, "dispersion")
    phi = np.exp(phi_rng.normal(np.log(7.0), 0.4, n_genes))

    network = _draw_network(_stream(config.seed, "network"), config)
    symbols = _draw_gene_symbols(_stream(config.seed, "symbols"), n_genes, n_tfs)
    is_tf = np.arange(n_genes) < n_tfs
    tf_layer = np.full(n_genes, -1)
    tf_layer[:n_tfs] = network.tf_layer
    grn_sd = np.zeros(n_genes)
    grn_sd[:n_network] = network.grn_sd
    grn_noise_sd = np.zeros(n_genes)
    grn_noise_sd[:n_network] = network.noise_sd
    genes = pd.DataFrame(
        {
            "gene_symbol": symbols,
            "ensembl_id": _draw_ensembl_ids(_stream(config.seed, "ensembl"), n_genes),
            "gene_length_bp": gene_lengths.astype(np.int64),
            "is_tf": is_tf,
            "in_network": np.arange(n_genes) < n_network,
            "beta0": beta0,
            "beta1": beta1,
            "phi": phi,
            "tf_layer": tf_layer,
            "grn_sd": grn_sd,
            "grn_noise_sd": grn_noise_sd,
        }
    )
    tf_index, target_index = np.nonzero(network.coefficients)
    coefficients = network.coefficients[tf_index, target_index]
    edges = pd.DataFrame(
        {
            "tf": symbols[tf_index],
            "target": symbols[target_index],
            "sign": np.sign(coefficients).astype(np.int64),
            "weight": np.abs(coefficients),
            "string_score": _draw_string_scores(_stream(config.seed, "string"), np.abs(coefficients)),
        }
    )
    study_rng = _stream(config.seed, "study_effects")
    study_effects = study_rng.normal(0.0, 0.25, size=(len(config.studies), n_genes))
    samples = _draw_samples(config)
    return DemoTruth(
        config=config,
        genes=genes,
        edges=edges,
        samples=samples,
        study_effects=study_effects,
        gamma=gamma,
        state_programs=network.state_programs,
        state_probabilities=network.state_probabilities,
    )


def measured_gene_indices(truth: DemoTruth, study: str) -> np.ndarray:
    """Sorted indices into ``truth.genes`` of the genes study ``study`` measures.

    Network and condition genes are measured in every study; a study with ``gene_fraction <
    1`` drops a random set of the other background genes, never the few dominant ones that
    carry most of each library, so its totals stay close to the library sizes.
    """
    design = truth.config.study(study)
    n_genes = truth.config.n_genes
    n_dropped = n_genes - round(design.gene_fraction * n_genes)
    if n_dropped <= 0:
        return np.arange(n_genes)
    genes = truth.genes
    expression = genes["beta0"].to_numpy() + truth.gamma * np.log(genes["gene_length_bp"].to_numpy() / 1000.0)
    droppable = np.flatnonzero(~genes["in_network"].to_numpy() & (genes["beta1"].to_numpy() == 0.0))
    # Keep the dominant genes, which carry most of every library, so totals stay near s_i.
    droppable = droppable[np.argsort(-expression[droppable], kind="stable")][_N_DOMINANT_GENES:]
    if n_dropped > droppable.size:
        raise ScgrnInputError(
            f"gene_fraction {design.gene_fraction} drops {n_dropped} genes but only {droppable.size} "
            "background genes without a condition effect can be dropped",
            study=study,
            fix="raise gene_fraction or n_genes",
        )
    rng = _stream(truth.config.seed, study, "measured_genes")
    dropped = rng.choice(droppable, size=n_dropped, replace=False)
    return np.setdiff1d(np.arange(n_genes), dropped)


# --------------------------------------------------------------------------- counts


def simulate_sample_counts(
    truth: DemoTruth, study: str, sample: str
) -> tuple[scipy.sparse.csr_matrix, pd.DataFrame, np.ndarray]:
    """Draw one sample's counts from the truth.

    The sample's random stream is seeded from ``(config.seed, study, sample)``, so samples
    can be drawn lazily, one at a time and in any order, with identical results. Memory is
    bounded by the sample's non-zero counts (never a dense cells x genes matrix).

    Parameters
    ----------
    truth
        From :func:`simulate_truth`.
    study, sample
        A study accession and one of its samples' GSM accessions (``truth.samples``).

    Returns
    -------
    counts
        (n_cells, n_measured_genes) int32 CSR matrix of UMI counts or reads.
    cells
        One row per cell: ``barcode`` (16-letter ACGT for UMI studies, unique within the
        study; the well id such as ``"B13"`` for the plate study), ``cell_state`` (int,
        the latent state), ``library_size_target`` (``s_i``, counts), plus ``well_id`` and
        ``plate_id`` (the sample's 1-based index in its study) for the plate study.
    measured_genes
        (n_measured_genes,) sorted indices into ``truth.genes`` of the columns.
    """
    design = truth.config.study(study)
    sample_row = _sample_row(truth, study, sample)
    n_cells = int(sample_row["n_cells"])
    rng = _stream(truth.config.seed, study, sample)
    cell_state = rng.choice(len(truth.state_probabilities), size=n_cells, p=truth.state_probabilities)
    library_size = float(sample_row["library_size_median"]) * np.exp(rng.normal(0.0, _LIBRARY_SIZE_SPREAD, n_cells))
    grn_term = cell_state_term(truth, cell_state, rng)

    measured_genes = measured_gene_indices(truth, study)
    genes = truth.genes
    study_index = [s.accession for s in truth.config.studies].index(study)
    is_ad = sample_row["condition"] == "AD"
    # Its own stream, so the animal effect leaves every other draw of the sample unchanged.
    animal_effect = _stream(truth.config.seed, study, sample, "animal").normal(
        0.0, truth.config.animal_effect_sd, len(genes))
    gene_log_mean = (
        genes["beta0"].to_numpy()
        + (genes["beta1"].to_numpy() if is_ad else 0.0)
        + truth.study_effects[study_index]
        + animal_effect
        + truth.gamma * np.log(genes["gene_length_bp"].to_numpy() / 1000.0)
    )
    phi = genes["phi"].to_numpy()
    n_network = truth.config.n_network_genes
    network_log_mean = np.log(library_size)[:, None] + gene_log_mean[None, :n_network] + grn_term
    network_phi = phi[:n_network]
    network_counts = rng.negative_binomial(network_phi, network_phi / (network_phi + np.exp(network_log_mean)))
    background = measured_genes[measured_genes >= n_network]
    background_counts = sample_negative_binomial_outer(
        rng, library_size, np.exp(gene_log_mean[background]), phi[background]
    )
    counts = scipy.sparse.hstack(
        [scipy.sparse.csr_matrix(network_counts.astype(np.int32)), background_counts], format="csr", dtype=np.int32
    )
    counts.indices = counts.indices.astype(np.int32)
    counts.indptr = counts.indptr.astype(np.int32)

    cells = _cell_table(rng, design, sample, n_cells, truth)
    cells["cell_state"] = cell_state
    cells["library_size_target"] = library_size
    return counts, cells, measured_genes


def cell_state_term(truth: DemoTruth, cell_state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The GRN cell-state term ``grn_ig`` of the given cells on the network genes.

    Parameters
    ----------
    truth
        From :func:`simulate_truth`.
    cell_state
        (n_cells,) latent state of each cell, ints in ``[0, n_cell_states)``.
    rng
        Random generator for the gene-own noise (consumed).

    Returns
    -------
    numpy.ndarray
        (n_cells, n_network_genes) term on the natural-log scale, centred over these cells;
        its population sd per gene is ``truth.genes["grn_sd"]``.
    """
    n_network, n_tfs = truth.config.n_network_genes, truth.config.n_tfs
    genes = truth.genes.iloc[:n_network]
    symbol_index = pd.Series(np.arange(n_network), index=genes["gene_symbol"].to_numpy())
    # Sparse, so small products skip BLAS threads (slow on busy shared machines).
    coefficients = scipy.sparse.csr_array(
        (
            truth.edges["sign"].to_numpy() * truth.edges["weight"].to_numpy(),
            (symbol_index[truth.edges["tf"]].to_numpy(), symbol_index[truth.edges["target"]].to_numpy()),
        ),
        shape=(n_tfs, n_network),
    )
    term = rng.normal(size=(cell_state.size, n_network)) * genes["grn_noise_sd"].to_numpy()
    term[:, :n_tfs] += truth.state_programs[cell_state]
    # Two passes: master TFs -> secondary TFs, then all TFs -> targets.
    tf_term = term[:, :n_tfs] + term[:, :n_tfs] @ coefficients[:, :n_tfs]
    term = term + tf_term @ coefficients
    term[:, :n_tfs] = tf_term
    return term - term.mean(axis=0)


def sample_negative_binomial_outer(
    rng: np.random.Generator,
    library_sizes: np.ndarray,
    gene_means: np.ndarray,
    inverse_dispersion: np.ndarray,
    bin_cells: int = _SAMPLER_BIN_CELLS,
) -> scipy.sparse.csr_matrix:
    """Sparse NB counts with rank-one means ``mu_ig = library_sizes[i] * gene_means[g]``.

    Work and memory scale with the number of non-zero counts, not cells x genes: each NB
    count is a Poisson number of "bursts" (rate ``phi * log(1 + mu / phi)``) with
    logarithmic(``mu / (mu + phi)``) sizes. Bursts are drawn per bin of similar-sized cells at
    the bin's largest rate and thinned to each cell's own rate (exact Poisson thinning).
    Genes with many bursts per cell are drawn cell by cell (gamma-Poisson) instead.

    Parameters
    ----------
    rng
        Random generator (consumed).
    library_sizes
        (n_cells,) positive per-cell size factors, counts.
    gene_means
        (n_genes,) non-negative mean per unit of library size.
    inverse_dispersion
        (n_genes,) positive NB inverse dispersion ``phi`` (variance ``mu + mu**2 / phi``).
    bin_cells
        Cells per bin; smaller bins give tighter bounds but more per-bin overhead.

    Returns
    -------
    scipy.sparse.csr_matrix
        (n_cells, n_genes) int32 counts.
    """
    library_sizes = np.asarray(library_sizes, dtype=np.float64)
    gene_means = np.asarray(gene_means, dtype=np.float64)
    phi = np.asarray(inverse_dispersion, dtype=np.float64)
    n_cells, n_genes = library_sizes.size, gene_means.size
    if n_cells == 0:
        return scipy.sparse.csr_matrix((0, n_genes), dtype=np.int32)
    cell_order = np.argsort(library_sizes, kind="stable")
    sorted_sizes = library_sizes[cell_order]
    bin_starts = np.arange(0, n_cells, bin_cells)
    bin_lengths = np.diff(np.r_[bin_starts, n_cells])
    largest_size = sorted_sizes[bin_starts + bin_lengths - 1]
    bound_rate = phi * np.log1p(largest_size[:, None] * gene_means[None, :] / phi)  # (n_bins, n_genes)
    dense_genes = np.flatnonzero(bound_rate[bound_rate.shape[0] // 2] > _DENSE_BURST_RATE)
    dense_means = sorted_sizes[:, None] * gene_means[dense_genes]
    dense_counts = rng.negative_binomial(phi[dense_genes], phi[dense_genes] / (phi[dense_genes] + dense_means))
    bound_rate[:, dense_genes] = 0.0
    n_bursts = rng.poisson(bin_lengths[:, None] * bound_rate)
    indptr, indices, data = _negative_binomial_bursts(
        rng, sorted_sizes, gene_means, phi, bin_starts, bound_rate, n_bursts, dense_genes, dense_counts.astype(np.int32)
    )
    counts_by_size = scipy.sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    rank = np.empty(n_cells, dtype=np.int64)
    rank[cell_order] = np.arange(n_cells)
    return counts_by_size[rank]


__all__ = ["simulate_truth", "measured_gene_indices", "simulate_sample_counts", "cell_state_term",
           "sample_negative_binomial_outer",
           # The configuration and truth types live in design.py; importable from here too.
           "DemoConfig", "DemoTruth", "StudyDesign", "DEFAULT_STUDIES", "GENE_LENGTH_EFFECT", "LIBRARY_TYPES",
           "PLATE_ROWS", "PLATE_COLUMNS", "WELLS_PER_PLATE"]
