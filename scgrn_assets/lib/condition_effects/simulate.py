"""Designs with the structure real condition studies have, for calibrating condition effects.

Animals (one GEO sample each) sit within conditions within studies; each animal has its own
gene-level deviation, studies (and sequencing batches inside them) shift genes, cells vary in
depth. The unit that carries the condition is the animal, so a method that treats cells as
replicates is overconfident here and a method whose replicate is the animal is not.

Model, for cell ``i`` of animal ``a`` (condition ``c_a``) in study ``k``, batch ``h``::

    Y_ig  ~ NegBinomial(mean s_i * exp(eta_ag), inverse dispersion phi_g)
    eta_ag = beta0_g + beta1_g * c_a + b_kg + d_hg + u_ag,   u_ag ~ Normal(0, tau)

``beta1_g`` is 0 for most genes (the null genes) and ``log2fc = beta1 / ln 2`` is the truth
a method is scored against. The designs a calibration needs are named options: a balanced
one, an unbalanced one (``n_animals`` per study and arm), a null-only mock comparison
(every ``beta1`` zero, control animals split into two fake groups) and a confounded one (a
study that holds one condition only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Calibration designs (see module docstring).
DESIGNS = ("balanced", "unbalanced", "null_mock", "confounded")
_CELL_CHUNK = 2048


@dataclass(frozen=True)
class DesignConfig:
    """One simulated multi-study comparison.

    Attributes
    ----------
    n_studies : int
    n_animals_per_arm : int or tuple of (n_control, n_case) per study
        An int gives every study that many animals per arm.
    cells_per_animal : (low, high)
        Cells per animal drawn uniformly (inclusive).
    n_genes : int
    tau : float
        sd of the animal x gene deviation ``u_ag`` (natural log).
    effect_fraction : float
        Share of genes with a condition effect.
    effect_sd : float
        |beta1| of an effect gene is ``0.15 + |Normal(0, effect_sd)|`` (natural log), random sign.
    study_sd, batch_sd : float
        sd of study and within-study batch gene effects (two batches per study, each holding
        animals of both arms).
    mean_library_size : float
        Median counts per cell.
    design : str
        One of :data:`DESIGNS`.
    seed : int
    """

    n_studies: int = 2
    n_animals_per_arm: int | tuple[tuple[int, int], ...] = 4
    cells_per_animal: tuple[int, int] = (100, 1000)
    n_genes: int = 1000
    tau: float = 0.25
    effect_fraction: float = 0.1
    effect_sd: float = 0.5
    study_sd: float = 0.3
    batch_sd: float = 0.1
    mean_library_size: float = 3000.0
    design: str = "balanced"
    seed: int = 0

    def animals_per_arm(self) -> list[tuple[int, int]]:
        """(n_control, n_case) per study."""
        if isinstance(self.n_animals_per_arm, int):
            return [(self.n_animals_per_arm, self.n_animals_per_arm)] * self.n_studies
        if len(self.n_animals_per_arm) != self.n_studies:
            raise ValueError(f"n_animals_per_arm lists {len(self.n_animals_per_arm)} studies, n_studies is "
                             f"{self.n_studies}")
        return [tuple(arm) for arm in self.n_animals_per_arm]


@dataclass
class SimulatedComparison:
    """What :func:`simulate_comparison` drew.

    Attributes
    ----------
    pseudobulk : np.ndarray, shape (n_animals, n_genes), int64
        Counts summed over each animal's cells.
    animals : pd.DataFrame
        One row per animal: ``study``, ``animal``, ``condition`` ("control"/"AD"),
        ``n_cells``, ``library_size`` (sum of its cells' totals over all genes).
    genes : pd.DataFrame
        ``gene``, ``beta0``, ``log2fc`` (the truth), ``phi``.
    cell_counts : scipy.sparse.csr_matrix or None, shape (n_cells, n_genes)
        Per-cell counts, kept only with ``keep_cells=True``.
    cells : pd.DataFrame or None
        ``study``, ``animal``, ``condition``, ``n_counts`` per cell.
    """

    pseudobulk: np.ndarray
    animals: pd.DataFrame
    genes: pd.DataFrame
    cell_counts: object = None
    cells: pd.DataFrame | None = None


def simulate_comparison(config: DesignConfig, *, keep_cells: bool = False) -> SimulatedComparison:
    """Draw one comparison (see the module docstring for the model).

    Per-cell counts are drawn as Poisson-Gamma mixtures; without ``keep_cells`` only the
    animal sums are kept (a Poisson of the summed Gamma-scaled means), so memory stays
    O(n_cells) per gene block rather than O(n_cells x n_genes).
    """
    import scipy.sparse as sp

    if config.design not in DESIGNS:
        raise ValueError(f"design {config.design!r} is not one of {DESIGNS}")
    rng = np.random.default_rng(config.seed)
    n_genes = config.n_genes
    log_proportion = rng.normal(0.0, 1.5, n_genes)
    log_proportion -= np.log(np.exp(log_proportion).sum())  # proportions sum to 1: totals ~ library size
    phi = np.exp(rng.normal(np.log(3.0), 0.5, n_genes))
    beta1 = np.zeros(n_genes)
    if config.design != "null_mock":
        n_effect = int(round(config.effect_fraction * n_genes))
        chosen = rng.choice(n_genes, size=n_effect, replace=False)
        beta1[chosen] = rng.choice([-1.0, 1.0], n_effect) * (0.15 + np.abs(rng.normal(0.0, config.effect_sd, n_effect)))
    arms = config.animals_per_arm()
    rows, pseudobulk, cell_blocks, cell_rows = [], [], [], []
    for study_index, (n_control, n_case) in enumerate(arms):
        study = f"GSE{990000 + study_index}"
        study_effect = rng.normal(0.0, config.study_sd, n_genes)
        batch_effects = rng.normal(0.0, config.batch_sd, (2, n_genes))
        labels = ["control"] * n_control + ["AD"] * n_case
        if config.design == "confounded" and study_index == 0:
            labels = ["AD"] * (n_control + n_case)  # the first study holds one condition only
        for animal_index, label in enumerate(labels):
            is_case = label == "AD" and config.design != "null_mock"
            # Arms alternate between the two batches, so batches cross conditions as in a good design.
            batch = animal_index % 2
            eta = (log_proportion + (beta1 if is_case else 0.0) + study_effect + batch_effects[batch]
                   + rng.normal(0.0, config.tau, n_genes))
            n_cells = int(rng.integers(config.cells_per_animal[0], config.cells_per_animal[1] + 1))
            library = config.mean_library_size * np.exp(rng.normal(0.0, 0.4, n_cells))
            summed = np.zeros(n_genes, dtype=np.int64)
            totals = []
            for start in range(0, n_cells, _CELL_CHUNK):  # bounded memory at any number of cells
                chunk = library[start:start + _CELL_CHUNK]
                scaled = chunk[:, None] * np.exp(eta)[None, :] * rng.gamma(phi, 1.0 / phi, (len(chunk), n_genes))
                if keep_cells:
                    counts = rng.poisson(scaled)
                    cell_blocks.append(sp.csr_matrix(counts.astype(np.int32)))
                    summed += counts.sum(axis=0)
                    totals.append(counts.sum(axis=1))
                else:
                    summed += rng.poisson(scaled.sum(axis=0))
            animal = f"{study}_animal{animal_index + 1}"
            pseudobulk.append(summed.astype(np.int64))
            rows.append({"study": study, "animal": animal, "condition": label, "n_cells": n_cells,
                         "library_size": float(summed.sum())})
            if keep_cells:
                cell_rows.append(pd.DataFrame({"study": study, "animal": animal, "condition": label,
                                               "n_counts": np.concatenate(totals)}))
    animals = pd.DataFrame(rows)
    if config.design == "null_mock":
        # A mock comparison: control animals only, split at random into two fake groups per study.
        for study, group in animals.groupby("study"):
            fake = np.array(["control"] * (len(group) // 2) + ["AD"] * (len(group) - len(group) // 2))
            animals.loc[group.index, "condition"] = rng.permutation(fake)
        if keep_cells:
            mapping = dict(zip(animals["animal"], animals["condition"]))
            for frame in cell_rows:
                frame["condition"] = frame["animal"].map(mapping)
    genes = pd.DataFrame({"gene": [f"gene{g:05d}" for g in range(n_genes)], "beta0": log_proportion,
                          "log2fc": beta1 / np.log(2.0), "phi": phi})
    result = SimulatedComparison(pseudobulk=np.vstack(pseudobulk), animals=animals, genes=genes)
    if keep_cells:
        result.cell_counts = sp.vstack(cell_blocks, format="csr")
        result.cells = pd.concat(cell_rows, ignore_index=True)
    return result
