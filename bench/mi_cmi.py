"""Benchmark: MI + CMI edge tables, ours vs per-edge Python loops with np.histogram2d.

Both run in the same process on the same discretised codes of a corpus drawn by the demo
simulator (``scgrn_assets.lib.demo.simulator``): by default the demo's own size (6,000 cells x
600 genes), with ``--full`` 186,000 cells x 3,000 genes. The candidate set is every gene's
top-15 neighbours; as a stand-in for the attention ``edge_stability`` table (which needs
a trained model) the stability of a pair is the Pearson correlation of log1p-normalised
expression on a subsample of cells.

Work per edge, identical for both: MI with a permutation p-value (at most
``--n-permutations``, the same sequential early stopping), CMI given every other
candidate parent of the target, and the conditional permutation test of the minimum.
Ours runs on the whole candidate set; the baseline (the original pipeline's per-edge
loops: ``np.histogram2d`` per table, ``rng.permutation`` per permutation, a boolean mask
per stratum) runs on ``--baseline-edges`` edges drawn at random from it, and its speed
is edges per second on those. The last line is
``RESULT name=mi_cmi ratio=<ours edges/s / baseline edges/s> edges_per_s=<ours> goal=20``.

    .venv/bin/python bench/mi_cmi.py            # demo size, a few minutes
    .venv/bin/python bench/mi_cmi.py --full     # 3,000 genes x top-15 on 186k cells
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.validation import discretization
from scgrn_assets.lib.validation import mutual_information as mi_lib
from scgrn_assets.lib.demo.simulator import DemoConfig, simulate_sample_counts, simulate_truth

FULL_CELLS = 186_000
FULL_GENES = 3_000
CORRELATION_CELLS = 5_000  # cells used for the stand-in stability score
NEIGHBOURS_LISTED = 30  # pairs listed per gene in the stand-in edge table (>= top_k)


def simulated_corpus(config: DemoConfig) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """All samples of the demo simulator stacked into one (n_cells, n_genes) CSR corpus."""
    truth = simulate_truth(config)
    n_genes = config.n_genes
    parts = []
    for sample in truth.samples.itertuples():
        counts, _, measured_genes = simulate_sample_counts(truth, sample.study, sample.sample)
        counts = counts.tocoo()
        # Genes a study does not measure are zero, as in the combined corpus.
        parts.append(sp.csr_matrix((counts.data, (counts.row, measured_genes[counts.col])), shape=(counts.shape[0], n_genes)))
    counts = sp.vstack(parts, format="csr").astype(np.float32)
    n_counts = np.asarray(counts.sum(axis=1)).ravel()
    kept = n_counts > 0
    return counts[kept], n_counts[kept], truth.genes["gene_symbol"].to_numpy().astype(str)


def stand_in_edge_table(counts: sp.csr_matrix, n_counts: np.ndarray, gene_names: np.ndarray, seed: int) -> pd.DataFrame:
    """gene_i, gene_j, stability: each gene's strongest |Pearson| partners on a cell subsample."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(counts.shape[0], size=min(CORRELATION_CELLS, counts.shape[0]), replace=False)
    expression = np.log1p(counts[cells].toarray() / n_counts[cells, None] * discretization.DEFAULT_TARGET_SUM)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.nan_to_num(np.corrcoef(expression, rowvar=False))
    np.fill_diagonal(correlation, 0.0)
    partners = np.argsort(-np.abs(correlation), axis=1)[:, :NEIGHBOURS_LISTED]
    first = np.repeat(np.arange(gene_names.size), NEIGHBOURS_LISTED)
    second = partners.ravel()
    low, high = np.minimum(first, second), np.maximum(first, second)
    pairs = np.unique(np.stack([low, high], axis=1), axis=0)
    return pd.DataFrame(
        {"gene_i": gene_names[pairs[:, 0]], "gene_j": gene_names[pairs[:, 1]], "stability": correlation[pairs[:, 0], pairs[:, 1]]}
    )


# ------------------------------------------------------------------ the baseline


