"""Cells/s of attention block → partial correlation → per-edge moments: ours vs the original pipeline.

The original pipeline handled one cell at a time: cosine similarity of attention rows,
shrinkage toward the identity, ``numpy.linalg.pinv``, partial correlation, then a Python
dict of per-pair Welford states. Ours is the production step
(:func:`scgrn_assets.lib.network.attention.add_attention_blocks` into an
:class:`~scgrn_assets.lib.network.edge_moments.EdgeMomentAccumulator`): the same maths, on
the CPU per cell through LAPACK on one triangle (``syrk``/``potrf``/``potri``: the shrunk
matrix is SPD, so its pseudo-inverse is its inverse) and a numba Welford/Chan loop into
dense per-pair arrays (up to 4,096 genes) or a pair hash map (larger universes); on a GPU
batched on torch. Both run in this process on the same
inputs (256 genes per cell, heads-summed float32 attention blocks, float64 maths), batches
alternating between the two so both see the same load, and the results are compared before
the ratio is printed. The ratio is of wall-clock cells/s; the CPU-time ratio is printed too
(steadier on a shared machine).

``--v1-size`` also times the whole step (model forward → block → pcorr → moments) for a
Geneformer V1-size model with random weights (6 layers, 256 hidden, 4 heads, 2048 tokens);
the goal there is ≥ 1,000 cells/s on an H100. That figure is still unmeasured: no GPU has
been lent to this project's sessions so far.

``--universe N`` sets the gene universe (default 2,000; 20,000 with ``--full``) and also
times the other moment store on the same cells, alternating with the rest: with a large
universe "ours" is the pair hash map (what ``EdgeMomentAccumulator`` picks above 4,096
genes) and "ours-dense" the dense per-pair arrays forced to that size (``--skip-dense``
leaves them out, they take ``n_genes²·12`` bytes); with a small universe "ours" is dense and
"ours-hash" the hash map. Each line gives cells/s, CPU ms per cell and the bytes the moment
state held at its largest; the process's peak RSS covers all of them and the baseline's dict.

Usage::

    python bench/attention_pcorr.py                 # default scale, CPU, < 10 min on 2 cores
    python bench/attention_pcorr.py --full          # more cells
    python bench/attention_pcorr.py --universe 20000          # dense vs hash map vs baseline, real-size universe
    python bench/attention_pcorr.py --device cuda --v1-size
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from scgrn_assets.lib.network.attention import add_attention_blocks, attention_edge_moments
from scgrn_assets.lib.network.edge_moments import DEFAULT_MAX_DENSE_PAIRS, EdgeMomentAccumulator
from scgrn_assets.lib.network.model import SmallGeneformerConfig, build_masked_lm
from scgrn_assets.lib.network.dictionaries import V1, GeneformerDictionaries
from scgrn_assets.lib.network.tokens import TokenizedCells

GOAL = 20
SHRINKAGE = 1e-3


def synthetic_inputs(n_cells: int, n_genes_per_cell: int, n_genes_universe: int, seed: int):
    """Heads-summed attention blocks and the gene of each slot, like the model would give.

    Returns
    -------
    blocks
        Shape (n_cells, n_genes_per_cell, n_genes_per_cell), float32: 4 heads of softmax
        rows, each keeping 30% of its mass on the present genes (the rest went to other tokens).
    gene_ids
        Shape (n_cells, n_genes_per_cell), int64: distinct genes per cell.
    """
    rng = np.random.default_rng(seed)
    blocks = np.zeros((n_cells, n_genes_per_cell, n_genes_per_cell), dtype=np.float32)
    for _head in range(4):
        logits = rng.normal(scale=2.0, size=blocks.shape).astype(np.float32)
        logits -= logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits)
        blocks += 0.3 * weights / weights.sum(axis=-1, keepdims=True)
    gene_ids = np.argsort(rng.random((n_cells, n_genes_universe)), axis=1)[:, :n_genes_per_cell]
    return blocks, gene_ids.astype(np.int64)


def baseline_update(welford: dict[tuple[int, int], list[float]], blocks: np.ndarray, gene_ids: np.ndarray) -> None:
    """The original method as written: one cell at a time, numpy pinv, dict of per-pair Welford states."""
    for block, genes in zip(blocks, gene_ids):
        attention = block.astype(np.float64)
        unit_rows = attention / np.linalg.norm(attention, axis=1, keepdims=True)
        cosine = unit_rows @ unit_rows.T
        shrunk = (1 - SHRINKAGE) * cosine + SHRINKAGE * np.eye(len(genes))
        precision = np.linalg.pinv(shrunk)
        scale = np.sqrt(np.diag(precision))
        pcorr = -precision / np.outer(scale, scale)
        n_slots = len(genes)
        for row in range(n_slots):
            for column in range(row + 1, n_slots):
                gene_a, gene_b = int(genes[row]), int(genes[column])
                key = (gene_a, gene_b) if gene_a < gene_b else (gene_b, gene_a)
                state = welford.get(key)
                if state is None:
                    state = welford[key] = [0, 0.0, 0.0]
                value = pcorr[row, column]
                state[0] += 1
                delta = value - state[1]
                state[1] += delta / state[0]
                state[2] += delta * (value - state[1])


def our_update(accumulator: EdgeMomentAccumulator, blocks: np.ndarray, gene_ids: np.ndarray,
               device: torch.device) -> None:
    """Ours: the production step (:func:`add_attention_blocks`) for one batch of cells.

    The synthetic slots are in rank order, not gene order, so this also pays for sorting
    them by gene and reading each cell's partial correlations out in that order (production
    extracts the block in gene order in the first place). Blocks stay float32, as the model
    gives them; the partial correlation is computed in float64.
    """
    batch_blocks = torch.as_tensor(blocks, device=device)
    batch_genes = torch.as_tensor(gene_ids, device=device)
    valid = torch.ones(batch_genes.shape, dtype=torch.bool, device=device)
    add_attention_blocks(accumulator, batch_blocks, batch_genes, valid, "cosine_shrunk_pinv", dtype=torch.float64,
                         shrinkage=SHRINKAGE)
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timed:
    """One of our moment stores and the time it took."""

    name: str
    accumulator: EdgeMomentAccumulator
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def compare(welford: dict, ours) -> tuple[int, float, float]:
    """Pairs seen by both, largest |Δ mean| and largest |Δ M2| between the two pipelines."""
    keys = np.array(sorted(welford), dtype=np.int64).reshape(-1, 2)
    states = np.array([welford[tuple(key)] for key in keys], dtype=np.float64).reshape(-1, 3)
    if len(keys) != ours.n_edges or not (np.array_equal(keys[:, 0], ours.gene_i)
                                         and np.array_equal(keys[:, 1], ours.gene_j)):
        raise AssertionError("the two pipelines saw different gene pairs")
    if not np.array_equal(states[:, 0].astype(np.int64), ours.n):
        raise AssertionError("the two pipelines counted different cells per pair")
    return len(keys), float(np.abs(states[:, 1] - ours.mean).max()), float(np.abs(states[:, 2] - ours.m2).max())


def v1_size_cells_per_second(n_cells: int, device: torch.device, batch_size: int, autocast: bool) -> float:
    """Whole step (forward → block → pcorr → moments) for a random-weight V1-size model, cells/s."""
    vocab_size = 25_426  # gc30M token dictionary
    config = SmallGeneformerConfig(n_layers=6, hidden_size=256, n_heads=4, intermediate_size=512)
    model = build_masked_lm(vocab_size, V1.model_input_size, config)
    token_dictionary = {"<pad>": 0, "<mask>": 1} | {f"ENSG{token:011d}": token for token in range(2, vocab_size)}
    dictionaries = GeneformerDictionaries(token_dictionary, {}, V1)
    rng = np.random.default_rng(1)
    token_ids = np.concatenate([rng.choice(np.arange(2, vocab_size), V1.model_input_size, replace=False)
                                for _cell in range(n_cells)]).astype(np.int32)
    offsets = np.arange(n_cells + 1, dtype=np.int64) * V1.model_input_size
    cells = TokenizedCells(token_ids, offsets, V1)
    options = dict(batch_size=batch_size, device=device, attn_implementation="sdpa",
                   autocast_dtype=torch.bfloat16 if autocast else None)
    warmup = TokenizedCells(token_ids[: offsets[min(n_cells, batch_size)]], offsets[: min(n_cells, batch_size) + 1], V1)
    attention_edge_moments(model, warmup, dictionaries, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    attention_edge_moments(model, cells, dictionaries, **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_cells / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full scale (more cells, bigger gene universe)")
    parser.add_argument("--device", default=None, help="torch device for ours (default: cuda when present)")
    parser.add_argument("--n-cells", type=int, default=None, help="cells in the comparison")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--v1-size", action="store_true", help="also time the whole step of a V1-size model")
    parser.add_argument("--v1-cells", type=int, default=None, help="cells for --v1-size")
    parser.add_argument("--no-autocast", action="store_true", help="--v1-size forward in float32, not bf16")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both pipelines (BLAS and torch); 1 is fastest on a busy shared machine")
    parser.add_argument("--universe", type=int, default=None,
                        help="genes in the universe; also times the other moment store (dense / hash map)")
    parser.add_argument("--skip-dense", action="store_true",
                        help="with --universe: leave out the forced-dense store of a large universe")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    threadpool_limits(arguments.threads)
    device = torch.device(arguments.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_cells = arguments.n_cells or (1024 if arguments.full else 192)
    n_genes_universe = arguments.universe or (20_000 if arguments.full else 2_000)
    n_genes_per_cell = 256

    blocks, gene_ids = synthetic_inputs(n_cells, n_genes_per_cell, n_genes_universe, seed=0)
    print(f"inputs: {n_cells} cells x {n_genes_per_cell} genes, universe {n_genes_universe} genes, "
          f"device {device}, torch threads {torch.get_num_threads()}", flush=True)

    gene_names = [f"g{index}" for index in range(n_genes_universe)]
    # "ours" is what production picks for this universe; with --universe also the other store.
    stores = {"ours": {}}
    if arguments.universe is not None:
        if n_genes_universe ** 2 <= DEFAULT_MAX_DENSE_PAIRS:
            stores["ours-hash"] = {"max_dense_pairs": 0}
        elif not arguments.skip_dense:
            stores["ours-dense"] = {"max_dense_pairs": n_genes_universe ** 2}
    # Warm up ours (allocator, kernels, numba's compiled-code cache) so the timing is steady-state.
    for options in stores.values():
        warmup = EdgeMomentAccumulator(gene_names, device, **options)
        our_update(warmup, blocks[:8], gene_ids[:8], device)
        warmup.result()
        del warmup
    timed = [Timed(name, EdgeMomentAccumulator(gene_names, device, **options)) for name, options in stores.items()]
    welford: dict[tuple[int, int], list[float]] = {}
    baseline_seconds = baseline_cpu_seconds = 0.0
    # Alternate batches between them so all see the same load on a shared machine.
    for start in range(0, n_cells, arguments.batch_size):
        batch = slice(start, start + arguments.batch_size)
        for store in timed:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            our_update(store.accumulator, blocks[batch], gene_ids[batch], device)
            store.seconds += time.perf_counter() - tick
            store.cpu_seconds += time.process_time() - cpu_tick
        tick, cpu_tick = time.perf_counter(), time.process_time()
        baseline_update(welford, blocks[batch], gene_ids[batch])
        baseline_seconds += time.perf_counter() - tick
        baseline_cpu_seconds += time.process_time() - cpu_tick
        print(f"  {min(start + arguments.batch_size, n_cells)}/{n_cells} cells: "
              + ", ".join(f"{store.name} {store.seconds:.1f} s" for store in timed)
              + f", baseline {baseline_seconds:.1f} s", flush=True)
    results = {}
    for store in timed:
        tick, cpu_tick = time.perf_counter(), time.process_time()
        results[store.name] = store.accumulator.result()
        store.seconds += time.perf_counter() - tick
        store.cpu_seconds += time.process_time() - cpu_tick
    ours = results["ours"]
    our_seconds, our_cpu_seconds = timed[0].seconds, timed[0].cpu_seconds
    our_cells_per_second = n_cells / our_seconds
    baseline_cells_per_second = n_cells / baseline_seconds
    print(f"ours: {our_cells_per_second:.1f} cells/s")
    print(f"baseline: {baseline_cells_per_second:.2f} cells/s")
    if device.type == "cpu":  # on a GPU, CPU time says nothing about ours
        print(f"cpu time: ours {1000 * our_cpu_seconds / n_cells:.2f} ms/cell, baseline "
              f"{1000 * baseline_cpu_seconds / n_cells:.1f} ms/cell, "
              f"ratio {baseline_cpu_seconds / our_cpu_seconds:.1f}")

    n_pairs, mean_difference, m2_difference = compare(welford, ours)
    print(f"agreement: {n_pairs} pairs, max |d mean| {mean_difference:.2e}, max |d M2| {m2_difference:.2e}")
    if arguments.universe is not None:
        for store in timed:
            if store.name != "ours":
                n_pairs, mean_difference, m2_difference = compare(welford, results[store.name])
                print(f"agreement {store.name}: {n_pairs} pairs, max |d mean| {mean_difference:.2e}, "
                      f"max |d M2| {m2_difference:.2e}")
        for store in timed:
            print(f"store {store.name} ({store.accumulator.mode}): {n_cells / store.seconds:.1f} cells/s, "
                  f"cpu {1000 * store.cpu_seconds / n_cells:.2f} ms/cell, "
                  f"state {store.accumulator.state_nbytes / 2**30:.2f} GiB at most")
        print(f"store baseline (dict): {baseline_cells_per_second:.2f} cells/s, "
              f"cpu {1000 * baseline_cpu_seconds / n_cells:.1f} ms/cell")
        print(f"peak RSS (all stores and the baseline together): "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    if arguments.v1_size:
        v1_cells = arguments.v1_cells or (4096 if device.type == "cuda" else 8)
        v1_cells_per_second = v1_size_cells_per_second(v1_cells, device, 32 if device.type == "cuda" else 4,
                                                       autocast=device.type == "cuda" and not arguments.no_autocast)
        print(f"v1_size_whole_step cells={v1_cells} device={device} cells_per_s={v1_cells_per_second:.1f} goal=1000")

    ratio = our_cells_per_second / baseline_cells_per_second
    print(f"RESULT name=attention_pcorr ratio={ratio:.1f} goal={GOAL}")


if __name__ == "__main__":
    main()
