"""The pair hash map behind large gene universes, against the dense accumulator and independent numpy references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import threadpoolctl
import torch

import scgrn_assets.lib.network.attention as attention_network
from scgrn_assets.lib.network.attention import add_attention_blocks, attention_edge_moments, edge_table
from scgrn_assets.lib.network.edge_moments import EdgeMomentAccumulator, EdgeMoments, merge_edge_moments
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.pair_moments import PairMomentHashMap
from scgrn_assets_tests.support.network import (PCORR_ATOL, PCORR_RTOL, numpy_pcorr, random_blocks,
                                                tiny_model_and_cells)

UNIVERSE = 30_000  # a real corpus: 30,000² pairs would take 10.8 GB of dense state
SHRINKAGE = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def skewed_cells(n_cells: int, seed: int, n_genes: int = UNIVERSE, min_genes: int = 10, max_genes: int = 256):
    """Distinct genes per cell, 10–256 of them: half from 300 "housekeeping" genes spread over the
    universe (the first and last gene among them), so pairs repeat across cells, half uniform."""
    rng = np.random.default_rng(seed)
    hot = np.unique(np.concatenate([[0, n_genes - 1], rng.choice(n_genes, 298, replace=False)]))
    cells = []
    for _cell in range(n_cells):
        k = int(rng.integers(min_genes, max_genes + 1))
        genes = np.unique(np.concatenate([rng.choice(hot, k // 2, replace=False),
                                          rng.choice(n_genes, k, replace=False)]))
        cells.append(rng.permutation(genes)[:k])
    return cells


def triangle_batch(cells: list[np.ndarray], seed: int):
    """Genes sorted per cell (padded with -1), valid counts and random values in triangle form."""
    rng = np.random.default_rng(seed)
    n_slots = max(len(genes) for genes in cells)
    sorted_genes = np.full((len(cells), n_slots), -1, dtype=np.int64)
    n_valid = np.array([len(genes) for genes in cells], dtype=np.int64)
    for cell, genes in enumerate(cells):
        sorted_genes[cell, : len(genes)] = np.sort(genes)
    # A large common offset: naive sum-of-squares formulas would lose the variance, Welford does not.
    values = 3.0 + rng.normal(0, 0.05, size=(len(cells), n_slots * (n_slots - 1) // 2))
    return sorted_genes, n_valid, values


def triangle_observations(sorted_genes, n_valid, values) -> pd.DataFrame:
    """Every (low, high, value) of the triangle batch, written out one cell at a time."""
    rows = []
    for cell in range(len(n_valid)):
        columns, lows = np.tril_indices(n_valid[cell], -1)  # j > i; pair (i, j) sits at j·(j − 1)/2 + i
        rows.append(pd.DataFrame({"i": sorted_genes[cell, lows], "j": sorted_genes[cell, columns],
                                  "value": values[cell, columns * (columns - 1) // 2 + lows]}))
    return pd.concat(rows, ignore_index=True)


def two_pass(observations: pd.DataFrame) -> pd.DataFrame:
    """n, mean and M2 = Σ (x − mean)² per pair, the mean computed first (two passes)."""
    grouped = observations.groupby(["i", "j"])["value"]
    mean = grouped.transform("mean")
    frame = pd.DataFrame({"n": grouped.size(), "mean": grouped.mean(),
                          "m2": ((observations["value"] - mean) ** 2).groupby([observations["i"],
                                                                               observations["j"]]).sum()})
    return frame.sort_index()


def named(moments: EdgeMoments) -> pd.DataFrame:
    names = moments.gene_names
    return pd.DataFrame({"i": names[moments.gene_i], "j": names[moments.gene_j], "n": moments.n,
                         "mean": moments.mean, "m2": moments.m2}).set_index(["i", "j"])


def gene_names(n_genes: int = UNIVERSE) -> np.ndarray:
    return np.array([f"ENSG{index:011d}" for index in range(n_genes)])  # sorted like their indices


def test_large_universe_picks_the_hash_map_and_small_the_dense_arrays():
    assert EdgeMomentAccumulator(gene_names()).mode == "hash"
    assert EdgeMomentAccumulator(gene_names(4096)).mode == "dense-numba"
    assert EdgeMomentAccumulator(gene_names(4096), max_dense_pairs=0).mode == "hash"


@pytest.mark.parametrize(("threads", "initial_capacity"), [(1, 2**16), (1, 2), (3, 2)],
                         ids=["one-shard", "forced-rehash", "three-shards-rehash"])
def test_hash_map_equals_dense_accumulator_bit_for_bit(threads, initial_capacity):
    cells = skewed_cells(40, seed=0)
    sorted_genes, n_valid, values = triangle_batch(cells, seed=1)
    names = gene_names()
    hashed = EdgeMomentAccumulator(names, threads=threads, initial_capacity=initial_capacity)
    assert hashed.mode == "hash"
    # The dense accumulator over the genes present (a few thousand): same order, so the same pairs.
    present = np.unique(np.concatenate(cells))
    dense = EdgeMomentAccumulator(names[present])
    assert dense.mode == "dense-numba"
    compact = np.where(sorted_genes >= 0, np.searchsorted(present, np.clip(sorted_genes, 0, None)), -1)
    for batch in np.array_split(np.arange(len(cells)), 4):
        hashed.add_triangles(torch.as_tensor(values[batch]), torch.as_tensor(sorted_genes[batch]),
                             torch.as_tensor(n_valid[batch]))
        dense.add_triangles(torch.as_tensor(values[batch]), torch.as_tensor(compact[batch]),
                            torch.as_tensor(n_valid[batch]))
    got, want = hashed.result(), dense.result()
    assert got.n_edges == want.n_edges > 0
    assert got.n.max() > 5  # the housekeeping pairs repeat
    np.testing.assert_array_equal(names[got.gene_i], want.gene_names[want.gene_i])
    np.testing.assert_array_equal(names[got.gene_j], want.gene_names[want.gene_j])
    for field in ("n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.gene_i.dtype == np.int32 and got.n.dtype == np.int64
    # Sorted by (gene_i, gene_j), gene_i < gene_j; the largest index of the universe is used.
    assert np.all(got.gene_i < got.gene_j)
    assert np.all(np.diff(got.gene_i.astype(np.int64) * UNIVERSE + got.gene_j) > 0)
    assert got.gene_j.max() == UNIVERSE - 1 and got.gene_i.min() == 0
    table = hashed._hash
    assert table.load() <= table.max_load
    if initial_capacity == 2:  # grown from 2 slots: to fit the first cell, then doubling
        assert table.n_rehashes >= 3 and table.capacity >= 2 * table.n_pairs / threads
    # Against the values written out one by one and a two-pass mean and M2.
    reference = two_pass(triangle_observations(sorted_genes, n_valid, values))
    frame = pd.DataFrame({"i": got.gene_i, "j": got.gene_j, "n": got.n, "mean": got.mean,
                          "m2": got.m2}).set_index(["i", "j"])
    assert frame.index.equals(reference.index)
    np.testing.assert_array_equal(frame["n"], reference["n"])
    np.testing.assert_allclose(frame["mean"], reference["mean"], rtol=1e-14)
    np.testing.assert_allclose(frame["m2"], reference["m2"], rtol=1e-9, atol=1e-15)


def test_attention_blocks_on_a_large_universe_match_numpy_pinv_and_two_pass_reference():
    # 30 cells of 10–256 genes from 30,000: each cell's block in slot (rank) order, genes unsorted.
    cells = skewed_cells(30, seed=2)
    n_slots = max(len(genes) for genes in cells)
    blocks = random_blocks(len(cells), n_slots, seed=3).astype(np.float32)
    gene_index = np.full((len(cells), n_slots), -7, dtype=np.int64)  # padding is never read
    valid = np.zeros((len(cells), n_slots), dtype=bool)
    rows = []
    for cell, genes in enumerate(cells):
        gene_index[cell, : len(genes)] = genes
        valid[cell, : len(genes)] = True
        pcorr = numpy_pcorr(blocks[cell, : len(genes), : len(genes)].astype(np.float64))
        first, second = np.triu_indices(len(genes), 1)
        rows.append(pd.DataFrame({"i": np.minimum(genes[first], genes[second]),
                                  "j": np.maximum(genes[first], genes[second]), "value": pcorr[first, second]}))
    reference = two_pass(pd.concat(rows, ignore_index=True))
    names = gene_names()
    reference.index = pd.MultiIndex.from_arrays([names[reference.index.get_level_values(0)],
                                                 names[reference.index.get_level_values(1)]], names=["i", "j"])
    assert reference["n"].max() > 5

    rng = np.random.default_rng(4)
    parts = []
    for part_index, part in enumerate(np.split(rng.permutation(len(cells)), [9, 20])):
        # Each machine numbers the genes its own way; odd ones start the map at 2 slots.
        numbering = rng.permutation(UNIVERSE)
        local = np.where(valid[part], np.argsort(numbering)[np.clip(gene_index[part], 0, None)], -1)
        accumulator = EdgeMomentAccumulator(names[numbering], initial_capacity=2 if part_index % 2 else 2**16,
                                            threads=1 + part_index)
        assert accumulator.mode == "hash"
        for batch in np.array_split(np.arange(len(part)), 2):
            add_attention_blocks(accumulator, torch.as_tensor(blocks[part][batch]), torch.as_tensor(local[batch]),
                                 torch.as_tensor(valid[part][batch]), shrinkage=SHRINKAGE)
        parts.append(accumulator.result())

    merged = merge_edge_moments(parts)
    assert np.all(merged.gene_i < merged.gene_j)
    assert np.all(np.diff(merged.gene_i.astype(np.int64) * len(merged.gene_names) + merged.gene_j) > 0)
    # The same merge streamed into one accumulator with add_moments (Chan et al.).
    streamed = EdgeMomentAccumulator(names, initial_capacity=2)
    for part in parts:
        streamed.add_moments(part)
    for moments in (merged, streamed.result()):
        got = named(moments).sort_index()
        assert got.index.equals(reference.index)
        np.testing.assert_array_equal(got["n"], reference["n"])
        np.testing.assert_allclose(got["mean"], reference["mean"], rtol=PCORR_RTOL, atol=PCORR_ATOL)
        np.testing.assert_allclose(got["m2"], reference["m2"], rtol=1e-8, atol=1e-10)


def test_add_values_with_repeats_and_rehash_mid_batch():
    rng = np.random.default_rng(5)
    hot = rng.choice(UNIVERSE, 60, replace=False)
    gene_a = np.concatenate([rng.choice(hot, 20_000), rng.integers(0, UNIVERSE, 5_000)])
    gene_b = np.concatenate([rng.choice(hot, 20_000), rng.integers(0, UNIVERSE, 5_000)])
    keep = gene_a != gene_b
    gene_a, gene_b = gene_a[keep], gene_b[keep]
    values = -2.0 + rng.normal(0, 0.1, len(gene_a))
    reference = two_pass(pd.DataFrame({"i": np.minimum(gene_a, gene_b), "j": np.maximum(gene_a, gene_b),
                                       "value": values}))
    results = []
    for initial_capacity in (2, 2**20):
        accumulator = EdgeMomentAccumulator(gene_names(), initial_capacity=initial_capacity)
        for batch in np.array_split(np.arange(len(values)), 3):
            accumulator.add(torch.as_tensor(gene_a[batch]), torch.as_tensor(gene_b[batch]),
                            torch.as_tensor(values[batch]))
        results.append(accumulator.result())
        # From 2 slots the map is rebuilt one doubling at a time, in the middle of batches.
        assert accumulator._hash.n_rehashes == (0 if initial_capacity > 2 else
                                                int(np.ceil(np.log2(accumulator._hash.n_pairs / 0.5))) - 1)
    assert results[0].n_edges == len(reference)
    for field in ("gene_i", "gene_j", "n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(results[0], field), getattr(results[1], field))
    frame = pd.DataFrame({"i": results[0].gene_i, "j": results[0].gene_j, "n": results[0].n,
                          "mean": results[0].mean, "m2": results[0].m2}).set_index(["i", "j"])
    assert frame.index.equals(reference.index)
    np.testing.assert_array_equal(frame["n"], reference["n"])
    np.testing.assert_allclose(frame["mean"], reference["mean"], rtol=1e-13)
    np.testing.assert_allclose(frame["m2"], reference["m2"], rtol=1e-9)


def test_hash_result_saves_loads_and_makes_an_edge_table(tmp_path):
    cells = skewed_cells(6, seed=6, max_genes=40)
    sorted_genes, n_valid, values = triangle_batch(cells, seed=7)
    accumulator = EdgeMomentAccumulator(gene_names(), initial_capacity=2)
    accumulator.add_triangles(torch.as_tensor(values), torch.as_tensor(sorted_genes), torch.as_tensor(n_valid))
    moments = accumulator.result()
    loaded = EdgeMoments.load_npz(moments.save_npz(tmp_path / "moments.npz"))
    for field in ("gene_names", "gene_i", "gene_j", "n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(moments, field))
    assert [path.name for path in tmp_path.iterdir()] == ["moments.npz"]
    table = edge_table(loaded)
    assert len(table) == moments.n_edges and (table["gene_i"] < table["gene_j"]).all()
    assert table["n_cells"].sum() == sum(k * (k - 1) // 2 for k in n_valid)


def test_add_moments_refuses_genes_outside_the_universe_and_the_map_refuses_bad_pairs():
    moments = EdgeMoments(np.array(["a", "zz"]), np.array([0], np.int32), np.array([1], np.int32),
                          np.array([2]), np.array([0.5]), np.array([0.1]))
    with pytest.raises(ScgrnInputError, match="outside"):
        EdgeMomentAccumulator(["a", "b"], max_dense_pairs=0).add_moments(moments)
    table = PairMomentHashMap(10)
    with pytest.raises(ValueError, match="low < high"):
        table.add_values(np.array([3]), np.array([3]), np.array([1.0]))
    with pytest.raises(ValueError, match="max_load"):
        PairMomentHashMap(10, max_load=0.95)


def test_attention_edge_moments_holds_blas_to_its_threads(monkeypatch):
    model, cells, dictionaries = tiny_model_and_cells(n_cells=6, seed=3)
    seen = []
    original = attention_network.add_attention_blocks

    def recording(*args, **kwargs):
        seen.append({info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"})
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_network, "add_attention_blocks", recording)
    before = {info["filepath"]: info["num_threads"] for info in threadpoolctl.threadpool_info()}
    with threadpoolctl.threadpool_limits(limits=3, user_api="blas"):
        moments = attention_edge_moments(model, cells, dictionaries, max_genes=6, batch_size=2, device="cpu",
                                         threads=1, max_dense_pairs=0)
        assert {info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"} == {3}
    assert seen and all(threads == {1} for threads in seen)
    assert {info["filepath"]: info["num_threads"] for info in threadpoolctl.threadpool_info()} == before
    assert moments.n_edges > 0


@pytest.mark.parametrize(("max_dense_pairs", "backend"), [(2**24, "numba"), (2**24, "torch"), (0, "auto")],
                         ids=["dense-numba", "dense-torch", "hash"])
def test_add_moments_merges_parts_exactly_in_every_store(max_dense_pairs, backend):
    # Parts with n = 1 (Welford's form) and n > 1 (Chan's), genes numbered differently per part.
    rng = np.random.default_rng(8)
    names = gene_names(40)
    gene_a, gene_b = rng.integers(0, 40, 4000), rng.integers(0, 40, 4000)
    keep = gene_a != gene_b
    gene_a, gene_b = gene_a[keep], gene_b[keep]
    values = 7.0 + rng.normal(0, 0.01, len(gene_a))
    reference = two_pass(pd.DataFrame({"i": names[np.minimum(gene_a, gene_b)], "j": names[np.maximum(gene_a, gene_b)],
                                       "value": values}))
    accumulator = EdgeMomentAccumulator(names, max_dense_pairs=max_dense_pairs, backend=backend, initial_capacity=2)
    assert accumulator.mode == {"numba": "dense-numba", "torch": "dense-torch", "auto": "hash"}[backend]
    for part in np.array_split(rng.permutation(len(values)), [5, 6, 900, 2500]):
        numbering = rng.permutation(40)
        position = np.argsort(numbering)
        source = EdgeMomentAccumulator(names[numbering])
        source.add(torch.as_tensor(position[gene_a[part]]), torch.as_tensor(position[gene_b[part]]),
                   torch.as_tensor(values[part]))
        accumulator.add_moments(source.result())
    got = named(accumulator.result()).sort_index()
    assert got.index.equals(reference.index)
    np.testing.assert_array_equal(got["n"], reference["n"])
    np.testing.assert_allclose(got["mean"], reference["mean"], rtol=1e-13)
    np.testing.assert_allclose(got["m2"], reference["m2"], rtol=1e-8, atol=1e-15)
