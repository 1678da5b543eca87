"""Tests of the MI / CMI library against independent computations (sklearn, scipy, loops)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from sklearn.metrics import mutual_info_score

from scgrn_assets.lib.validation import _kernels, discretization, estimators
from scgrn_assets.lib.validation import mutual_information as mi_lib
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets_tests.support.validation import N_BINS, sparse_like_codes


# ------------------------------------------------------------------ candidate edges


def test_candidate_edges_match_a_loop_over_genes():
    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(12)]
    rows = []
    for _ in range(80):
        first, second = sorted(rng.choice(genes, size=2, replace=False))
        rows.append((first, second, rng.normal()))
    edge_table = pd.DataFrame(rows, columns=["gene_i", "gene_j", "stability"])
    candidates = mi_lib.candidate_edges(edge_table, top_k=3)
    for gene in genes:
        best: dict[str, float] = {}
        for first, second, stability in rows:
            if gene in (first, second):
                other = second if gene == first else first
                best[other] = max(best.get(other, 0.0), abs(stability))
        expected = sorted(best.items(), key=lambda item: (-item[1], item[0]))[:3]
        got = candidates[candidates["target"] == gene]
        assert list(got["parent"]) == [name for name, _ in expected]
        np.testing.assert_allclose(got["attention_score"], [score for _, score in expected])


def test_candidate_edges_names_missing_columns():
    with pytest.raises(ScgrnInputError, match="stability"):
        mi_lib.candidate_edges(pd.DataFrame({"gene_i": ["A"], "gene_j": ["B"]}))


# ------------------------------------------------------------------ multiple testing


def test_benjamini_hochberg_equals_scipy():
    p_values = np.random.default_rng(8).random(200) ** 3
    np.testing.assert_allclose(mi_lib.benjamini_hochberg(p_values), stats.false_discovery_control(p_values))


def test_benjamini_hochberg_leaves_nan_out_of_the_tests():
    p_values = np.array([0.01, np.nan, 0.04, 0.03, np.nan])
    q_values = mi_lib.benjamini_hochberg(p_values)
    assert np.isnan(q_values[[1, 4]]).all()
    # Three tests: sorted p 0.01, 0.03, 0.04 scaled by 3/rank: 0.03, 0.045, 0.04 -> step-up 0.03, 0.04, 0.04.
    np.testing.assert_allclose(q_values[[0, 2, 3]], [0.03, 0.04, 0.04])


# ------------------------------------------------------------------ random draws


@pytest.mark.parametrize(
    "n_good, n_bad, n_sample",
    [(5, 7, 4), (40, 60, 30), (300, 15000, 2000), (9000, 4000, 12995), (20, 30, 45)],
)
def test_hypergeometric_draws_follow_scipy(n_good, n_bad, n_sample):
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n_good + n_bad + 1)))])
    state = _kernels.stream_state(11, 3)
    draws = np.array([_kernels.hypergeometric(state, n_good, n_bad, n_sample, log_factorial) for _ in range(6000)])
    reference = stats.hypergeom(n_good + n_bad, n_good, n_sample)
    # Chi-squared goodness of fit on the central values, tails pooled.
    low, high = reference.ppf(0.005), reference.ppf(0.995)
    support = np.arange(low, high + 1)
    observed = np.array([(draws < low).sum()] + [(draws == k).sum() for k in support] + [(draws > high).sum()])
    expected = np.concatenate([[reference.cdf(low - 1)], reference.pmf(support), [reference.sf(high)]]) * draws.size
    keep = expected > 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    keep = expected > 0
    assert stats.chisquare(observed[keep], expected[keep] * observed.sum() / expected[keep].sum()).pvalue > 1e-3


def test_random_tables_keep_margins_and_match_explicit_permutations():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 3, size=120)
    y = rng.integers(0, 4, size=120)
    rows = np.bincount(x, minlength=3).astype(np.int64)
    columns = np.bincount(y, minlength=4).astype(np.int64)
    k = np.arange(121, dtype=float)
    klogk = k * np.log(np.maximum(k, 1))
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(k[1:]))])
    state = _kernels.stream_state(0, 0)
    column_left = np.empty(4, dtype=np.int64)
    drawn = [_kernels.random_table_term(state, rows, columns, column_left, klogk, log_factorial, False) for _ in range(4000)]
    permuted = []
    for _ in range(4000):
        table = np.bincount(rng.permutation(x) * 4 + y, minlength=12)
        permuted.append(float(np.sum(klogk[table])))
    assert stats.ks_2samp(drawn, permuted).pvalue > 1e-3


# ------------------------------------------------------------------ edge tables


def independent_data(n_genes: int, n_cells: int, seed: int):
    rng = np.random.default_rng(seed)
    codes = sparse_like_codes(rng, n_genes, n_cells)
    names = np.array([f"g{i:03d}" for i in range(n_genes)])
    discretized = discretization.DiscretizedGenes(gene_names=names, codes=codes, n_bins=N_BINS)
    # Disjoint pairs, so that the p-values are independent draws.
    candidates = pd.DataFrame({"target": names[0::2], "parent": names[1::2], "attention_score": 1.0})
    return discretized, candidates


def test_permutation_p_values_are_uniform_under_independence():
    discretized, candidates = independent_data(n_genes=600, n_cells=300, seed=10)
    table = mi_lib.mi_edge_table(discretized, candidates, n_permutations=199, alpha=1.0, seed=1)
    assert (table["n_permutations_run"] == 199).all()
    assert stats.kstest(table["p_value"], "uniform").pvalue > 0.01


def test_early_stopping_keeps_every_decision_and_saves_permutations():
    discretized, candidates = independent_data(n_genes=400, n_cells=300, seed=11)
    # Make a few edges dependent so that both decisions occur.
    codes = discretized.codes
    codes[1:40:2] = codes[0:40:2]
    full = mi_lib.mi_edge_table(discretized, candidates, n_permutations=300, alpha=1.0, seed=2)
    stopped = mi_lib.mi_edge_table(discretized, candidates, n_permutations=300, alpha=0.05, seed=2)
    np.testing.assert_array_equal(stopped["p_value"] <= 0.05, full["p_value"] <= 0.05)
    assert (stopped["p_value"] <= 0.05).sum() >= 20
    assert stopped["n_permutations_run"].mean() < 0.5 * full["n_permutations_run"].mean()
    assert stats.kstest(stopped["p_value"][20:], "uniform").pvalue > 0.01


def test_mi_edge_table_is_symmetric_and_reports_progress():
    rng = np.random.default_rng(12)
    codes = sparse_like_codes(rng, 6, 500)
    codes[1] = np.where(rng.random(500) < 0.7, codes[0], codes[1])
    names = np.array(list("ABCDEF"))
    discretized = discretization.DiscretizedGenes(gene_names=names, codes=codes, n_bins=N_BINS)
    candidates = pd.DataFrame(
        {"target": ["A", "B", "C", "D"], "parent": ["B", "A", "D", "C"], "attention_score": [0.9, 0.9, 0.1, 0.1]}
    )
    calls = []
    table = mi_lib.mi_edge_table(
        discretized, candidates, n_permutations=200, progress=lambda done, total: calls.append((done, total))
    )
    assert table["mi"][0] == table["mi"][1] and table["p_value"][0] == table["p_value"][1]
    # BH runs over the two distinct pairs, not over the four rows.
    np.testing.assert_allclose(table["q_value"][[0, 2]], stats.false_discovery_control(table["p_value"][[0, 2]]))
    assert table["mi"][0] == pytest.approx(mutual_info_score(codes[0], codes[1]))
    assert table["p_value"][0] == pytest.approx(1 / 201)
    assert calls[-1] == (2, 2)


def test_without_permutations_p_values_are_the_g_test_and_no_row_is_dropped():
    rng = np.random.default_rng(13)
    codes = sparse_like_codes(rng, 10, 400)
    names = np.array([f"g{i}" for i in range(10)])
    discretized = discretization.DiscretizedGenes(gene_names=names, codes=codes, n_bins=N_BINS)
    candidates = pd.DataFrame({"target": names[:5], "parent": names[5:], "attention_score": 1.0})
    table = mi_lib.mi_edge_table(discretized, candidates, n_permutations=0)
    assert len(table) == 5 and (table["p_value_method"] == "g_test").all()
    for row, (first, second) in enumerate(zip(range(5), range(5, 10))):
        contingency = pd.crosstab(codes[first], codes[second]).to_numpy()
        expected = stats.chi2_contingency(contingency, lambda_="log-likelihood", correction=False).pvalue
        assert table["p_value"][row] == pytest.approx(expected, rel=1e-9)


def chain_corpus(n_cells: int, seed: int):
    """Counts of a chain X -> Y -> Z of five-state genes, each a noisy copy of its parent."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, size=n_cells)
    y = np.where(rng.random(n_cells) < 0.75, x, rng.integers(0, 5, size=n_cells))
    z = np.where(rng.random(n_cells) < 0.75, y, rng.integers(0, 5, size=n_cells))
    mean_counts = np.array([0.0, 8.0, 30.0, 80.0, 200.0])
    counts = rng.poisson(mean_counts[np.stack([x, y, z], axis=1)]).astype(np.float32)
    n_counts = counts.sum(axis=1) + rng.poisson(5000, size=n_cells)
    return sp.csr_matrix(counts), n_counts


