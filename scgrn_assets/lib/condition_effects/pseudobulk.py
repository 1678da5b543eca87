"""Cells summed per animal (the replicate of a condition study) and the checks a design must pass.

A GEO sample is usually one animal, and the condition (5XFAD or wild type) is a property of the
animal, not of its cells: cells of one mouse share that mouse's deviation from its strain, so
they are not independent replicates of the condition. Summing each animal's counts gives one
observation per replicate (the pseudobulk that DESeq2-style tools and our default model fit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError

#: Fewest animals per condition a study needs to inform the condition effect.
MIN_ANIMALS_PER_ARM = 2
#: Below this median of cells per animal, "animals" are single cells (one GSM per cell).
MIN_MEDIAN_CELLS_PER_ANIMAL = 2


@dataclass
class Pseudobulk:
    """Counts summed per animal.

    Attributes
    ----------
    counts : np.ndarray, shape (n_samples, n_genes), int64
    samples : pd.DataFrame
        One row per animal, in ``counts`` row order: ``study``, ``animal``, ``condition``
        (a label of ``levels``), ``n_cells``, ``library_size`` (sum of its cells' total counts
        over all genes, not only the modelled ones).
    gene_names : list of str
    levels : (reference, case) condition labels
    """

    counts: np.ndarray
    samples: pd.DataFrame
    gene_names: list[str]
    levels: tuple[str, str] = ("control", "AD")

    @property
    def n_samples(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def is_case(self) -> np.ndarray:
        """(n_samples,) bool: the animal has the case level (e.g. AD)."""
        return (self.samples["condition"] == self.levels[1]).to_numpy()

    def subset(self, samples: np.ndarray | None = None, genes: np.ndarray | None = None) -> "Pseudobulk":
        """Rows (bool mask or indices) and/or columns, as a new Pseudobulk."""
        rows = np.arange(self.n_samples) if samples is None else np.asarray(samples)
        columns = np.arange(self.n_genes) if genes is None else np.asarray(genes)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if columns.dtype == bool:
            columns = np.flatnonzero(columns)
        return Pseudobulk(counts=self.counts[np.ix_(rows, columns)],
                          samples=self.samples.iloc[rows].reset_index(drop=True),
                          gene_names=[self.gene_names[c] for c in columns], levels=self.levels)

    def size_factors(self) -> np.ndarray:
        """(n_samples,) DESeq2's median-of-ratios size factors over the genes every animal expresses.

        Total counts would let a few strongly changed, highly expressed genes shift every other
        gene's apparent fold change (a composition effect); the median ratio is robust to that.
        Falls back to library sizes over their geometric mean when no gene is expressed everywhere.
        """
        counts = self.counts.astype(np.float64)
        everywhere = np.all(counts > 0, axis=0)
        if not everywhere.any():
            library = self.samples["library_size"].to_numpy(dtype=np.float64)
            return library / np.exp(np.mean(np.log(library)))
        log_counts = np.log(counts[:, everywhere])
        factors = np.exp(np.median(log_counts - log_counts.mean(axis=0, keepdims=True), axis=1))
        return factors / np.exp(np.mean(np.log(factors)))

    def log_offset(self) -> np.ndarray:
        """(n_samples,) the model's offset: log size factor plus the log geometric-mean library size, so
        intercepts stay log proportions of a typical library."""
        library = self.samples["library_size"].to_numpy(dtype=np.float64)
        return np.log(self.size_factors()) + np.mean(np.log(library))

    def normalised(self) -> np.ndarray:
        """Counts divided by size factors, shape (n_samples, n_genes)."""
        return self.counts / self.size_factors()[:, None]


def pseudobulk_by_animal(counts, obs: pd.DataFrame, gene_names, levels: tuple[str, str]) -> Pseudobulk:
    """Sum cells' counts per (study, animal).

    Parameters
    ----------
    counts : scipy.sparse matrix or np.ndarray, shape (n_cells, n_genes)
        Raw counts of the genes to model.
    obs : pd.DataFrame
        Per cell: ``study``, ``condition`` (NA where unknown), ``n_counts`` (total counts over all
        genes) and ``animal`` (falls back to ``sample`` when absent). Cells with unknown
        condition are left out.
    gene_names : sequence of str
    levels : (reference, case)

    Returns
    -------
    Pseudobulk
        Animals sorted by study, then condition, then animal id.

    Raises
    ------
    ScgrnInputError
        An animal whose cells carry two conditions.
    """
    animal_column = "animal" if "animal" in obs.columns else "sample"
    condition = obs["condition"].astype(object)
    known = condition.notna().to_numpy() & condition.isin(levels).to_numpy()
    frame = pd.DataFrame({"study": obs["study"].astype(str).to_numpy()[known],
                          "animal": obs[animal_column].astype(str).to_numpy()[known],
                          "condition": condition.to_numpy()[known],
                          "n_counts": obs["n_counts"].to_numpy(dtype=np.float64)[known]})
    mixed = frame.groupby(["study", "animal"])["condition"].nunique()
    mixed = mixed[mixed > 1]
    if len(mixed):
        (study, animal), = mixed.index[:1]
        raise ScgrnInputError(f"animal {animal} has cells of both conditions", study=study,
                              fix="condition is a property of the animal: fix the condition rule or the catalog's "
                                  "metadata.animal_column")
    keys = frame["study"] + "\x00" + frame["animal"]
    codes, unique_keys = pd.factorize(keys, sort=True)
    indicator = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))),
                              shape=(len(unique_keys), len(codes)))
    cell_counts = sp.csr_matrix(counts)[np.flatnonzero(known)]
    summed = np.asarray((indicator @ cell_counts).todense()).round().astype(np.int64)
    samples = frame.groupby(codes).agg(study=("study", "first"), animal=("animal", "first"),
                                       condition=("condition", "first"), n_cells=("n_counts", "size"),
                                       library_size=("n_counts", "sum")).reset_index(drop=True)
    order = np.lexsort((samples["animal"], samples["condition"] == levels[1], samples["study"]))
    return Pseudobulk(counts=summed[order], samples=samples.iloc[order].reset_index(drop=True),
                      gene_names=[str(g) for g in gene_names], levels=tuple(levels))


@dataclass
class DesignReport:
    """Which studies inform the condition effect, and why the others do not.

    Attributes
    ----------
    studies : pd.DataFrame
        One row per study: ``study``, ``n_control``, ``n_case`` (animals), ``n_cells``, ``role``
        ("contrast": both arms with >= MIN_ANIMALS_PER_ARM animals; "baseline_only": one
        condition only, kept for its baseline and dispersion, no say in the effect;
        "excluded": both conditions but too few animals in an arm), ``reason``.
    """

    studies: pd.DataFrame

    @property
    def contrast_studies(self) -> list[str]:
        return self.studies.loc[self.studies["role"] == "contrast", "study"].tolist()

    @property
    def modelled_studies(self) -> list[str]:
        return self.studies.loc[self.studies["role"] != "excluded", "study"].tolist()


def check_design(pseudobulk: Pseudobulk, min_animals_per_arm: int = MIN_ANIMALS_PER_ARM) -> DesignReport:
    """Classify studies by what they can say about the condition effect; refuse a design that cannot say anything.

    A study that holds one condition only has its condition aliased with its own study effect: it
    is kept for its baseline (and what its animals say about between-animal variance) but cannot
    inform the effect. A study with both conditions but fewer than ``min_animals_per_arm`` animals
    in an arm cannot separate the condition from one animal's deviation and is excluded.

    Raises
    ------
    ScgrnInputError
        No study has both conditions with enough animals (naming each study and what it holds),
        or animals look like single cells (one GSM per cell without ``metadata.animal_column``).
    """
    samples = pseudobulk.samples
    median_cells = float(samples["n_cells"].median()) if len(samples) else 0.0
    if len(samples) and median_cells < MIN_MEDIAN_CELLS_PER_ANIMAL:
        worst = samples.groupby("study")["n_cells"].median().idxmin()
        raise ScgrnInputError(f"the median animal has {median_cells:g} cells: samples look like single cells "
                              "(one GSM per cell), so cells would be counted as replicates", study=worst,
                              fix="name the metadata column that identifies the animal (e.g. a mouse or plate id) "
                                  "as metadata.animal_column in the catalog")
    rows = []
    case = pseudobulk.levels[1]
    for study, group in samples.groupby("study", sort=True):
        n_case = int((group["condition"] == case).sum())
        n_control = int(len(group) - n_case)
        if n_case == 0 or n_control == 0:
            held = case if n_control == 0 else pseudobulk.levels[0]
            role, reason = "baseline_only", f"holds only {held} animals: its condition is its study effect"
        elif min(n_case, n_control) < min_animals_per_arm:
            role, reason = "excluded", (f"{n_control} control and {n_case} {case} animals: fewer than "
                                        f"{min_animals_per_arm} in an arm")
        else:
            role, reason = "contrast", ""
        rows.append({"study": study, "n_control": n_control, "n_case": n_case,
                     "n_cells": int(group["n_cells"].sum()), "role": role, "reason": reason})
    report = DesignReport(studies=pd.DataFrame(rows, columns=["study", "n_control", "n_case", "n_cells", "role",
                                                              "reason"]))
    if not report.contrast_studies:
        described = "; ".join(f"{r.study}: {r.reason or 'no animals'}" for r in report.studies.itertuples()) \
            or "no animals with a known condition"
        raise ScgrnInputError(f"no study has both conditions with >= {min_animals_per_arm} animals each, so the "
                              f"condition effect cannot be told apart from study effects ({described})",
                              study=",".join(report.studies["study"]) or None,
                              fix="add studies that hold both conditions (>= 2 animals each), or check the "
                                  "catalog's condition rules")
    return report
