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

import hashlib
import math
from dataclasses import dataclass, field

import numba
import numpy as np
import pandas as pd
import scipy.sparse

from scgrn_assets.lib.errors import ScgrnInputError

#: One global gene-length effect (log-mean change per unit log(length / 1 kb)), used for every
#: library type: the plate-read study would have a larger one in real data, which we ignore.
GENE_LENGTH_EFFECT = 0.3
LIBRARY_TYPES = ("umi", "plate_reads")
PLATE_ROWS = "ABCDEFGHIJKLMNOP"
PLATE_COLUMNS = 24
WELLS_PER_PLATE = len(PLATE_ROWS) * PLATE_COLUMNS

# Expression levels, as proportions of a cell's library (tuned for ~85-92% zeros in UMI
# studies at the default size while keeping network genes expressed enough to co-vary).
_N_DOMINANT_GENES = 8  # mitochondrial/ribosomal-like genes that take most of every library
_MIN_DOMINANT_SHARE = 0.15
_TF_PROPORTION = 9e-5
_TARGET_PROPORTION = 3.5e-5
_BACKGROUND_PROPORTION = 3.5e-5  # mean over the non-dominant background genes
_BACKGROUND_SPREAD = 3.0  # sd of log-proportions among them: most are rarely seen
# Cell-state term: shares of each gene's GRN variance.
_MASTER_STATE_SHARE = 0.7  # master TFs: latent cell state vs own noise
_SECONDARY_REGULATED_SHARE = 0.75  # secondary TFs: master TFs vs own noise
_TARGET_REGULATED_SHARE = (0.55, 0.9)  # targets: regulators vs own noise, drawn per gene
_MASTER_TF_FRACTION = 0.4
_POSITIVE_EDGE_PROBABILITY = 0.7
_OUT_DEGREE_ZIPF_EXPONENT = 1.2
_LIBRARY_SIZE_SPREAD = 0.35  # sd of log library size among the cells of a sample
_SAMPLE_DEPTH_SPREAD = 0.1  # sd of log median library size among the samples of a study
_SAMPLER_BIN_CELLS = 256
_DENSE_BURST_RATE = 2.0  # bursts per median-sized cell above which a gene is drawn cell by cell


@dataclass(frozen=True)
class StudyDesign:
    """One simulated study: its accession, library type and size.

    Attributes
    ----------
    accession
        GEO series accession, e.g. ``"GSE900001"``.
    library
        ``"umi"`` (10x / Drop-seq: 16-letter barcodes, ~2-5 k counts per cell) or
        ``"plate_reads"`` (one 384-well plate per sample, ~1e5-5e5 reads per cell).
    n_samples, cells_per_sample
        Samples in the study and cells in each.
    has_condition
        False for a study without an AD/control contrast (condition unknown).
    gene_fraction
        Fraction of all genes the study measures; network and condition genes are always
        measured, the dropped genes are among the least expressed background genes.
    extra_cells
        The first ``extra_cells`` samples get one more cell, so a config can hit an exact total.
    """

    accession: str
    library: str
    n_samples: int
    cells_per_sample: int
    has_condition: bool
    gene_fraction: float = 1.0
    extra_cells: int = 0

    @property
    def n_cells(self) -> int:
        """Cells in the whole study."""
        return self.n_samples * self.cells_per_sample + self.extra_cells

    def sample_n_cells(self, sample_index: int) -> int:
        """Cells in the sample at 0-based ``sample_index``."""
        return self.cells_per_sample + (1 if sample_index < self.extra_cells else 0)


DEFAULT_STUDIES: tuple[StudyDesign, ...] = (
    StudyDesign("GSE900001", "umi", n_samples=6, cells_per_sample=250, has_condition=True, gene_fraction=1.0),
    StudyDesign("GSE900002", "plate_reads", n_samples=6, cells_per_sample=250, has_condition=True, gene_fraction=0.9),
    StudyDesign("GSE900003", "umi", n_samples=6, cells_per_sample=250, has_condition=False, gene_fraction=0.95),
    StudyDesign("GSE900004", "umi", n_samples=6, cells_per_sample=250, has_condition=True, gene_fraction=0.85),
)


