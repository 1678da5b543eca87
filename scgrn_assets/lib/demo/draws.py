"""The random draws behind the demo's truth and cells: genes, network, effects, samples, barcodes.

Each draw takes a random stream named for it (:func:`_stream`), stable across runs and processes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scgrn_assets.lib.demo.design import DemoConfig, DemoTruth, PLATE_COLUMNS, PLATE_ROWS, StudyDesign, WELLS_PER_PLATE
from scgrn_assets.lib.errors import ScgrnInputError


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
