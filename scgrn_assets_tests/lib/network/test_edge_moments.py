"""Streaming edge moments in every store, merged exactly, against a two-pass computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scgrn_assets.lib.network.edge_moments import EdgeMomentAccumulator, EdgeMoments, merge_edge_moments
from scgrn_assets_tests.support.network import ACCUMULATORS, moments_frame


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_observations(seed: int, n_genes: int = 15, n_values: int = 3000):
    rng = np.random.default_rng(seed)
    gene_a = rng.integers(0, n_genes, n_values)
    gene_b = rng.integers(0, n_genes, n_values)
    distinct = gene_a != gene_b
    gene_a, gene_b = gene_a[distinct], gene_b[distinct]
    # A large common offset makes naive sum-of-squares formulas lose precision; two-pass does not.
    values = 5.0 + rng.normal(0, 0.01, len(gene_a)) + 0.001 * gene_a
    return gene_a, gene_b, values


def two_pass_reference(names: np.ndarray, gene_a, gene_b, values) -> pd.DataFrame:
    first, second = names[gene_a], names[gene_b]
    frame = pd.DataFrame({"i": np.where(first < second, first, second), "j": np.where(first < second, second, first),
                          "value": values})
    grouped = frame.groupby(["i", "j"])["value"]
    return pd.DataFrame({"n": grouped.size(), "mean": grouped.mean(), "sd": grouped.std(ddof=1),
                         "m2": grouped.apply(lambda column: float(((column - column.mean()) ** 2).sum()))})


@pytest.mark.parametrize(("max_dense_pairs", "backend"), ACCUMULATORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_moments_equal_two_pass_of_concatenated_data(seed, max_dense_pairs, backend):
    names = np.array([f"gene{index:02d}" for index in range(15)])
    gene_a, gene_b, values = random_observations(seed)
    reference = two_pass_reference(names, gene_a, gene_b, values)
    rng = np.random.default_rng(seed + 100)
    cuts = np.sort(rng.choice(np.arange(1, len(values)), size=5, replace=False))
    parts = []
    for part_index, part in enumerate(np.split(rng.permutation(len(values)), cuts)):
        # Each part (study/machine) numbers genes its own way: a shuffled universe.
        order = rng.permutation(len(names))
        position = np.argsort(order)
        # Odd parts start the hash map at 2 slots: it is rebuilt many times, mid-batch.
        accumulator = EdgeMomentAccumulator(names[order], max_dense_pairs=max_dense_pairs,
                                            initial_capacity=2 if part_index % 2 else 2**16, backend=backend)
        for batch in np.array_split(part, 3):
            accumulator.add(torch.as_tensor(position[gene_a[batch]]), torch.as_tensor(position[gene_b[batch]]),
                            torch.as_tensor(values[batch]))
        parts.append(accumulator.result())
    merged = merge_edge_moments(parts)
    assert np.all(merged.gene_i < merged.gene_j)
    got = moments_frame(merged)
    assert got.index.equals(reference.index)
    np.testing.assert_array_equal(got["n"], reference["n"])
    np.testing.assert_allclose(got["mean"], reference["mean"], rtol=1e-13)
    np.testing.assert_allclose(got["m2"], reference["m2"], rtol=1e-8, atol=1e-14)
    # Pairwise merge (EdgeMoments.merge) agrees with the k-way merge.
    pairwise = parts[0]
    for part in parts[1:]:
        pairwise = pairwise.merge(part)
    np.testing.assert_allclose(moments_frame(pairwise)["m2"], got["m2"], rtol=1e-10, atol=1e-14)


def test_add_triangles_refuses_unsorted_genes():
    accumulator = EdgeMomentAccumulator([f"g{index}" for index in range(5)])
    with pytest.raises(ValueError, match="ascending"):
        accumulator.add_triangles(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[0, 3, 2]]), torch.tensor([3]))


def test_moments_npz_roundtrip(tmp_path):
    names = np.array(["a", "b", "c"])
    moments = EdgeMoments(names, np.array([0, 1], np.int32), np.array([2, 2], np.int32), np.array([3, 1]),
                          np.array([0.5, -0.25]), np.array([0.1, 0.0]))
    loaded = EdgeMoments.load_npz(moments.save_npz(tmp_path / "moments.npz"))
    for field in ("gene_names", "gene_i", "gene_j", "n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(moments, field))
    assert [path.name for path in tmp_path.iterdir()] == ["moments.npz"]