def test_chain_flags_the_shortcut_edge_indirect():
    counts, n_counts = chain_corpus(2000, seed=14)
    edge_table = pd.DataFrame({"gene_i": ["X", "X", "Y"], "gene_j": ["Y", "Z", "Z"], "stability": [0.5, 0.3, -0.4]})
    candidates = mi_lib.candidate_edges(edge_table, top_k=2)
    discretized = discretization.discretize_expression(counts, n_counts, np.array(["X", "Y", "Z"]))
    mi_table = mi_lib.mi_edge_table(discretized, candidates, n_permutations=300)
    triplets, edges = mi_lib.cmi_tables(discretized, mi_table, n_permutations=300)
    assert len(triplets) == 6 and len(edges) == 6
    direct = {frozenset((row.target, row.parent)): row.direct for row in edges.itertuples()}
    assert direct == {frozenset("XY"): True, frozenset("YZ"): True, frozenset("XZ"): False}
    shortcut = edges[(edges["target"] == "Z") & (edges["parent"] == "X")].iloc[0]
    assert shortcut["conditioner_min"] == "Y" and shortcut["cmi_ratio"] < 0.2
    # cmi_min agrees with the single-edge estimator on the same codes.
    codes = dict(zip(discretized.gene_names, discretized.codes))
    assert shortcut["cmi_min"] == pytest.approx(estimators.triplet_conditional_mutual_information(codes["X"], codes["Z"], codes["Y"], N_BINS))