@dataclass(frozen=True)
class DemoConfig:
    """Size and seed of the simulated demo corpus.

    The first ``n_network_genes`` genes form the regulatory network, the first ``n_tfs`` of
    them are its transcription factors; the remaining genes are background genes.
    """

    seed: int = 7
    n_genes: int = 600
    n_network_genes: int = 300
    n_tfs: int = 30
    n_cell_states: int = 4
    condition_gene_fraction: float = 0.10
    studies: tuple[StudyDesign, ...] = DEFAULT_STUDIES
    #: sd of each animal's own gene-level deviation (natural log): animals of one strain differ,
    #: so the animal, not the cell, is the replicate of a condition.
    animal_effect_sd: float = 0.25

    def __post_init__(self) -> None:
        fix = "change the DemoConfig"
        if not 2 <= self.n_tfs < self.n_network_genes <= self.n_genes:
            raise ScgrnInputError(
                f"need 2 <= n_tfs ({self.n_tfs}) < n_network_genes ({self.n_network_genes}) "
                f"<= n_genes ({self.n_genes})",
                fix=fix,
            )
        if self.n_cell_states < 1:
            raise ScgrnInputError(f"n_cell_states must be >= 1, got {self.n_cell_states}", fix=fix)
        if not 0.0 <= self.condition_gene_fraction < 1.0:
            raise ScgrnInputError(
                f"condition_gene_fraction must be in [0, 1), got {self.condition_gene_fraction}", fix=fix
            )
        accessions = [study.accession for study in self.studies]
        if not accessions or len(set(accessions)) != len(accessions):
            raise ScgrnInputError(f"studies must be non-empty with unique accessions, got {accessions}", fix=fix)
        for study in self.studies:
            _validate_study(study)

    @property
    def n_cells(self) -> int:
        """Cells in the whole corpus."""
        return sum(study.n_cells for study in self.studies)

    def study(self, accession: str) -> StudyDesign:
        """The design of study ``accession``; raises :class:`ScgrnInputError` if unknown."""
        for study in self.studies:
            if study.accession == accession:
                return study
        known = ", ".join(study.accession for study in self.studies)
        raise ScgrnInputError("not a study of this demo config", study=accession, fix=f"use one of {known}")

    @classmethod
    def scaled(cls, n_cells: int, n_genes: int, seed: int = 7) -> "DemoConfig":
        """A config with exactly ``n_cells`` cells and ``n_genes`` genes in the default 4 studies.

        The plate study gets ~8% of the cells on plates of at most 376 cells; the three UMI
        studies share the rest in samples of at most ~10,000 cells. The network keeps its
        default size (300 genes, 30 TFs). Nothing is generated here.
        """
        if n_cells < 100 or n_genes < DemoConfig.n_network_genes:
            raise ScgrnInputError(
                f"scaled() needs n_cells >= 100 and n_genes >= {DemoConfig.n_network_genes}, "
                f"got {n_cells} cells x {n_genes} genes",
                fix="ask for a larger demo",
            )
        plate_default, umi_defaults = DEFAULT_STUDIES[1], [DEFAULT_STUDIES[i] for i in (0, 2, 3)]
        plate_cells_per_sample = 376  # a few empty wells per plate, as in real sorts
        n_plates = max(2, round(0.08 * n_cells / plate_cells_per_sample))  # >= 1 AD and 1 control plate
        plate_cells_per_sample = min(plate_cells_per_sample, n_cells // 10 // n_plates + 1)
        umi_cells = n_cells - n_plates * plate_cells_per_sample
        umi_samples = max(6, math.ceil(umi_cells / 3 / 10_000 / 2) * 2)  # even: AD and control reps
        cells_per_sample, remainder = divmod(umi_cells, 3 * umi_samples)
        umi_studies = []
        for study_index, default in enumerate(umi_defaults):
            extra_cells = min(umi_samples, max(0, remainder - study_index * umi_samples))
            umi_studies.append(
                StudyDesign(
                    default.accession,
                    "umi",
                    n_samples=umi_samples,
                    cells_per_sample=cells_per_sample,
                    has_condition=default.has_condition,
                    gene_fraction=default.gene_fraction,
                    extra_cells=extra_cells,
                )
            )
        plate_study = StudyDesign(
            plate_default.accession,
            "plate_reads",
            n_samples=n_plates,
            cells_per_sample=plate_cells_per_sample,
            has_condition=plate_default.has_condition,
            gene_fraction=plate_default.gene_fraction,
        )
        studies = (umi_studies[0], plate_study, umi_studies[1], umi_studies[2])
        return cls(seed=seed, n_genes=n_genes, studies=studies)


@dataclass
class DemoTruth:
    """Everything the simulator decided, against which later stages are scored.

    Attributes
    ----------
    config
        The config it was drawn from.
    genes
        One row per gene (index 0..n_genes-1): ``gene_symbol``, ``ensembl_id``,
        ``gene_length_bp`` (int), ``is_tf``, ``in_network``, ``beta0`` (baseline
        log-proportion), ``beta1`` (true condition effect AD vs control, natural log; 0 for
        most genes), ``phi`` (NB inverse dispersion), ``tf_layer`` (0 master TF, 1 secondary
        TF regulated by master TFs, -1 not a TF), ``grn_sd`` (sd of the cell-state term on the
        log scale, 0 outside the network) and ``grn_noise_sd`` (its gene-own part).
    edges
        The true network: ``tf``, ``target`` (gene symbols), ``sign`` (+1/-1), ``weight`` (>0:
        change of the target's log mean per unit change of the TF's), ``string_score``
        (int 150..999, higher for stronger edges; for writing a STRING-links file).
    samples
        ``study``, ``sample`` (GSM accession), ``sample_name`` (e.g. ``AD_rep1``),
        ``condition`` ("AD", "control" or None without a contrast), ``n_cells``,
        ``library_size_median`` (median library size of its cells, counts or reads).
    study_effects
        (n_studies, n_genes) per-study batch effects ``b_kg`` (natural log), rows in
        ``config.studies`` order.
    gamma
        The global gene-length effect.
    state_programs
        (n_cell_states, n_tfs) mean cell-state term of each TF in each latent cell state
        (non-zero for master TFs only).
    state_probabilities
        (n_cell_states,) probability of a cell being in each state.
    """

    config: DemoConfig
    genes: pd.DataFrame
    edges: pd.DataFrame
    samples: pd.DataFrame
    study_effects: np.ndarray
    gamma: float
    state_programs: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    state_probabilities: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))


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