def histogram_mi(x: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    """Plug-in MI in nats from np.histogram2d, as the original pipeline computed it."""
    joint, _, _ = np.histogram2d(x, y, bins=n_bins, range=[[0, n_bins], [0, n_bins]])
    probability = joint / joint.sum()
    outer = np.outer(probability.sum(axis=1), probability.sum(axis=0))
    positive = probability > 0
    return float(np.sum(probability[positive] * np.log(probability[positive] / outer[positive])))


def histogram_cmi(x: np.ndarray, y: np.ndarray, z: np.ndarray, n_bins: int) -> float:
    """I(X;Y|Z) as the weighted MI of X and Y within each stratum of Z."""
    total = 0.0
    for stratum in range(n_bins):
        in_stratum = z == stratum
        n_in = int(in_stratum.sum())
        if n_in:
            total += n_in / z.size * histogram_mi(x[in_stratum], y[in_stratum], n_bins)
    return total


def baseline_edge(x, y, conditioners, n_bins, n_permutations, stop_after, rng) -> tuple[float, float, float, float]:
    """(mi, p_value, cmi_min, p_value_cmi_min) of one edge with per-edge Python loops."""
    observed_mi = histogram_mi(x, y, n_bins)
    n_exceeding = n_run = 0
    while n_run < n_permutations and n_exceeding < stop_after:
        n_run += 1
        n_exceeding += histogram_mi(rng.permutation(x), y, n_bins) >= observed_mi - 1e-9 * max(1.0, observed_mi)
    p_value = (n_exceeding + 1) / (n_run + 1)
    cmi = [histogram_cmi(x, y, z, n_bins) for z in conditioners]
    best = int(np.argmin(cmi))
    z = conditioners[best]
    strata = [np.flatnonzero(z == stratum) for stratum in range(n_bins)]
    n_exceeding = n_run = 0
    while n_run < n_permutations and n_exceeding < stop_after:
        n_run += 1
        permuted = x.copy()
        for cells in strata:
            permuted[cells] = x[cells[rng.permutation(cells.size)]]
        n_exceeding += histogram_cmi(permuted, y, z, n_bins) >= cmi[best] - 1e-9 * max(1.0, cmi[best])
    return observed_mi, p_value, cmi[best], (n_exceeding + 1) / (n_run + 1)


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="3,000 genes x top-15 on 186k cells")
    parser.add_argument("--top-k", type=int, default=mi_lib.DEFAULT_TOP_K)
    parser.add_argument("--n-permutations", type=int, default=mi_lib.DEFAULT_N_PERMUTATIONS)
    parser.add_argument("--baseline-edges", type=int, default=None, help="edges timed with the baseline (default 24, --full 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    baseline_edges = args.baseline_edges or (3 if args.full else 24)

    started = time.perf_counter()
    config = DemoConfig.scaled(FULL_CELLS, FULL_GENES) if args.full else DemoConfig()
    counts, n_counts, gene_names = simulated_corpus(config)
    edge_table = stand_in_edge_table(counts, n_counts, gene_names, args.seed)
    candidates = mi_lib.candidate_edges(edge_table, top_k=args.top_k)
    print(
        f"corpus {counts.shape[0]:,} cells x {counts.shape[1]:,} genes, {counts.nnz / np.prod(counts.shape):.1%} non-zero; "
        f"{len(candidates):,} candidate edges (top-{args.top_k}); simulated in {time.perf_counter() - started:.0f} s"
    )

    # Compile the kernels outside the timed region.
    warm_up = discretization.discretize_expression(counts[:300], n_counts[:300], gene_names, genes=gene_names[:4])
    warm_up_candidates = pd.DataFrame({"target": gene_names[[0, 0, 1]], "parent": gene_names[[1, 2, 2]], "attention_score": 1.0})
    mi_lib.cmi_tables(warm_up, mi_lib.mi_edge_table(warm_up, warm_up_candidates, n_permutations=20), n_permutations=20)

    started = time.perf_counter()
    genes = np.unique(np.concatenate([candidates["target"], candidates["parent"]]))
    discretized = discretization.discretize_expression(counts, n_counts, gene_names, genes=genes)
    discretize_s = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), time.process_time()
    mi_table = mi_lib.mi_edge_table(discretized, candidates, n_permutations=args.n_permutations, seed=args.seed)
    mi_s = time.perf_counter() - started
    started = time.perf_counter()
    triplets, cmi_edges = mi_lib.cmi_tables(discretized, mi_table, n_permutations=args.n_permutations, seed=args.seed)
    cmi_s = time.perf_counter() - started
    ours_cpu_s = time.process_time() - cpu_started
    n_edges = len(mi_table)
    ours_edges_per_s = n_edges / (mi_s + cmi_s)
    print(
        f"ours: discretise {discretize_s:.1f} s (not in the ratio), MI {mi_s:.1f} s "
        f"(mean {mi_table['n_permutations_run'].mean():.0f} permutations/edge), "
        f"CMI {cmi_s:.1f} s ({len(triplets):,} triplets, mean {cmi_edges['n_permutations_cmi'].mean():.0f} permutations/edge); "
        f"{n_edges:,} edges -> {ours_edges_per_s:,.1f} edges/s ({ours_cpu_s:.0f} CPU s on {numba.get_num_threads()} threads); "
        f"q<=0.05: {(mi_table['q_value'] <= 0.05).mean():.0%}, direct: {cmi_edges['direct'].mean():.0%}"
    )

    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(cmi_edges), size=min(baseline_edges, len(cmi_edges)), replace=False))
    codes = dict(zip(discretized.gene_names, discretized.codes))
    parents_of = cmi_edges.groupby("target")["parent"].agg(list)
    stop_after = mi_lib._stop_after(args.n_permutations, mi_lib.DEFAULT_ALPHA)
    started, cpu_started = time.perf_counter(), time.process_time()
    largest_difference = 0.0
    for edge in cmi_edges.iloc[chosen].itertuples():
        conditioners = [codes[other] for other in parents_of[edge.target] if other != edge.parent]
        mi, _, cmi_min, _ = baseline_edge(
            codes[edge.parent], codes[edge.target], conditioners, discretized.n_bins, args.n_permutations, stop_after, rng
        )
        largest_difference = max(largest_difference, abs(mi - edge.mi), abs(cmi_min - edge.cmi_min))
    baseline_s = time.perf_counter() - started
    baseline_edges_per_s = len(chosen) / baseline_s
    print(
        f"baseline: {len(chosen)} edges in {baseline_s:.1f} s ({time.process_time() - cpu_started:.0f} CPU s) "
        f"-> {baseline_edges_per_s:.3f} edges/s; "
        f"largest |MI or CMI difference| vs ours {largest_difference:.1e} nats"
    )
    ratio = ours_edges_per_s / baseline_edges_per_s
    print(f"RESULT name=mi_cmi ratio={ratio:.1f} edges_per_s={ours_edges_per_s:.1f} goal=20")


if __name__ == "__main__":
    main()