def test_cmi_permutation_p_values_are_uniform_under_conditional_independence():
    rng = np.random.default_rng(15)
    n_targets, n_cells = 150, 300
    # Per target: parent X and conditioner Z both depend on a shared Z-state, Y on Z only.
    codes = []
    for _ in range(n_targets):
        z = rng.integers(0, N_BINS, size=n_cells)
        x = np.where(rng.random(n_cells) < 0.6, z, rng.integers(0, N_BINS, size=n_cells))
        y = np.where(rng.random(n_cells) < 0.6, z, rng.integers(0, N_BINS, size=n_cells))
        codes += [y, x, z]
    names = np.array([f"g{i:03d}" for i in range(3 * n_targets)])
    discretized = discretization.DiscretizedGenes(gene_names=names, codes=np.array(codes, dtype=np.uint8), n_bins=N_BINS)
    mi_table = pd.DataFrame(
        {
            "target": np.repeat(names[0::3], 2),
            "parent": np.stack([names[1::3], names[2::3]], axis=1).ravel(),
            "mi": 0.1,
            "p_value": 0.001,
            "q_value": 0.001,
            "attention_score": 1.0,
        }
    )
    _, edges = mi_lib.cmi_tables(discretized, mi_table, n_permutations=199, alpha=1.0, seed=3)
    x_edges = edges[edges["parent"].isin(names[1::3])]
    assert (x_edges["conditioner_min"].to_numpy() == names[2::3]).all()
    assert stats.kstest(x_edges["p_value_cmi_min"], "uniform").pvalue > 0.01


def test_cmi_without_permutations_uses_the_stratified_g_test():
    rng = np.random.default_rng(16)
    codes = sparse_like_codes(rng, 3, 600)
    codes[2] = np.where(rng.random(600) < 0.5, codes[0], codes[2])
    names = np.array(["Y", "X", "Z"])
    discretized = discretization.DiscretizedGenes(gene_names=names, codes=codes, n_bins=N_BINS)
    candidates = pd.DataFrame({"target": ["Y", "Y"], "parent": ["X", "Z"], "attention_score": 1.0})
    mi_table = mi_lib.mi_edge_table(discretized, candidates, n_permutations=0)
    _, edges = mi_lib.cmi_tables(discretized, mi_table, n_permutations=0)
    # Independent: G statistics and degrees of freedom of each stratum's non-empty crosstab.
    x, y, z = codes[1], codes[0], codes[2]
    statistic = dof = 0.0
    for stratum in np.unique(z):
        crosstab = pd.crosstab(x[z == stratum], y[z == stratum]).to_numpy()
        if min(crosstab.shape) > 1:
            result = stats.chi2_contingency(crosstab, lambda_="log-likelihood", correction=False)
            statistic += result.statistic
            dof += result.dof
    assert edges["p_value_cmi_min"][0] == pytest.approx(stats.chi2.sf(statistic, dof), rel=1e-9)


def test_mi_edge_table_names_genes_missing_from_the_codes():
    discretized = discretization.DiscretizedGenes(gene_names=np.array(["A", "B"]), codes=np.zeros((2, 10), np.uint8), n_bins=N_BINS)
    candidates = pd.DataFrame({"target": ["A"], "parent": ["ZZZ"], "attention_score": 1.0})
    with pytest.raises(ScgrnInputError, match="ZZZ"):
        mi_lib.mi_edge_table(discretized, candidates)
    with pytest.raises(ScgrnInputError, match="attention_score"):
        mi_lib.mi_edge_table(discretized, candidates.drop(columns="attention_score"))