@numba.njit(cache=True)
def _negative_binomial_bursts(
    rng, sorted_sizes, gene_means, phi, bin_starts, bound_rate, n_bursts, dense_genes, dense_counts
):  # pragma: no cover - jitted
    """CSR parts (indptr, indices, data) of the counts of cells sorted by library size.

    Places the drawn bursts (thinned to each cell's own rate) and the dense genes' counts.
    Only ``rng.random`` is used here, which keeps numba's compile time short.
    """
    n_cells, n_genes = sorted_sizes.size, gene_means.size
    n_bins = bin_starts.size
    dense_column = np.full(n_genes, -1, dtype=np.int64)
    for column in range(dense_genes.size):
        dense_column[dense_genes[column]] = column
    max_bin = 1
    for b in range(n_bins):
        max_bin = max(max_bin, (bin_starts[b + 1] if b + 1 < n_bins else n_cells) - bin_starts[b])
    # Gene-major, so the bursts of one gene land in one cached row.
    counts_buffer = np.zeros((n_genes, max_bin), dtype=np.int32)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    indices = np.empty(0, dtype=np.int32)
    data = np.empty(0, dtype=np.int32)
    touched_cell = np.empty(0, dtype=np.int64)
    touched_gene = np.empty(0, dtype=np.int32)
    nnz = 0
    for b in range(n_bins):
        start = bin_starts[b]
        n_bin = (bin_starts[b + 1] if b + 1 < n_bins else n_cells) - start
        capacity = n_bursts[b].sum() + n_bin * dense_genes.size
        if touched_cell.size < capacity:
            touched_cell = np.empty(2 * capacity, dtype=np.int64)
            touched_gene = np.empty(2 * capacity, dtype=np.int32)
        n_touched = 0
        for gene in range(n_genes):
            if dense_column[gene] >= 0:
                for local_cell in range(n_bin):
                    count = dense_counts[start + local_cell, dense_column[gene]]
                    if count > 0:
                        touched_cell[n_touched] = local_cell
                        touched_gene[n_touched] = gene
                        n_touched += 1
                        counts_buffer[gene, local_cell] = count
                continue
            for _ in range(n_bursts[b, gene]):
                local_cell = min(int(rng.random() * n_bin), n_bin - 1)
                mean = sorted_sizes[start + local_cell] * gene_means[gene]
                scaled_mean = mean / phi[gene]
                threshold = rng.random() * bound_rate[b, gene] / phi[gene]
                # log1p(x) >= 2x / (2 + x) accepts most bursts without a logarithm.
                if threshold < 2.0 * scaled_mean / (2.0 + scaled_mean) or threshold < np.log1p(scaled_mean):
                    if counts_buffer[gene, local_cell] == 0:
                        touched_cell[n_touched] = local_cell
                        touched_gene[n_touched] = gene
                        n_touched += 1
                    counts_buffer[gene, local_cell] += _logseries(rng, mean / (mean + phi[gene]))
        if indices.size < nnz + n_touched:
            grown = max(2 * indices.size, nnz + n_touched)
            new_indices = np.empty(grown, dtype=np.int32)
            new_data = np.empty(grown, dtype=np.int32)
            new_indices[:nnz] = indices[:nnz]
            new_data[:nnz] = data[:nnz]
            indices, data = new_indices, new_data
        # Counting sort by cell; genes were visited in order, so each row comes out sorted.
        row_length = np.zeros(n_bin, dtype=np.int64)
        for k in range(n_touched):
            row_length[touched_cell[k]] += 1
        for local_cell in range(n_bin):
            indptr[start + local_cell + 1] = indptr[start + local_cell] + row_length[local_cell]
        cursor = indptr[start : start + n_bin].copy()
        for k in range(n_touched):
            local_cell, gene = touched_cell[k], touched_gene[k]
            position = cursor[local_cell]
            indices[position] = gene
            data[position] = counts_buffer[gene, local_cell]
            counts_buffer[gene, local_cell] = 0
            cursor[local_cell] += 1
        nnz += n_touched
    return indptr, indices[:nnz], data[:nnz]


