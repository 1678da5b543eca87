"""Cells/s of the cross-cell moment accumulation: ours vs a dense numpy covariance, same cells, same run.

Ours is the production step (:class:`scgrn_assets.lib.network.feature_moments.FeatureMomentAccumulator`):
sparse per-cell rank-value features (256 genes per cell out of the universe), each chunk's outer
products added tile by tile of output rows by a numba loop (nnz² per cell, not n_genes²), plus the
sums Ledoit–Wolf needs. The baseline is what one would
write without it: the cells' features as one dense float64 matrix and ``numpy.cov`` (centring copy and
a full ``gemm``). Both run in this process on the same sparse features, with the same BLAS thread
count, alternating repeat by repeat so both see the same load; their covariances are compared before
the ratio is printed. Building the features from tokens is timed separately (it is the same for both).

It also checks that moments from random splits of the cells merge to the one-pass result within 1e-9.

``--full`` also times ours alone on 186,000 cells × a 3,000-gene universe × 256 tokens per cell, tokens
to moments (the goal: within 2 minutes on 2 cores); the baseline would need a 4.5 GB dense matrix there.

Usage::

    python bench/network_pcorr.py            # ~1 minute on 2 cores
    python bench/network_pcorr.py --full     # + the 186k-cell pass (a few minutes)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from scgrn_assets.lib.network.cell_features import rank_value_features
from scgrn_assets.lib.network.feature_moments import FeatureMoments, accumulate_feature_moments

GOAL = 5


def synthetic_tokens(n_cells: int, n_vocab: int, tokens_per_cell: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR-style token lists: each cell's ``tokens_per_cell`` distinct genes, drawn with a Zipf-like
    skew (frequent genes in most cells, as real rank-value cells are), in a random rank order."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_vocab + 1) ** 0.6
    weights /= weights.sum()
    # Gumbel top-k: distinct genes per cell, drawn proportionally to the weights, vectorised.
    token_ids = np.empty((n_cells, tokens_per_cell), dtype=np.int32)
    for start in range(0, n_cells, 4096):
        stop = min(start + 4096, n_cells)
        keys = np.log(weights)[None, :] + rng.gumbel(size=(stop - start, n_vocab))
        token_ids[start:stop] = np.argpartition(-keys, tokens_per_cell - 1, axis=1)[:, :tokens_per_cell]
    return token_ids.ravel(), np.arange(n_cells + 1, dtype=np.int64) * tokens_per_cell


def features_of(token_ids, offsets, n_genes, max_genes, chunk_size=2048):
    columns = np.arange(n_genes)
    is_gene = np.ones(n_genes, dtype=bool)
    chunks = []
    for start in range(0, len(offsets) - 1, chunk_size):
        stop = min(start + chunk_size, len(offsets) - 1)
        piece = offsets[start: stop + 1]
        chunks.append(rank_value_features(token_ids[piece[0]: piece[-1]], piece, columns, is_gene, n_genes,
                                          max_genes))
    return chunks


def ours(chunks, genes) -> tuple[float, float, FeatureMoments]:
    start, cpu_start = time.perf_counter(), time.process_time()
    moments = accumulate_feature_moments(chunks, genes)
    return time.perf_counter() - start, time.process_time() - cpu_start, moments


def dense_numpy(chunks) -> tuple[float, float, np.ndarray]:
    start, cpu_start = time.perf_counter(), time.process_time()
    dense = sp.vstack(chunks).toarray()
    covariance = np.cov(dense, rowvar=False, bias=True)
    return time.perf_counter() - start, time.process_time() - cpu_start, covariance


def merge_check(chunks, genes, seed: int) -> float:
    """Largest |difference| between the one-pass moments and those of 4 random splits merged."""
    matrix = sp.vstack(chunks).tocsr()
    one_pass = accumulate_feature_moments([matrix], genes)
    part_of = np.random.default_rng(seed).integers(0, 4, size=matrix.shape[0])
    merged = None
    for part in range(4):
        rows = matrix[np.flatnonzero(part_of == part)]
        piece = accumulate_feature_moments([rows[s: s + 777] for s in range(0, rows.shape[0], 777)], genes)
        merged = piece if merged is None else merged.merged(piece)
    return max(float(np.abs(merged.cross_product - one_pass.cross_product).max()),
               float(np.abs(merged.feature_sum - one_pass.feature_sum).max()),
               float(np.abs(merged.norm2_weighted_sum - one_pass.norm2_weighted_sum).max()),
               abs(merged.norm4_sum - one_pass.norm4_sum) / max(one_pass.norm4_sum, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="also the 186k cells x 3,000 genes x 256 tokens pass")
    parser.add_argument("--n-cells", type=int, default=8000, help="cells in the ours-vs-numpy comparison")
    parser.add_argument("--universe", type=int, default=3000, help="genes in the universe")
    parser.add_argument("--tokens", type=int, default=256, help="genes per cell")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads for both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    genes = [f"g{i}" for i in range(args.universe)]
    token_ids, offsets = synthetic_tokens(args.n_cells, args.universe, args.tokens, args.seed)
    start = time.perf_counter()
    chunks = features_of(token_ids, offsets, args.universe, args.tokens)
    feature_seconds = time.perf_counter() - start
    print(f"{args.n_cells} cells x {args.universe} genes x {args.tokens} tokens; BLAS threads {args.threads}")
    print(f"tokens -> rank-value features: {args.n_cells / feature_seconds:,.0f} cells/s")
    ours_times, numpy_times, ours_cpu, numpy_cpu = [], [], [], []
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for _ in range(args.repeats):
            seconds, cpu_seconds, moments = ours(chunks, genes)
            ours_times.append(seconds)
            ours_cpu.append(cpu_seconds)
            seconds, cpu_seconds, covariance = dense_numpy(chunks)
            numpy_times.append(seconds)
            numpy_cpu.append(cpu_seconds)
        difference = float(np.abs(moments.scatter() / moments.n_cells - covariance).max())
        if difference > 1e-9:
            raise SystemExit(f"ours and numpy disagree: max |difference| {difference:.3g}")
        merge_error = merge_check(chunks, genes, args.seed)
    ours_rate = args.n_cells / np.median(ours_times)
    numpy_rate = args.n_cells / np.median(numpy_times)
    print(f"ours (tiled sparse outer products or dsyrk): {ours_rate:,.0f} cells/s (median of {args.repeats})")
    print(f"dense numpy covariance:                {numpy_rate:,.0f} cells/s")
    # CPU seconds are less moved than wall time by other work on a shared machine.
    print(f"CPU time per cell: ours {np.median(ours_cpu) / args.n_cells * 1e6:.1f} us, numpy "
          f"{np.median(numpy_cpu) / args.n_cells * 1e6:.1f} us (CPU-time ratio "
          f"{np.median(numpy_cpu) / np.median(ours_cpu):.2f})")
    print(f"covariances agree: max |difference| {difference:.2e}")
    print(f"random 4-way split merged vs one pass: max |difference| {merge_error:.2e} "
          f"({'within' if merge_error <= 1e-9 else 'NOT within'} 1e-9)")

    if args.full:
        n_full = 186_000
        print(f"full pass: {n_full} cells x 3000 genes x 256 tokens, tokens -> moments ...", flush=True)
        full_genes = [f"g{i}" for i in range(3000)]
        seconds, done, merged = 0.0, 0, None
        with threadpool_limits(limits=args.threads, user_api="blas"):
            for block_start in range(0, n_full, 20_000):
                n_block = min(20_000, n_full - block_start)
                block_tokens, block_offsets = synthetic_tokens(n_block, 3000, 256, args.seed + 1 + block_start)
                start = time.perf_counter()  # drawing the synthetic tokens is not part of the step
                block = accumulate_feature_moments(features_of(block_tokens, block_offsets, 3000, 256), full_genes)
                merged = block if merged is None else merged.merged(block)
                seconds += time.perf_counter() - start
                done += n_block
        print(f"full pass: {done} cells, tokens -> features -> moments in {seconds:.1f} s "
              f"({done / seconds:,.0f} cells/s); goal <= 120 s on 2 cores: {'met' if seconds <= 120 else 'NOT met'}")
    print(f"RESULT name=network_pcorr ratio={ours_rate / numpy_rate:.2f} goal={GOAL}")


if __name__ == "__main__":
    main()
