"""Benchmark-stage test support: shared reference files, a small STRING v12 download, random scoring problems and
brute-force references for pair universes and early precision."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.benchmarks.reference_files import normalise_reference

REFERENCE_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference"


def shared_file(relative: str) -> Path:
    path = REFERENCE_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared reference data is not part of the repository)")
    return path


def write_string_v12(folder: Path) -> tuple[Path, Path, Path]:
    info = folder / "9606.protein.info.v12.0.txt.gz"
    aliases = folder / "9606.protein.aliases.v12.0.txt"
    links = folder / "9606.protein.links.v12.0.txt.gz"
    with gzip.open(info, "wt") as handle:
        handle.write("#string_protein_id\tpreferred_name\tprotein_size\tannotation\n"
                     "9606.P1\tTP53\t393\ttumour protein\n9606.P2\tMDM2\t491\tE3 ligase\n"
                     "9606.P3\tCDKN1A\t164\tp21\n9606.P4\tORF9\t100\tunknown\n")
    aliases.write_text("#string_protein_id\talias\tsource\n"
                       "9606.P3\tP21\tEnsembl\n9606.P3\tCIP1\tUniProt\n9606.P4\tCIP1\tUniProt\n"
                       "9606.P2\tHDM2\tUniProt\n")
    with gzip.open(links, "wt") as handle:
        handle.write("protein1 protein2 combined_score\n"
                     "9606.P1 9606.P2 999\n9606.P2 9606.P1 999\n9606.P1 9606.P3 700\n9606.P3 9606.P1 700\n"
                     "9606.P1 9606.P4 699\n9606.P4 9606.P1 699\n9606.P2 9606.P3 800\n")
    return info, aliases, links


def random_problem(seed: int, n_genes: int = 9, directed_reference: bool = True):
    generator = np.random.default_rng(seed)
    genes = [f"g{index}" for index in range(n_genes)]
    ordered = [(a, b) for a in genes for b in genes]
    chosen = generator.choice(len(ordered), size=25, replace=False)
    reference = normalise_reference(
        pd.DataFrame([ordered[index] for index in chosen], columns=["source", "target"]),
        name="ref", directed=directed_reference,
    )
    data_genes = genes[:-1] + ["not_in_reference"]  # one reference gene absent from the data
    listed = generator.choice(len(ordered), size=40, replace=False)
    prediction = pd.DataFrame([ordered[index] for index in listed], columns=["source", "target"])
    prediction["score"] = generator.integers(-3, 4, size=len(prediction)) / 3  # ties, zeros, negatives
    return reference, prediction, data_genes


def brute_force_pairs(reference, prediction, data_genes, universe, directed, tf_list):
    """Every pair of the universe enumerated, with its label and score."""
    reference = reference[reference["source"] != reference["target"]]
    genes = [gene for gene in data_genes if gene in set(reference["source"]) | set(reference["target"])]
    tfs = set(tf_list if tf_list is not None else reference["source"]) & set(genes)

    def key(a, b):
        return (a, b) if directed else tuple(sorted((a, b)))

    truth = {key(a, b) for a, b in zip(reference["source"], reference["target"]) if a in genes and b in genes}
    scores = {}
    for a, b, score in zip(prediction["source"], prediction["target"], prediction["score"]):
        if a in genes and b in genes and a != b:
            scores[key(a, b)] = max(scores.get(key(a, b), 0.0), abs(score))
    if directed:
        candidates = [(a, b) for a, b in itertools.permutations(genes, 2)]
        if universe == "tf_rooted":
            candidates = [(a, b) for a, b in candidates if a in tfs]
    else:
        candidates = [tuple(sorted(pair)) for pair in itertools.combinations(genes, 2)]
        if universe == "tf_rooted":
            candidates = [(a, b) for a, b in candidates if a in tfs or b in tfs]
    listed_keys = {key(a, b) for a, b in zip(prediction["source"], prediction["target"])
                   if a in genes and b in genes and a != b}
    if universe == "predicted":
        candidates = [pair for pair in candidates if pair in listed_keys]
    labels = np.array([pair in truth for pair in candidates])
    values = np.array([scores.get(pair, 0.0) for pair in candidates])
    return labels, values


def brute_force_early_precision(labels, scores):
    """BEELINE's rule written out: k = #true, keep pairs scoring >= the k-th best score and > 0."""
    k = int(labels.sum())
    ranked = sorted(scores, reverse=True)
    kth_score = ranked[min(k, len(ranked)) - 1]
    selected = [index for index, score in enumerate(scores) if score >= kth_score and score > 0]
    if not selected:
        return 0.0
    return sum(labels[index] for index in selected) / len(selected)


def expression_with_empty_cells(n_cells: int = 2000, n_genes: int = 8, n_empty: int = 19,
                                seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Cells x genes non-negative values driven by a small cascade (gene i-1 -> gene i), in which ``n_empty``
    cells express no gene at all (as in the public 2,000 x 8 simulation of issue #24), every other cell at
    least one. Returns (values, gene names, indices of the empty cells)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n_cells, n_genes))
    for gene in range(1, n_genes):
        latent[:, gene] += 1.2 * latent[:, gene - 1]
    values = np.round(np.log1p(np.exp(latent)) * 3)
    values[:, 0] += 1  # every cell expresses something...
    empty = np.sort(rng.choice(n_cells, size=n_empty, replace=False))
    values[empty] = 0  # ...except these
    return values, [f"G{i}" for i in range(n_genes)], empty