@numba.njit(cache=True)
def _logseries(rng, p):  # pragma: no cover - jitted
    """One Logarithmic(p) draw (Kemp's algorithm, as numpy), skipping its logarithm for most draws."""
    while True:
        v = rng.random()
        if v >= p:  # the common case for small p: a burst of size 1
            return 1
        q = -np.expm1(np.log1p(-p) * rng.random())
        if v <= q * q:
            size = np.floor(1.0 + np.log(v) / np.log(q))
            if size >= 1.0 and v > 0.0:
                return int(size)
        elif v >= q:
            return 1
        else:
            return 2


# --------------------------------------------------------------------------- helpers


def _validate_study(study: StudyDesign) -> None:
    fix = "fix the StudyDesign in the DemoConfig"
    if study.library not in LIBRARY_TYPES:
        raise ScgrnInputError(
            f"library {study.library!r} is not one of {LIBRARY_TYPES}", study=study.accession, fix=fix
        )
    if study.n_samples < 1 or study.cells_per_sample < 1 or not 0 <= study.extra_cells <= study.n_samples:
        raise ScgrnInputError(
            f"needs n_samples >= 1, cells_per_sample >= 1 and 0 <= extra_cells <= n_samples, got "
            f"{study.n_samples}, {study.cells_per_sample}, {study.extra_cells}",
            study=study.accession,
            fix=fix,
        )
    if study.has_condition and study.n_samples < 2:
        raise ScgrnInputError(
            "a study with a condition needs >= 2 samples (AD and control)", study=study.accession, fix=fix
        )
    if study.library == "plate_reads" and study.sample_n_cells(0) > WELLS_PER_PLATE:
        raise ScgrnInputError(
            f"a plate sample holds at most {WELLS_PER_PLATE} cells, got {study.sample_n_cells(0)}",
            study=study.accession,
            fix="use more samples (plates) with fewer cells each",
        )
    if not 0.0 < study.gene_fraction <= 1.0:
        raise ScgrnInputError(
            f"gene_fraction must be in (0, 1], got {study.gene_fraction}", study=study.accession, fix=fix
        )


