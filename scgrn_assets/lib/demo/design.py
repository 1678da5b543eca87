"""What the demo simulates: study designs, the configuration, and the truth :func:`simulator.simulate_truth` draws."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError


#: One global gene-length effect (log-mean change per unit log(length / 1 kb)), used for every
#: library type: the plate-read study would have a larger one in real data, which we ignore.
GENE_LENGTH_EFFECT = 0.3
LIBRARY_TYPES = ("umi", "plate_reads")
PLATE_ROWS = "ABCDEFGHIJKLMNOP"
PLATE_COLUMNS = 24
WELLS_PER_PLATE = len(PLATE_ROWS) * PLATE_COLUMNS


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


# --------------------------------------------------------------------------- checks


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


__all__ = ["StudyDesign", "DemoConfig", "DemoTruth", "DEFAULT_STUDIES", "GENE_LENGTH_EFFECT", "LIBRARY_TYPES",
           "PLATE_ROWS", "PLATE_COLUMNS", "WELLS_PER_PLATE"]