def _stream(seed: int, *names: str) -> np.random.Generator:
    """A random stream for (seed, names...), stable across runs and Python processes."""
    # Python's hash() of str is salted per process, so names are hashed with sha256.
    keys = [int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") for name in names]
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _draw_gene_lengths(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """(n_genes,) gene lengths in bp, lognormal around 2.5 kb."""
    return np.clip(np.round(np.exp(rng.normal(np.log(2500.0), 0.6, n_genes))), 300, 200_000)


def _draw_log_proportions(rng: np.random.Generator, config: DemoConfig) -> tuple[np.ndarray, np.ndarray]:
    """(n_genes,) log expression proportions summing to 1 after exp, and the dominant genes.

    Network and background genes get absolute levels that do not depend on n_genes (so the
    network's footprint does not fade as n_genes grows); a few dominant background genes
    (mitochondrial/ribosomal-like) take the rest of each library: nearly all of it at the
    default 600 genes, at least 15% at 30,000 genes.
    """
    n_genes, n_network, n_tfs = config.n_genes, config.n_network_genes, config.n_tfs
    log_proportions = np.empty(n_genes)
    log_proportions[:n_tfs] = rng.normal(np.log(_TF_PROPORTION), 0.6, n_tfs)
    log_proportions[n_tfs:n_network] = rng.normal(np.log(_TARGET_PROPORTION), 0.9, n_network - n_tfs)
    network_share = np.exp(log_proportions[:n_network]).sum()
    dominant = np.zeros(n_genes, dtype=bool)
    n_background = n_genes - n_network
    if n_background == 0:
        return log_proportions - np.log(network_share), dominant
    if network_share > 1.0 - _MIN_DOMINANT_SHARE:  # huge networks: leave room for the dominant genes
        log_proportions[:n_network] += np.log((1.0 - _MIN_DOMINANT_SHARE) / network_share)
        network_share = 1.0 - _MIN_DOMINANT_SHARE
    n_dominant = min(_N_DOMINANT_GENES, max(1, n_background // 10))
    dominant[n_network + rng.choice(n_background, size=n_dominant, replace=False)] = True
    rest = np.flatnonzero(~dominant[n_network:]) + n_network
    rest_weights = np.exp(rng.normal(0.0, _BACKGROUND_SPREAD, rest.size))
    rest_share = min(rest.size * _BACKGROUND_PROPORTION, 1.0 - network_share - _MIN_DOMINANT_SHARE)
    dominant_weights = np.exp(rng.normal(0.0, 0.5, n_dominant))
    log_proportions[rest] = np.log(rest_share * rest_weights / rest_weights.sum())
    log_proportions[dominant] = np.log((1.0 - network_share - rest_share) * dominant_weights / dominant_weights.sum())
    return log_proportions, dominant


def _draw_condition_effects(
    rng: np.random.Generator, config: DemoConfig, log_proportions: np.ndarray, dominant: np.ndarray
) -> np.ndarray:
    """(n_genes,) AD-vs-control effects: +-U(0.4, 1.5) on a known subset, exactly 0 elsewhere.

    Condition genes are drawn among the better-expressed non-dominant genes (the top 3x their
    number), as real differential expression is found among detectable genes.
    """
    n_condition = round(config.condition_gene_fraction * config.n_genes)
    beta1 = np.zeros(config.n_genes)
    if n_condition == 0:
        return beta1
    candidates = np.flatnonzero(~dominant)
    candidates = candidates[np.argsort(-log_proportions[candidates], kind="stable")]
    pool = candidates[: min(candidates.size, 3 * n_condition)]
    chosen = rng.choice(pool, size=min(n_condition, pool.size), replace=False)
    beta1[chosen] = rng.choice([-1.0, 1.0], size=chosen.size) * rng.uniform(0.4, 1.5, chosen.size)
    return beta1


@dataclass(frozen=True)
class _Network:
    coefficients: np.ndarray  # (n_network, n_network) signed edge weights, TF rows
    tf_layer: np.ndarray  # (n_tfs,) 0 master, 1 secondary
    grn_sd: np.ndarray  # (n_network,) sd of each gene's cell-state term
    noise_sd: np.ndarray  # (n_network,) sd of its gene-own noise
    state_programs: np.ndarray  # (n_states, n_tfs)
    state_probabilities: np.ndarray  # (n_states,)


def _draw_network(rng: np.random.Generator, config: DemoConfig) -> _Network:
    """The regulatory network and the cell-state programs that drive it.

    Master TFs follow the latent cell state; secondary TFs are regulated by 1-2 master TFs
    (so TF1 -> TF2 -> target chains exist); every other network gene is regulated by 1-4 TFs
    chosen with Zipf-like propensities, so a few hub TFs have many targets. Coefficients are
    scaled so each gene's term has the drawn sd, with a known share explained by regulators.
    """
    n_network, n_tfs, n_states = config.n_network_genes, config.n_tfs, config.n_cell_states
    n_master = max(1, round(_MASTER_TF_FRACTION * n_tfs))
    tf_layer = np.r_[np.zeros(n_master, dtype=int), np.ones(n_tfs - n_master, dtype=int)]
    propensity = np.arange(1, n_tfs + 1, dtype=float) ** -_OUT_DEGREE_ZIPF_EXPONENT
    propensity = propensity[rng.permutation(n_tfs)]
    grn_sd = np.r_[rng.uniform(0.45, 0.6, n_tfs), rng.uniform(0.4, 0.6, n_network - n_tfs)]

    state_probabilities = rng.dirichlet(np.full(n_states, 5.0))
    programs = rng.normal(0.0, 1.0, size=(n_states, n_master))
    programs -= state_probabilities @ programs  # the population mean of each TF's term is 0
    state_share = _MASTER_STATE_SHARE if n_states > 1 else 0.0  # one state explains nothing
    state_variance = state_probabilities @ programs**2
    programs *= np.sqrt(state_share) * grn_sd[:n_master] / np.sqrt(np.maximum(state_variance, 1e-12))
    noise_sd = np.empty(n_network)
    noise_sd[:n_master] = np.sqrt(1.0 - state_share) * grn_sd[:n_master]
    # Covariance of the network's cell-state terms, filled in regulators-first order.
    covariance = np.zeros((n_network, n_network))
    covariance[:n_master, :n_master] = programs.T @ (state_probabilities[:, None] * programs) + np.diag(
        noise_sd[:n_master] ** 2
    )
    coefficients = np.zeros((n_network, n_network))
    for gene in range(n_master, n_network):
        if gene < n_tfs:
            candidates = np.arange(n_master)
            n_regulators = min(n_master, rng.integers(1, 3))
            regulated_share = _SECONDARY_REGULATED_SHARE
        else:
            candidates = np.arange(n_tfs)
            n_regulators = min(n_tfs, 1 + rng.poisson(0.8), 4)
            regulated_share = rng.uniform(*_TARGET_REGULATED_SHARE)
        weights = propensity[candidates] / propensity[candidates].sum()
        regulators = rng.choice(candidates, size=n_regulators, replace=False, p=weights)
        raw = rng.choice([-1.0, 1.0], size=n_regulators, p=[1 - _POSITIVE_EDGE_PROBABILITY, _POSITIVE_EDGE_PROBABILITY])
        raw *= rng.uniform(0.5, 1.5, n_regulators)
        explained_variance = raw @ covariance[np.ix_(regulators, regulators)] @ raw
        scale = np.sqrt(regulated_share) * grn_sd[gene] / np.sqrt(max(explained_variance, 1e-12))
        coefficients[regulators, gene] = raw * scale
        noise_sd[gene] = np.sqrt(1.0 - regulated_share) * grn_sd[gene]
        # Cov(x_gene, x_j) = sum_r c_r Cov(x_r, x_j) for every gene j drawn so far.
        covariance[gene, :gene] = coefficients[regulators, gene] @ covariance[regulators, :gene]
        covariance[:gene, gene] = covariance[gene, :gene]
        covariance[gene, gene] = grn_sd[gene] ** 2
    state_programs = np.zeros((n_states, n_tfs))
    state_programs[:, :n_master] = programs
    return _Network(
        coefficients=coefficients,
        tf_layer=tf_layer,
        grn_sd=grn_sd,
        noise_sd=noise_sd,
        state_programs=state_programs,
        state_probabilities=state_probabilities,
    )


def _draw_samples(config: DemoConfig) -> pd.DataFrame:
    """The sample table: GSM accession, short name, condition, cell count and depth."""
    rows = []
    for design in config.studies:
        rng = _stream(config.seed, design.accession, "samples")
        if design.library == "umi":
            study_depth = rng.uniform(2500.0, 4000.0)
        else:
            study_depth = rng.uniform(1.8e5, 2.6e5)
        n_ad = design.n_samples // 2 if design.has_condition else 0
        for sample_index in range(design.n_samples):
            if not design.has_condition:
                condition, sample_name = None, f"rep{sample_index + 1}"
            elif sample_index < n_ad:
                condition, sample_name = "AD", f"AD_rep{sample_index + 1}"
            else:
                condition, sample_name = "control", f"control_rep{sample_index - n_ad + 1}"
            rows.append(
                {
                    "study": design.accession,
                    "sample": f"GSM{design.accession.removeprefix('GSE')}{sample_index + 1}",
                    "sample_name": sample_name,
                    "condition": condition,
                    "n_cells": design.sample_n_cells(sample_index),
                    "library_size_median": study_depth * np.exp(rng.normal(0.0, _SAMPLE_DEPTH_SPREAD)),
                }
            )
    samples = pd.DataFrame(rows)
    samples["condition"] = samples["condition"].astype(object).where(samples["condition"].notna(), None)
    if samples["sample"].duplicated().any():
        raise ScgrnInputError("study accessions give clashing GSM accessions", fix="use distinct GSE numbers")
    return samples


def _sample_row(truth: DemoTruth, study: str, sample: str) -> pd.Series:
    samples = truth.samples
    match = samples[(samples["study"] == study) & (samples["sample"] == sample)]
    if match.empty:
        known = ", ".join(samples.loc[samples["study"] == study, "sample"])
        raise ScgrnInputError(f"sample {sample} is not in this study", study=study, fix=f"use one of {known}")
    return match.iloc[0]


def _cell_table(
    rng: np.random.Generator, design: StudyDesign, sample: str, n_cells: int, truth: DemoTruth
) -> pd.DataFrame:
    """Barcodes: 16-letter ACGT (UMI) or wells of the sample's 384-well plate (plate study)."""
    study_samples = truth.samples.loc[truth.samples["study"] == design.accession, "sample"].tolist()
    sample_index = study_samples.index(sample)
    if design.library == "umi":
        return pd.DataFrame({"barcode": _draw_barcodes(rng, n_cells, sample_index, design.n_samples)})
    wells = np.sort(rng.choice(WELLS_PER_PLATE, size=n_cells, replace=False))
    well_ids = [f"{PLATE_ROWS[well // PLATE_COLUMNS]}{well % PLATE_COLUMNS + 1}" for well in wells]
    return pd.DataFrame({"barcode": well_ids, "well_id": well_ids, "plate_id": np.full(n_cells, sample_index + 1)})


def _draw_barcodes(rng: np.random.Generator, n_cells: int, sample_index: int, n_samples: int) -> np.ndarray:
    """(n_cells,) 16-letter ACGT barcodes, unique within the study without seeing other samples.

    Each sample draws distinct codes from its own residue class modulo ``n_samples``, then a
    fixed bijection of the 32-bit codes scrambles them so they look like random barcodes.
    """
    n_codes_per_sample = 4**16 // n_samples
    codes = np.unique(rng.integers(0, n_codes_per_sample, size=n_cells, dtype=np.uint64))
    while codes.size < n_cells:  # birthday collisions: redraw the missing ones
        codes = np.unique(np.r_[codes, rng.integers(0, n_codes_per_sample, size=n_cells - codes.size, dtype=np.uint64)])
    codes = codes[rng.permutation(n_cells)] * np.uint64(n_samples) + np.uint64(sample_index)
    mask = np.uint64(0xFFFFFFFF)
    # murmur3's finaliser: odd multiplications and xor-shifts are bijections of 32-bit codes.
    codes = (codes * np.uint64(0x85EBCA6B)) & mask
    codes ^= codes >> np.uint64(13)
    codes = (codes * np.uint64(0xC2B2AE35)) & mask
    codes ^= codes >> np.uint64(16)
    shifts = np.uint64(2) * np.arange(15, -1, -1, dtype=np.uint64)
    letters = np.frombuffer(b"ACGT", dtype="S1")[(codes[:, None] >> shifts) & np.uint64(3)]
    return letters.view("S16").ravel().astype(str)


def _draw_string_scores(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """STRING-style combined scores (int, 400..999) rising with edge weight, with noise."""
    if weights.size == 0:
        return np.zeros(0, dtype=np.int64)
    weight_rank = (np.argsort(np.argsort(weights)) + 0.5) / weights.size
    return np.clip(np.round(450 + 450 * weight_rank + rng.normal(0, 80, weights.size)), 400, 999).astype(np.int64)


def _draw_ensembl_ids(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """(n_genes,) unique ``ENSMUSG`` + 11-digit ids in random order."""
    numbers = np.cumsum(rng.integers(1, 3000, size=n_genes))[rng.permutation(n_genes)]
    return np.array([f"ENSMUSG{number:011d}" for number in numbers])


_TF_FAMILIES = ("Zfp", "Klf", "Sox", "Foxo", "Foxp", "Nr1d", "Nr2f", "Tcf", "Irf", "Stat", "Egr", "Hoxa", "Hoxb",
                "Pax", "Gata", "Elf", "Etv", "Mef", "Runx", "Atf", "Creb3l", "Tead", "Pou3f", "Lhx", "Dlx", "Six",
                "Tbx", "Zbtb", "Bhlhe", "Nfat")  # fmt: skip
_GENE_PREFIXES = ("Slc", "Tmem", "Ccdc", "Fam", "Kcn", "Ankrd", "Lrrc", "Rnf", "Ppp1r", "Cdh", "Arhgap", "Dnaj", "Sema",
                  "Wdr", "Abca", "Col", "Itg", "Gpr", "Rab", "Serpin", "Usp", "Kif", "Myo", "Ptpr", "Adam", "Cyp",
                  "Ugt", "Olfr", "Trim", "Mapk", "Atp", "Cacna", "Syt", "Nrxn", "Lama", "Pcdh", "Tnfrsf",
                  "Il")  # fmt: skip
_RIKEN_DIGIT_PREFIXES = ("1700", "4930", "2610", "9530", "4833", "2310", "1110", "5730", "6330", "9330")
_RIKEN_LETTER_PREFIXES = ("A830", "C230", "D630", "E330", "B230")
_X_SYMBOLS = ("Xist", "Xkr4", "Xpo7", "Xrcc5")  # real X+letter symbols, which R leaves unprefixed


def _draw_gene_symbols(rng: np.random.Generator, n_genes: int, n_tfs: int) -> np.ndarray:
    """(n_genes,) unique mouse-like symbols: TF-family names first, then a realistic mix.

    ~5% are digit-initial RIKEN clones (``1700012B09Rik``), which R prefixes with ``X``; two
    start with X and a letter (``Xist``-like); none start with X and a digit.
    """
    used: set[str] = set()

    def unique(make) -> str:
        while True:
            symbol = make()
            if symbol.lower() not in used:
                used.add(symbol.lower())
                return symbol

    def tf_symbol() -> str:
        family = _TF_FAMILIES[rng.integers(len(_TF_FAMILIES))]
        number = rng.integers(1, 400) if family == "Zfp" else rng.integers(1, 16)
        return f"{family}{number}"

    def riken_symbol(digit_initial: bool) -> str:
        prefixes = _RIKEN_DIGIT_PREFIXES if digit_initial else _RIKEN_LETTER_PREFIXES
        letter = chr(ord("A") + rng.integers(0, 26))
        return f"{prefixes[rng.integers(len(prefixes))]}{rng.integers(0, 1000):03d}{letter}{rng.integers(1, 25):02d}Rik"

    def other_symbol() -> str:
        draw = rng.random()
        if draw < 0.25:
            return f"Gm{rng.integers(1, 60_000)}"
        if draw < 0.28:
            return riken_symbol(digit_initial=False)
        prefix = _GENE_PREFIXES[rng.integers(len(_GENE_PREFIXES))]
        suffix = f"{chr(ord('a') + rng.integers(0, 8))}{rng.integers(1, 10)}" if rng.random() < 0.3 else ""
        return f"{prefix}{rng.integers(1, 400)}{suffix}"

    n_other = n_genes - n_tfs
    n_digit_riken = min(n_other, math.ceil(0.05 * n_genes))
    n_x = min(2, n_other - n_digit_riken)
    kinds = np.array(["digit_riken"] * n_digit_riken + ["x"] * n_x + ["other"] * (n_other - n_digit_riken - n_x))
    kinds = kinds[rng.permutation(n_other)]
    x_symbols = iter(rng.choice(_X_SYMBOLS, size=n_x, replace=False))
    symbols = [unique(tf_symbol) for _ in range(n_tfs)]
    for kind in kinds:
        if kind == "digit_riken":
            symbols.append(unique(lambda: riken_symbol(digit_initial=True)))
        elif kind == "x":
            symbols.append(unique(lambda: str(next(x_symbols))))
        else:
            symbols.append(unique(other_symbol))
    return np.array(symbols, dtype=object)
